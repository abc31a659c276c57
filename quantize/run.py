"""One quantization run: check, load, calibrate, AWQ search in llm-compressor, repack, gate,
publish.

The output appears only when everything succeeded: the run writes into a hidden folder beside
`out` and renames it at the end, so an interrupted run never leaves something that looks like a
finished checkpoint, and SIGTERM (`docker stop`, `timeout`) cleans the hidden folder up like
Ctrl-C does. Before the rename, the repacked tensors are checked bit for bit against
llm-compressor's, and the written checkpoint goes through a quality gate: a forward pass on a
few held-out sequences, read back from the files, is compared with the original's and with
round-to-nearest's (`verify.Gate`, the same rules `moegi-quantize verify` applies): a broken
checkpoint is never published; one worse than round-to-nearest, or past the absolute limit, only
with --accept-quality-loss.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from awq.registry import ArchSpec
from awq.widths import widths
from quantize import calibration, checkpoint, compat, guard, pipeline, preflight, verify
from quantize.options import FORMATS, OBSERVERS, Method, Observer, Options, Result
from quantize.preflight import QuantizeError

__all__ = ["FORMATS", "Options", "QuantizeError", "Result", "quantize"]


def recipe(spec: ArchSpec, method: Method, group_size: int,
           observer: Observer = "minmax") -> list[Any]:
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    # Round-to-nearest is the plain baseline: min-max ranges, whatever --observer says.
    quant = QuantizationModifier(ignore=list(spec.ignore), config_groups={"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                    "group_size": group_size,
                    "observer": OBSERVERS["minmax" if method == "rtn" else observer]},
    }})
    if method == "rtn":
        return [quant]
    return [AWQModifier(mappings=spec.awq_mappings()), quant]


def load_model(model_dir: Path, spec: ArchSpec, offload: Path) -> Any:
    """The model offloaded to disk: its weights stay in the safetensors shards (or, once AWQ
    changed them, in `offload`), and llm-compressor's pipeline onloads one layer at a time."""
    from compressed_tensors.offload import load_offloaded_model
    from transformers import AutoModelForCausalLM

    with load_offloaded_model():
        # device_map {"": "disk"}, not "auto_offload": that keeps in RAM whatever fits.
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto",
                                                     device_map={"": "disk"},
                                                     offload_folder=str(offload))
    if spec.is_moe:
        # transformers 5 fuses experts into 3-D tensors; llm-compressor gives each expert its
        # own Linear again (offloaded like the fused one), so each is calibrated and quantized
        # on its own and saved under AutoAWQ's per-expert names. After loading, not through
        # `load_quantizable_moe`: its patching walks every transformers module and imports
        # the image processors, which need torchvision (not installed: field notes).
        from llmcompressor.modeling.moe.linearize import linearize_moe

        linearize_moe(model)
    return model


def fingerprint(opts: Options) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one."""
    def digest(path: Path | None) -> str | None:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path else None

    return {"model": str(opts.model.resolve()), "config": digest(opts.model / "config.json"),
            "calib": digest(opts.calib), "method": opts.method, "group_size": opts.group_size,
            "num_samples": opts.num_samples, "seq_len": opts.seq_len, "observer": opts.observer}


def _peaks() -> tuple[float, float | None]:
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return rss, gpu


@contextlib.contextmanager
def _terminable() -> Iterator[None]:
    """SIGTERM unwinds the run like Ctrl-C does, so its `finally` blocks clean up."""

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def quantize(opts: Options) -> Result:
    plan = preflight.check(opts.model, opts.out, fmt=opts.format, group_size=opts.group_size,
                           num_samples=opts.num_samples, seq_len=opts.seq_len, calib=opts.calib,
                           overwrite=opts.overwrite, max_shard_gb=opts.max_shard_gb)
    opts = opts.model_copy(update={"group_size": plan.group_size})
    if plan.group_note:
        print(f"moegi-quantize: {plan.group_note}", file=sys.stderr)
    start = time.monotonic()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(opts.model)
    calib = calibration.load(tok, opts.model, opts.calib, opts.num_samples, opts.seq_len)
    template = calibration.template_source(tok, opts.model)
    opts = _fit_method(opts, calib.num_tokens, max(widths(plan.config).all()))
    resume = pipeline.Resume(opts.out.parent / f"{opts.out.name}.resume", fingerprint(opts),
                             guard.GPTQ_CANDIDATES if opts.method == "gptq" else
                             guard.AWQ_CANDIDATES)
    try:
        resume.done()
    except ValueError as exc:
        raise QuantizeError(str(exc)) from None
    with _terminable():
        _remove_stale_work(opts.out)
        work = Path(tempfile.mkdtemp(prefix=f".{opts.out.name}.partial-", dir=opts.out.parent))
        (work / "pid").write_text(str(os.getpid()))
        try:
            result = _run(opts, plan, (calib, template), resume, work, start)
        except BaseException:
            if (resume.folder / pipeline.PROGRESS).is_file():
                print(f"moegi-quantize: {resume.done()} quantized layer(s) of this run are kept "
                      f"in {resume.folder}: the same command goes on from there (delete that "
                      "folder to start over)", file=sys.stderr)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(resume.folder, ignore_errors=True)
    return result


def _remove_stale_work(out: Path) -> None:
    """Work folders a killed run left beside OUT (SIGKILL runs no cleanup); a folder whose
    process still runs is another run's, and stays."""
    for folder in out.parent.glob(f".{out.name}.partial-*"):
        pid = folder / "pid"
        alive = False
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pid.read_text()), 0)
            alive = True
        if not alive:
            shutil.rmtree(folder, ignore_errors=True)


def _fit_method(opts: Options, tokens: int, widest: int) -> Options:
    """GPTQ only with calibration text enough for its Hessians (guard.GPTQ_TOKENS_PER_INPUT
    tokens per input of the widest layer); with less, AWQ's candidates, and the reason said."""
    if opts.method != "gptq" or tokens >= guard.GPTQ_TOKENS_PER_INPUT * widest:
        return opts
    print(f"moegi-quantize: --method awq instead of gptq: {tokens} calibration tokens are "
          f"under {guard.GPTQ_TOKENS_PER_INPUT} per input of the widest layer ({widest}), too "
          "few for GPTQ's rounding to hold on other text; give more --num-samples or --seq-len "
          f"(at least {guard.GPTQ_TOKENS_PER_INPUT * widest} tokens) for GPTQ", file=sys.stderr)
    return opts.model_copy(update={"method": "awq"})


def _run(opts: Options, plan: preflight.Plan, text: tuple[calibration.Calibration, str | None],
         resume: pipeline.Resume, work: Path, start: float) -> Result:
    """The long work, given the calibration text and the chat template the card records."""
    spec = plan.spec
    calib, template = text
    compat.patch_for_cpu()
    pipeline.register()
    from llmcompressor import oneshot

    model = load_model(opts.model, spec, work / "offload")
    # AWQ and the weight quantization share one layer-by-layer pass that can resume
    # (pipeline.py); round-to-nearest needs no data. Calibration rows keep their order, so a
    # run is reproducible (llm-compressor shuffles them with an unseeded sampler by default).
    # moe_calibrate_all_experts (llm-compressor's default) sends every calibration token
    # through every expert, so an expert the router rarely picks still gets statistics.
    pipeline.ACTIVE = resume
    try:
        oneshot(model=model, dataset=calib.dataset(),
                recipe=recipe(spec, opts.method, plan.group_size, opts.observer),
                num_calibration_samples=len(calib.samples), max_seq_length=opts.seq_len,
                shuffle_calibration_samples=False,
                pipeline=None if opts.method == "rtn" else "moegi_resumable")
    finally:
        pipeline.ACTIVE = None
    ct_dir = work / "compressed-tensors"
    # transformers reads a whole shard of the offloaded model into memory while it writes it,
    # so --max-shard-gb bounds this save; the repack below streams, one linear at a time.
    shard_bytes = int(opts.max_shard_gb * 2**30)
    model.save_pretrained(ct_dir, save_compressed=True, max_shard_size=shard_bytes)
    del model
    shutil.rmtree(work / "offload", ignore_errors=True)
    gemm_dir = work / "awq-gemm"
    gemm_dir.mkdir()
    from tqdm import tqdm

    layers = int(plan.config["num_hidden_layers"])
    with tqdm(total=layers, desc="Repacking to AWQ GEMM", unit="layer") as bar:
        report = checkpoint.write_gemm(ct_dir, gemm_dir, spec, plan.group_size,
                                       shard_bytes, bar)
    checkpoint.check_repack(ct_dir, gemm_dir, spec)
    checkpoint.copy_tokenizer(opts.model, gemm_dir, template)
    try:
        gate = verify.gate(gemm_dir, opts.model, calib.heldout, plan.group_size)
    except (KeyError, RuntimeError) as exc:  # a tensor under a name no reader maps
        raise QuantizeError(f"the written checkpoint does not read back as a "
                            f"{spec.architecture} ({exc}); it was not published") from exc
    if not gate.publishable(opts.accept_quality_loss):
        resumable = opts.method != "rtn" and gate.verdict() != verify.BROKEN
        raise QuantizeError(
            f"{gate.explain()}. Measured on {calib.heldout_source}; the checkpoint was not "
            "published" + (
                f". The quantized layers are kept in {resume.folder}: the same command "
                "(with --accept-quality-loss or not) goes on from there without repeating the "
                "AWQ search" if resumable else ""))
    stage = gemm_dir
    if opts.format == "compressed-tensors":
        stage = ct_dir
        checkpoint.copy_tokenizer(opts.model, stage, template)
    rss, gpu = _peaks()
    result = Result(opts.out, spec, calib, time.monotonic() - start, rss, gpu,
                    compat.device_name(), checkpoint.dir_size(stage), gate, plan.group_note,
                    report if opts.format == "awq-gemm" else None, list(resume.choices))
    from quantize.card import write_card

    write_card(stage, opts, result)
    result.size_bytes = checkpoint.dir_size(stage)
    _publish(stage, opts.out)
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


def write_summary(result: Result) -> str:
    gpu = f", peak GPU {result.peak_gpu_gb:.1f} GiB" if result.peak_gpu_gb is not None else ""
    return (f"wrote {result.out} ({result.size_bytes / 2**20:.1f} MiB) in {result.seconds:.1f} s "
            f"on {result.device}; peak RSS {result.peak_rss_gb:.2f} GiB{gpu}; checked against "
            f"the original: {result.gate.figures()}"
            + ("; PUBLISHED PAST THE QUALITY LIMIT (--accept-quality-loss)"
               if result.gate.verdict() != verify.PASS else ""))

