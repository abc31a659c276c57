"""Splitting one model over several vLLM ranks: what is checked before loading, and CPU binding.

vLLM splits a model by tensor parallel (each layer's weights across ranks) and pipeline parallel
(layers across ranks), over its multiprocessing backend on one machine or Ray across machines.
Two things fail late there, so moegi handles them before the engine starts:

- **A tensor-parallel split an AWQ checkpoint cannot take.** Row-parallel layers (attention's
  `o_proj`, the MLP's or experts' `down_proj`/`w2`) split their *input* channels, and each rank
  must hold whole AWQ groups. On CPU a split that breaks a group dies at warm-up (SIGFPE in the
  int4 kernel); on CUDA Marlin refuses it after the load. `check_split` reads config.json and
  refuses with the sizes that fit.
- **CPU thread binding.** vLLM's CPU workers bind their OpenMP threads to one NUMA node each by
  default and refuse to start when there are more ranks than nodes ("Not enough allowed NUMA
  nodes to bind threads"), which is every single-socket machine. `cpu_binding` gives each rank
  its own cores (`VLLM_CPU_OMP_THREADS_BIND=0-3|4-7`), which moegi sets when the user has not
  (`bind_cpu_threads`, called before the engine starts; its workers inherit it).
"""

from __future__ import annotations

import json
from pathlib import Path

from awq.widths import tensor_parallel_fits, text_config, whole_groups, widths


def check_split(model_dir: Path, tensor_parallel: int, pipeline_parallel: int) -> None:
    """Refuse, before loading, a split this checkpoint cannot take; ValueError names the fix."""
    config_file = model_dir / "config.json"
    if (tensor_parallel == 1 and pipeline_parallel == 1) or not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    text = text_config(config)
    layers = text.get("num_hidden_layers", 0)
    if pipeline_parallel > layers:
        raise ValueError(f"--pipeline-parallel-size {pipeline_parallel} is more stages than the "
                         f"model's {layers} layers: use at most {layers}")
    heads = text["num_attention_heads"]
    if heads % tensor_parallel:
        fits = [t for t in range(1, tensor_parallel) if heads % t == 0]
        raise ValueError(f"--tensor-parallel-size {tensor_parallel} does not divide the model's "
                         f"{heads} attention heads: use {' or '.join(map(str, fits))}, or "
                         "--pipeline-parallel-size")
    quant = config.get("quantization_config") or {}
    group = quant.get("group_size") if quant.get("quant_method") in ("awq", "gptq") else None
    if not group or group <= 0:
        return
    row = widths(config).row_parallel
    for name, width in row.items():
        if not whole_groups(width, group, tensor_parallel):
            fits = tensor_parallel_fits(list(row.values()), group, tensor_parallel)
            raise ValueError(
                f"--tensor-parallel-size {tensor_parallel} gives each rank "
                f"{width / tensor_parallel:g} of the {width} input channels of {name}, not "
                f"whole AWQ groups of {group}: use --tensor-parallel-size "
                f"{' or '.join(map(str, fits))}, --pipeline-parallel-size {tensor_parallel} "
                "(splits by layers, any group size), or quantize with a smaller --group-size")


def cpu_binding(ranks: int, cpus: list[int]) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for `ranks` CPU workers: the usable cores in equal runs.

    Raises ValueError when there are fewer cores than ranks (a rank needs a core of its own).
    """
    if ranks > len(cpus):
        raise ValueError(f"{ranks} CPU ranks (tensor x pipeline parallel) need at least {ranks} "
                         f"cores; this process may use {len(cpus)}: use fewer ranks")
    per = len(cpus) // ranks
    groups = [sorted(cpus)[r * per:(r + 1) * per] for r in range(ranks)]
    return "|".join(_ranges(g) for g in groups)


def _ranges(cores: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the syntax vLLM's binding takes)."""
    runs: list[list[int]] = []
    for c in cores:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


THREADS_BIND = "VLLM_CPU_OMP_THREADS_BIND"


def bind_cpu_threads(tensor_parallel: int, pipeline_parallel: int) -> str | None:
    """Set `VLLM_CPU_OMP_THREADS_BIND` for a multi-rank CPU engine unless the user has; returns
    what was set. Call only on vLLM's CPU platform, before the engine starts."""
    import os

    ranks = tensor_parallel * pipeline_parallel
    if ranks == 1 or os.environ.get(THREADS_BIND):
        return None
    os.environ[THREADS_BIND] = cpu_binding(ranks, sorted(os.sched_getaffinity(0)))
    return os.environ[THREADS_BIND]
