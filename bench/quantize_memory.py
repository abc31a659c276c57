"""`make bench-quantize`: peak memory and time of `moegi-quantize` and `verify` against depth.

Random bf16 Mixtrals of hidden 1024, 4 experts (2 per token), intermediate 2048, with 4, 8, 16
and 32 layers (bench/models.py), are quantized (AWQ, 8 calibration samples of 256 tokens,
output shards of 256 MiB) and then verified, each in its own process. The table gives each
run's peak RSS and, of it, the anonymous memory (sampled every 50 ms; the file-backed pages of
mmapped shards are page cache the kernel reclaims) beside the model's size, and the slope per
layer: a bounded run's peak does not grow with depth beyond the calibration activations, one
layer and one shard of llm-compressor's save. Time per layer gives the slope for a 4x7B
estimate.

    make bench-quantize                  # or: .venv/bin/python -m bench.quantize_memory
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, table
from bench.models import model as bench_model
from tiny.build import quantize_python

SHAPE = dict(hidden_size=1024, intermediate_size=2048, num_attention_heads=8,
             num_key_value_heads=8, num_local_experts=4, num_experts_per_tok=2)


def _rss_anon(pid: int) -> int:
    """Anonymous resident bytes (heap, tensors): what the kernel cannot drop under pressure.

    File-backed pages of mmapped safetensors count in RSS too but are page cache, reclaimable.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _measure(cmd: list[str]) -> tuple[float, float, float, int]:
    """(peak RSS GiB, peak anonymous RSS GiB, seconds, exit code) of one child process."""
    start = time.monotonic()
    # stderr to a file, not a pipe: nobody reads a pipe while the child runs, and its progress
    # bars would fill one and block it.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
        anon = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            anon = max(anon, _rss_anon(proc.pid))
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode not in (0, 1):  # verify exits 1 on a random model's top-1: measured
            log.seek(0)
            err = log.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err}")
    return usage.ru_maxrss / 2**20, anon / 2**30, time.monotonic() - start, proc.returncode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.quantize_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    args = parser.parse_args(argv)
    python = str(quantize_python())
    rows, points = [], []
    with tempfile.TemporaryDirectory(prefix="moegi-bench-quantize-") as tmp:
        for layers in args.layers:
            src = bench_model(f"mixtral-{layers}l", "mixtral",
                              {**SHAPE, "num_hidden_layers": layers})
            size = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**30
            out = Path(tmp) / f"awq-{layers}"
            # Shards of 256 MiB: llm-compressor's save (transformers') holds one in memory,
            # and at the default 1 GiB a whole 32-layer model here would fit in one.
            q_rss, q_anon, q_s, _ = _measure([python, "-m", "quantize", str(src), str(out),
                                              "--num-samples", "8", "--seq-len", "256",
                                              "--max-shard-gb", "0.25"])
            v_rss, v_anon, v_s, _ = _measure([python, "-m", "quantize", "verify", str(out),
                                              "--original", str(src)])
            points.append((layers, q_anon, v_anon, q_s))
            rows.append([str(layers), f"{size:.2f}", f"{q_rss:.2f}", f"{q_anon:.2f}",
                         f"{q_s:.0f}", f"{v_rss:.2f}", f"{v_anon:.2f}", f"{v_s:.0f}"])
            print(f"{layers} layers: quantize {q_rss:.2f} GiB (anon {q_anon:.2f}) {q_s:.0f} s, "
                  f"verify {v_rss:.2f} GiB (anon {v_anon:.2f}) {v_s:.0f} s",
                  file=sys.stderr, flush=True)
    (l0, q0, v0, t0), (l1, q1, v1, t1) = points[0], points[-1]
    span = max(1, l1 - l0)
    print(f"\nRandom Mixtral, hidden 1024, 4 experts, intermediate 2048 (bf16 layer "
          f"{(4 * 3 * 1024 * 2048 + 4 * 1024 * 1024) * 2 / 2**20:.0f} MiB).\n")
    print(table(["layers", "model GiB", "quantize peak RSS GiB", "of it anonymous", "quantize s",
                 "verify peak RSS GiB", "of it anonymous", "verify s"], rows))
    print(f"\nslope of the anonymous peak from {l0} to {l1} layers: quantize "
          f"{(q1 - q0) / span * 1024:.1f} MiB/layer, verify {(v1 - v0) / span * 1024:.1f} MiB/layer; "
          f"time {(t1 - t0) / span:.1f} s/layer. The rest of RSS is page cache of the mmapped "
          f"shards, which the kernel reclaims under pressure.")


if __name__ == "__main__":
    main()
