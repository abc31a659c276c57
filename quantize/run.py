"""One quantization run: load, calibrate, AWQ search in llm-compressor, repack, publish.

The output appears only when everything succeeded: the run writes into a hidden temporary
folder beside `out` and renames it at the end, so an interrupted run never leaves something
that looks like a finished checkpoint. The repacked tensors are checked bit for bit against
llm-compressor's before the rename.
"""

from __future__ import annotations

import json
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantize import calibration, checkpoint, compat, mappings
from quantize.mappings import ArchSpec

FORMATS = ("awq-gemm", "compressed-tensors")


class QuantizeError(ValueError):
    pass


@dataclass
class Options:
    model: Path
    out: Path
    format: str = "awq-gemm"
    method: str = "awq"  # "rtn": round-to-nearest, same bits and groups (for comparison)
    calib: Path | None = None
    num_samples: int = 128
    seq_len: int = 512
    group_size: int = 128
    overwrite: bool = False
    max_shard_gb: float = 4.0


@dataclass
class Result:
    out: Path
    spec: ArchSpec
    calib: calibration.Calibration
    seconds: float
    peak_rss_gb: float
    peak_gpu_gb: float | None
    device: str
    size_bytes: int
    report: checkpoint.WriteReport | None = None


def check_options(opts: Options) -> ArchSpec:
    """Fail before any heavy work: bad paths, format, or architecture."""
    if not (opts.model / "config.json").is_file():
        raise QuantizeError(f"{opts.model} is not a model folder (no config.json); pass a local "
                            "Hugging Face model directory")
    if opts.format not in FORMATS:
        raise QuantizeError(f"--format must be one of {', '.join(FORMATS)}")
    if opts.out.exists() and not opts.overwrite:
        raise QuantizeError(f"{opts.out} already exists; choose another --out or pass --overwrite")
    if opts.num_samples < 1 or opts.seq_len < 2:
        raise QuantizeError("--num-samples must be >= 1 and --seq-len >= 2")
    if opts.calib is not None and not opts.calib.is_file():
        raise QuantizeError(f"--calib {opts.calib}: no such file")
    config = json.loads((opts.model / "config.json").read_text())
    spec = mappings.for_config(config)
    # Every quantized layer reads hidden_size or intermediate_size inputs; groups must tile them.
    widths = {config.get("hidden_size"), config.get("intermediate_size")} - {None}
    if opts.group_size < 8 or any(int(w) % opts.group_size for w in widths):
        raise QuantizeError(f"--group-size {opts.group_size} must divide the layer widths "
                            f"{sorted(widths)}; 128 (the default) fits Llama, Mistral and Mixtral")
    return spec


def recipe(spec: ArchSpec, method: str, group_size: int) -> list[Any]:
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    quant = QuantizationModifier(ignore=list(spec.ignore), config_groups={"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                    "group_size": group_size},
    }})
    if method == "rtn":
        return [quant]
    return [AWQModifier(mappings=spec.awq_mappings()), quant]


def load_model(model_dir: Path, spec: ArchSpec) -> Any:
    from transformers import AutoModelForCausalLM

    if spec.is_moe:
        # Fused expert tensors (transformers 5) become one Linear per expert, so every expert
        # is calibrated and quantized on its own.
        from llmcompressor.modeling.moe.linearize import load_quantizable_moe

        with load_quantizable_moe():
            return AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")


def _peaks() -> tuple[float, float | None]:
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return rss, gpu


def quantize(opts: Options) -> Result:
    spec = check_options(opts)
    start = time.monotonic()
    compat.patch_for_cpu()
    from llmcompressor import oneshot
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(opts.model)
    calib = calibration.load(tok, opts.model, opts.calib, opts.num_samples, opts.seq_len)
    template = calibration.template_source(tok, opts.model)
    model = load_model(opts.model, spec)
    # moe_calibrate_all_experts (llm-compressor's default) sends every calibration token through
    # every expert, so an expert the router rarely picks still gets statistics.
    oneshot(model=model, dataset=calib.dataset(), recipe=recipe(spec, opts.method, opts.group_size),
            num_calibration_samples=len(calib.samples), max_seq_length=opts.seq_len)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{opts.out.name}.partial-", dir=opts.out.parent))
    try:
        ct_dir = work / "compressed-tensors"
        model.save_pretrained(ct_dir, save_compressed=True)
        del model
        report = None
        if opts.format == "awq-gemm":
            stage = work / "awq-gemm"
            stage.mkdir()
            from tqdm import tqdm

            layers = int(json.loads((ct_dir / "config.json").read_text())["num_hidden_layers"])
            with tqdm(total=layers, desc="Repacking to AWQ GEMM", unit="layer") as bar:
                report = checkpoint.write_gemm(ct_dir, stage, spec, opts.group_size,
                                               int(opts.max_shard_gb * 2**30), bar)
            from quantize.verify import check_repack

            check_repack(ct_dir, stage, spec)
        else:
            stage = ct_dir
        checkpoint.copy_tokenizer(opts.model, stage, template)
        rss, gpu = _peaks()
        result = Result(opts.out, spec, calib, time.monotonic() - start, rss, gpu,
                        compat.device_name(), checkpoint.dir_size(stage), report)
        from quantize.card import write_card

        write_card(stage, opts, result)
        result.size_bytes = checkpoint.dir_size(stage)
        _publish(stage, opts.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _publish(stage: Path, out: Path) -> None:
    """Rename the finished folder into place (replacing `out` only with --overwrite)."""
    # mkdtemp and safetensors create owner-only modes; a checkpoint is meant to be shared
    # (mounted into a container that runs as another user).
    stage.chmod(0o755)
    for f in stage.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(old)
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        stage.rename(out)
