"""`moegi-quantize`: AWQ-quantize a model, or verify a quantized checkpoint.

    moegi-quantize MODEL_DIR OUT_DIR [--format awq-gemm|compressed-tensors] [--calib FILE.jsonl]
                   [--num-samples N] [--seq-len L] [--group-size G] [--overwrite]
                   [--accept-quality-loss]
    moegi-quantize verify OUT_DIR --original MODEL_DIR [--eval FILE.jsonl]

MODEL_DIR may also name one of the project's tiny test models (tiny-mixtral, tiny-text, ...).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from awq.registry import UnsupportedArchitecture
from quantize import options
from quantize import run as runner
from quantize.calibration import CalibrationError


def _model_path(arg: str) -> Path:
    path = Path(arg)
    if path.exists() or "/" in arg:
        return path
    from tiny.build import BUILDERS, ensure_model

    return ensure_model(arg) if arg in BUILDERS else path


def quantize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moegi-quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a local Hugging Face model folder (or a tiny test model name)")
    p.add_argument("out", type=Path, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--format", choices=options.FORMATS, default="awq-gemm")
    p.add_argument("--method", choices=options.METHODS, default="gptq",
                   help="gptq (default): AWQ smoothing, then each layer keeps the best of AWQ, "
                        "GPTQ's rounding and round-to-nearest on the calibration data; awq: "
                        "AWQ alone (never worse than round-to-nearest per layer); rtn: plain "
                        "round-to-nearest")
    p.add_argument("--calib", type=Path, help='JSONL of {"text": ...} or {"messages": [...]}; '
                   "default: the built-in Japanese + English set")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=None,
                   help="inputs per scale and zero point; default 128, or the largest size "
                        "that divides the model's layer widths and that every serving kernel "
                        "runs (64 for a hidden size of 576)")
    p.add_argument("--observer", choices=tuple(options.OBSERVERS), default=options.DEFAULT_OBSERVER,
                   help="how each group's range is set after AWQ scaling: imatrix (default) "
                        "searches the clipping with the least activation-weighted error, as "
                        "AutoAWQ's auto_clip does; mse the least weight error; minmax takes the "
                        "extremes")
    p.add_argument("--accept-quality-loss", action="store_true",
                   help="publish a checkpoint that beats round-to-nearest but exceeds the "
                        "quality limit (a model sensitive to 4 bits); the card says so. A run "
                        "the gate refused goes on from OUT.resume/ without a new AWQ search")
    p.add_argument("--max-shard-gb", type=float, default=1.0,
                   help="largest shard written, in GiB (default 1); llm-compressor's save "
                        "holds one shard of its files in memory, so this bounds that step")
    p.add_argument("--overwrite", action="store_true")
    return p


def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moegi-quantize verify")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--original", required=True, help="the unquantized model folder")
    p.add_argument("--eval", type=Path, help="held-out JSONL; default: the built-in ja+en text")
    p.add_argument("--accept-quality-loss", action="store_true",
                   help="pass a checkpoint that beats round-to-nearest but exceeds the limits")
    return p


# glibc's dynamic mmap threshold lets freed layer-sized buffers stay in the heap, so peak memory
# grows with depth while layers stream through; a fixed 4 MiB threshold returns them (measured:
# a 16-layer Mixtral's heap 1.29 -> 0.58 GiB). glibc reads it only at process start.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4194304"}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if argv is None and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, "-m", "quantize", *args],
                  {**os.environ, **MALLOC_ENV})
    try:
        if args[:1] == ["verify"]:
            from quantize.verify import VerifyError, verify

            v = verify_parser().parse_args(args[1:])
            try:
                report = verify(v.checkpoint, _model_path(v.original), v.eval,
                                v.accept_quality_loss)
            except VerifyError as exc:
                print(f"verify FAILED: {exc}", file=sys.stderr)
                return 1
            print(report.table())
            print("verify passed")
            return 0
        a = quantize_parser().parse_args(args)
        opts = runner.Options(
            model=_model_path(a.model), out=a.out, format=a.format, method=a.method,
            calib=a.calib, num_samples=a.num_samples, seq_len=a.seq_len,
            group_size=a.group_size, overwrite=a.overwrite, max_shard_gb=a.max_shard_gb,
            accept_quality_loss=a.accept_quality_loss, observer=a.observer)
        result = runner.quantize(opts)
    except (runner.QuantizeError, UnsupportedArchitecture, CalibrationError) as exc:
        print(f"moegi-quantize: {exc}", file=sys.stderr)
        return 2
    print(runner.write_summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
