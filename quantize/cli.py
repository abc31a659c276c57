"""`moegi-quantize`: quantize a model, or verify a quantized checkpoint.

    moegi-quantize MODEL_DIR OUT_DIR [--method gptq|awq|rtn] [--calib FILE.jsonl] ...
    moegi-quantize verify OUT_DIR --original MODEL_DIR [--eval FILE.jsonl]

`--help` lists the options (quantize/options.py: each is also a MOEGI_QUANTIZE_* variable).
MODEL_DIR may also name one of the project's tiny test models (tiny-mixtral, tiny-text, ...).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, CliApp, SettingsError

from awq.registry import UnsupportedArchitecture
from quantize import options
from quantize import run as runner
from quantize.calibration import CalibrationError

S = TypeVar("S", bound=BaseSettings)


def _model_path(arg: str) -> Path:
    path = Path(arg)
    if path.exists() or "/" in arg:
        return path
    from tiny.build import BUILDERS, ensure_model

    return ensure_model(arg) if arg in BUILDERS else path


def parse(settings: type[S], argv: list[str]) -> S:
    """Flags and MOEGI_QUANTIZE_* variables -> settings; a bad value exits 2 naming both."""
    try:
        return CliApp.run(settings, cli_args=argv)
    except SettingsError as exc:
        raise SystemExit(f"moegi-quantize: invalid options: {exc} ({exc.__cause__})") from None
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "options"
            lines.append(f"  --{name.replace('_', '-')} / MOEGI_QUANTIZE_{name.upper()}: "
                         f"{err['msg']}")
        raise SystemExit("moegi-quantize: invalid options\n" + "\n".join(lines)) from None


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

            v = parse(options.VerifyOptions, args[1:])
            try:
                report = verify(v.checkpoint, _model_path(v.original), v.eval,
                                v.accept_quality_loss)
            except VerifyError as exc:
                print(f"verify FAILED: {exc}", file=sys.stderr)
                return 1
            print(report.table())
            print("verify passed")
            return 0
        opts = parse(options.Options, args)
        opts.model = _model_path(str(opts.model))
        result = runner.quantize(opts)
    except (runner.QuantizeError, UnsupportedArchitecture, CalibrationError) as exc:
        print(f"moegi-quantize: {exc}", file=sys.stderr)
        return 2
    print(runner.write_summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
