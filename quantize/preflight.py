"""Everything a quantization run can check before it loads anything.

A run that fails after an hour of AWQ search because the output folder is not writable, the disk
is full, or the model folder has no tokenizer, wastes the hour; one that writes its output
inside the model folder (or replaces it) loses data. These checks run first and fail in
seconds, with a message that names the fix.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from awq import registry
from awq.registry import ArchSpec
from awq.widths import widths
from quantize.options import FORMATS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


# Group sizes the serving kernels run: moegi's CPU MoE plugin (PyTorch's int4 kernel takes
# 32, 64, 128, 256) and vLLM's Marlin kernels on CUDA (`MARLIN_SUPPORTED_GROUP_SIZES`: 32, 64,
# 128, or -1 for one group per row, which AWQ checkpoints do not use).
SERVABLE_GROUPS = (32, 64, 128, 256)
MARLIN_GROUPS = (32, 64, 128)
DEFAULT_GROUP = 128


class QuantizeError(ValueError):
    pass


def choose_group_size(config: dict[str, Any], requested: int | None) -> tuple[int, str | None]:
    """(group size, a note for the summary and the card, or None). Refuses a size the serving
    kernels cannot run or that does not tile the layers, naming the sizes that would."""
    sizes = widths(config).all()
    fits = [g for g in SERVABLE_GROUPS if all(w % g == 0 for w in sizes)]
    if requested is None:
        marlin = [g for g in fits if g in MARLIN_GROUPS and g <= DEFAULT_GROUP]
        if not marlin:
            raise QuantizeError(f"no group size the serving kernels run ({SERVABLE_GROUPS}) "
                                f"divides this model's layer widths {sizes}")
        chosen = max(marlin)
        note = None if chosen == DEFAULT_GROUP else (
            f"group size {chosen}: the default {DEFAULT_GROUP} does not divide the layer widths "
            f"{sizes}; {chosen} is the largest that does and that every serving kernel runs")
        return chosen, note
    if requested not in SERVABLE_GROUPS:
        raise QuantizeError(f"--group-size {requested}: the serving kernels run group sizes "
                            f"{', '.join(map(str, SERVABLE_GROUPS))} only (vLLM's Marlin on "
                            f"CUDA: {', '.join(map(str, MARLIN_GROUPS))}); for this model use "
                            f"{' or '.join(map(str, fits)) or 'none: no size fits'}")
    if requested not in fits:
        raise QuantizeError(f"--group-size {requested} must divide the layer widths {sizes}; "
                            f"sizes that do and that the serving kernels run: "
                            f"{', '.join(map(str, fits)) or 'none'}"
                            + (f" (leave --group-size out to get {max(g for g in fits if g <= 128)})"
                               if any(g <= 128 for g in fits) else ""))
    if requested not in MARLIN_GROUPS:
        return requested, (f"group size {requested} runs on moegi's CPU plugin but not on vLLM's "
                           f"Marlin kernels (CUDA: {', '.join(map(str, MARLIN_GROUPS))}), where "
                           "the checkpoint falls back to slower kernels or fails")
    return requested, None


@dataclass
class Plan:
    spec: ArchSpec
    config: dict[str, Any]
    model_bytes: int  # the checkpoint's tensors on disk
    out_bytes: int  # the estimated output
    group_size: int
    group_note: str | None  # why the group size is not the default, or where it does not run


def _tensor_sizes(model: Path, group_size: int, spec: ArchSpec) -> tuple[int, int]:
    """(bytes on disk, estimated bytes of the 4-bit output), from the shards' headers only."""
    on_disk = out = 0
    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                t = f.get_slice(key)
                n = 1
                for d in t.get_shape():
                    n *= d
                size = {"F32": 4, "F16": 2, "BF16": 2}.get(t.get_dtype(), 4)
                on_disk += n * size
                kept = spec.keeps(key) or len(t.get_shape()) < 2
                # 4 bits a weight, and per group: an fp16 scale and a 4-bit zero point.
                out += n * 2 if kept else n // 2 + n * 5 // (2 * group_size)
    return on_disk, out


def _same_or_nested(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check(model: Path, out: Path, *, fmt: str, group_size: int | None, num_samples: int,
          seq_len: int,
          calib: Path | None, overwrite: bool, max_shard_gb: float) -> Plan:
    """Fail before any heavy work: paths, architecture, options, tokenizer, space, writability."""
    if not (model / "config.json").is_file():
        raise QuantizeError(f"{model} is not a model folder (no config.json); pass a local "
                            "Hugging Face model directory")
    if fmt not in FORMATS:
        raise QuantizeError(f"--format must be one of {', '.join(FORMATS)}")
    if num_samples < 1 or seq_len < 2:
        raise QuantizeError("--num-samples must be >= 1 and --seq-len >= 2")
    if not 2**-20 <= max_shard_gb <= 1024:  # also refuses nan
        raise QuantizeError(f"--max-shard-gb {max_shard_gb} must be between 0.000001 and 1024: "
                            "it bounds the memory a shard takes while it is written (1 = 1 GiB)")
    if calib is not None and not calib.is_file():
        raise QuantizeError(f"--calib {calib}: no such file")
    config = json.loads((model / "config.json").read_text())
    spec = registry.for_config(config)
    group_size, group_note = choose_group_size(config, group_size)
    src, dst = model.resolve(), out.resolve()
    if _same_or_nested(src, dst):
        where = ("the model folder" if src == dst else "inside the model folder"
                 if dst.is_relative_to(src) else "a folder that contains the model")
        raise QuantizeError(f"{out} is {where}: choose an output folder outside the model, "
                            f"e.g. {src.parent / (model.name + '-AWQ')}")
    if out.exists() and not overwrite:
        raise QuantizeError(f"{out} already exists; choose another output folder (the second "
                            "argument) or pass --overwrite")
    if not any((model / f).is_file() for f in TOKENIZER_FILES):
        raise QuantizeError(f"{model} has no tokenizer files ({' or '.join(TOKENIZER_FILES)}): "
                            "copy the tokenizer of the model it was made from into the folder "
                            "(mergekit copies it with tokenizer_source; a hand-made merge may not)")
    if not list(model.glob("*.safetensors")):
        raise QuantizeError(f"{model} has no .safetensors weights: save the model with "
                            "safe_serialization (transformers' default) first")
    model_bytes, out_bytes = _tensor_sizes(model, group_size, spec)
    parent = dst.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".moegi-write-test-"):
            pass
    except OSError as exc:
        raise QuantizeError(f"cannot write into {parent} ({exc.strerror}): choose an output "
                            "folder you can write to") from None
    # Beside OUT, in the run's work and resume folders: the model offloaded to disk (AWQ rewrites
    # every weight it smooths; a MoE also keeps its fused experts there), each finished layer
    # and the activations for resuming, and the output twice (llm-compressor's files and the
    # GEMM files) before the rename.
    acts = 2 * num_samples * seq_len * int(config.get("hidden_size", 0)) * 2
    need = model_bytes * (2 if spec.is_moe else 1) + model_bytes + acts + 2 * out_bytes
    free = shutil.disk_usage(parent).free
    if free < need * 1.1:
        raise QuantizeError(f"{parent} has {free / 2**30:.1f} GiB free; the run needs about "
                            f"{need * 1.1 / 2**30:.1f} GiB there for the offloaded model, the "
                            f"resume state and the output ({out_bytes / 2**30:.1f} GiB, written "
                            "twice before the rename): free some space or choose another output folder")
    return Plan(spec, config, model_bytes, out_bytes, group_size, group_note)
