"""`python -m bench.kernel`: one expert projection of the CPU plugin against bfloat16, by rows.

At the real expert shapes (Swallow-MoE-4x7B's w13 `[2 x 11008, 4096]`, Swallow-MX-8x7B's
`[2 x 14336, 4096]`), it times, in this one process and interleaved round by round:
torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`), the plugin's large-batch path (tiles
dequantized to bfloat16, then a bfloat16 matmul), and a bfloat16 `F.linear` on a resident bf16
weight (what the bf16 model does). It prints milliseconds (median of rounds) and each path's
ratio to bfloat16 per row count; the plugin's `LARGE_BATCH_ROWS` is where the second path starts
to win over the first.

    python -m bench.kernel [--rows 1,4,8,16,32,64,128,256,1024] [--rounds 5] [--shape 8x7b]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from serve import vllm_plugin

SHAPES = {"4x7b": (2 * 11008, 4096), "8x7b": (2 * 14336, 4096)}


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,4,8,16,32,64,128,256,1024")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--shape", choices=tuple(SHAPES), default="8x7b")
    p.add_argument("--group", type=int, default=128)
    a = p.parse_args(argv)
    n, k = SHAPES[a.shape]
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    sz = torch.stack([torch.rand(k // a.group, n) * 0.01 + 0.001,
                      torch.rand(k // a.group, n) * 0.01], -1).to(torch.bfloat16)
    dense = torch.randn(n, k).to(torch.bfloat16)
    del q
    print(f"w13 of {a.shape}: N {n}, K {k}, group {a.group}, {torch.get_num_threads()} threads; "
          f"ms, median of {a.rounds} rounds")
    print("| rows | int4 kernel | dequant + bf16 matmul | bf16 F.linear | int4 / bf16 | "
          "dequant / bf16 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for rows in map(int, a.rows.split(",")):
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        paths: dict[str, Callable[[], object]] = {
            "int4": functools.partial(torch.ops.aten._weight_int4pack_mm_for_cpu, x, packed,
                                      a.group, sz),
            "dequant": functools.partial(vllm_plugin._dequant_mm, x, packed, sz, a.group),
            "bf16": functools.partial(torch.nn.functional.linear, x, dense),
        }
        for fn in paths.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(a.rounds):
            for name, fn in paths.items():
                times[name].append(_time(fn))
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"| {rows} | {med['int4']:.1f} | {med['dequant']:.1f} | {med['bf16']:.1f} | "
              f"{med['int4'] / med['bf16']:.2f} | {med['dequant'] / med['bf16']:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
