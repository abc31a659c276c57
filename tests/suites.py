"""`make test`'s runner: the checks and both test suites, each to its end, one verdict at the end.

The suites live in two environments (llm-compressor's pins conflict with vLLM's), so they are two
pytest runs. A failure in one must never hide the other's results: each step runs whatever the
ones before it did, and the summary at the end prints every step's last line and how long it
took; the exit status is non-zero when any step failed.

    python -m tests.suites [--only lint,quantize,main] [PYTEST_ARGS...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    name: str
    argv: list[str]
    status: int | None = None
    summary: str = ""
    seconds: float = 0.0


# The slowest tests of each suite, printed before its summary: where CI's time goes.
DURATIONS = "--durations=12"


def steps(python: Path, quantize_python: Path, extra: list[str]) -> list[Step]:
    bin_dir = python.parent
    return [
        Step("lint", [str(bin_dir / "ruff"), "check", "--no-cache", "."]),
        Step("types", [str(bin_dir / "mypy")]),
        Step("quantize", [str(quantize_python), "-m", "pytest", "-q", DURATIONS, "tests/quantize",
                          *extra]),
        Step("main", [str(python), "-m", "pytest", "-q", DURATIONS, "tests",
                      "--ignore=tests/images", *extra]),
    ]


def run(step: Step) -> None:
    """Run one step, its output passed through as it comes; keep its last non-empty line."""
    print(f"\n=== {step.name}: {' '.join(step.argv)}", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(step.argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    assert proc.stdout is not None
    last = ""
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if line.strip():
            last = line.strip()
    step.status = proc.wait()
    step.seconds = time.monotonic() - start
    step.summary = last


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.suites", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated step names (default: all)")
    a, extra = p.parse_known_args(argv)
    quantize_python = Path(os.environ.get("MOEGI_QUANTIZE_PYTHON",
                                          REPO / ".venv-quantize" / "bin" / "python"))
    chosen = steps(Path(sys.executable), quantize_python, extra)
    if a.only:
        names = a.only.split(",")
        chosen = [s for s in chosen if s.name in names]
    for step in chosen:
        run(step)
    print("\n=== make test: every step's result", flush=True)
    for step in chosen:
        verdict = "ok" if step.status == 0 else f"FAILED (exit {step.status})"
        print(f"{step.name:>9}  {verdict:<18} {step.seconds / 60:5.1f} min  {step.summary}")
    return 0 if all(s.status == 0 for s in chosen) else 1


if __name__ == "__main__":
    raise SystemExit(main())
