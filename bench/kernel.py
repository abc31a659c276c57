"""`python -m bench.kernel`: one 4-bit projection on moegi's CPU kernels against vLLM's and bf16.

At real shapes (an expert's w13 of Swallow-MoE-4x7B `[2 x 11008, 4096]` or Swallow-MX-8x7B
`[2 x 14336, 4096]`, and the 4x7B's fused attention qkv `[12288, 4096]`), it times in this one
process, interleaved round by round, per row count (tokens multiplied at once):

- `native`: moegi's native kernel (vllm_plugins/csrc/int4.cpp), what the plugin runs;
- `torch`: the pure-torch fallback (torch's `_weight_int4pack_mm_for_cpu`, tiles from 64 rows);
- `vllm`: vLLM's own CPU AWQ kernel (`cpu_gemm_wna16`), with AMX where the CPU has it, and
  `vllm vec`, its path without AMX (what a CPU without AMX runs);
- `bf16`: `F.linear` on a resident bfloat16 weight (what the bf16 model does).

It prints milliseconds (median of rounds) and each path's ratio to bf16, then the native
kernel's weight bandwidth at 1 and 8 rows (packed bytes read per second) next to a memory-copy
bandwidth measured in the same run (bytes read plus bytes written, as STREAM counts a copy), so
the distance to the memory limit is printed.

    python -m bench.kernel [--rows 1,8,16,64,512] [--rounds 5] [--shape 4x7b-qkv]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from awq.layout import pack_gemm
from bench.models import REAL_SHAPES
from vllm_plugins import cpu_isa, int4_cpu, native


def _shapes() -> dict[str, tuple[int, int]]:
    """(N, K) of an expert's w13 per real shape, and of the 4x7B's fused attention qkv."""
    out = {name: (2 * c["intermediate_size"], c["hidden_size"]) for name, c in REAL_SHAPES.items()}
    c = REAL_SHAPES["4x7b"]
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    out["4x7b-qkv"] = (c["hidden_size"] + 2 * c["num_key_value_heads"] * head_dim, c["hidden_size"])
    return out


SHAPES = _shapes()


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def vllm_layout(q: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpacked `q [K, N]` and zeros `[K/G, N]` -> vLLM's CPUWNA16 weight and zero layout, as
    `CPUWNA16LinearKernel._process_gptq_weights_w4a16` makes them."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        pack_quantized_values_into_int32,
    )
    from vllm.scalar_type import scalar_types

    k = q.shape[0]
    w = pack_quantized_values_into_int32(q, scalar_types.uint4, 1)
    w = w.view(k, -1, 2).permute(1, 0, 2).reshape(-1, k * 2).contiguous()
    return w, pack_quantized_values_into_int32(z, scalar_types.uint4, 1).contiguous()


def copy_bandwidth(rounds: int, mib: int = 512) -> float:
    """GB/s of a large tensor copy (read + write), median of rounds: the memory's limit here."""
    src = torch.ones(mib << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() / statistics.median(_time(lambda: dst.copy_(src))
                                               for _ in range(rounds)) / 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,4,8,16,32,64,128,512")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--shape", choices=tuple(SHAPES), default="8x7b")
    p.add_argument("--group", type=int, default=128)
    a = p.parse_args(argv)
    from vllm import _custom_ops as ops

    if not native.load():
        raise SystemExit("the native kernels could not be built (see the warning above)")
    cpu_isa.register()  # ONEDNN_MAX_CPU_ISA below AMX: no AMX for vLLM's kernel either
    n, k = SHAPES[a.shape]
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    z = torch.randint(0, 16, (k // a.group, n), generator=gen, dtype=torch.int32)
    s = torch.rand(k // a.group, n, generator=gen) * 0.01 + 0.001
    nw, ns, nz = torch.ops.moegi_native.repack(pack_gemm(q), pack_gemm(z), s.half(), False)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.t().contiguous(), 2)
    sz = torch.stack([s, (8 - z.float()) * s], -1).to(torch.bfloat16)
    vw, vz = vllm_layout(q, z)
    vs = s.to(torch.bfloat16)
    dense = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    del q
    amx = "amx" if torch.cpu._is_amx_tile_supported() else "vec"
    copy = copy_bandwidth(a.rounds)
    print(f"{a.shape}: N {n}, K {k}, group {a.group}, {torch.get_num_threads()} threads, native "
          f"{native.isa()}, vLLM kernel {amx}; memory copy {copy:.1f} GB/s; ms, median of "
          f"{a.rounds} rounds (ratio to bf16)")
    names = ["native", "torch", "vllm", "vllm vec", "bf16"]
    print("| rows | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    bandwidth: dict[int, float] = {}
    for rows in map(int, a.rows.split(",")):
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        paths: dict[str, Callable[[], object]] = {
            "native": functools.partial(torch.ops.moegi_native.linear, x, nw, ns, nz, None),
            "torch": functools.partial(int4_cpu.int4mm, x, packed, sz),
            "vllm": functools.partial(ops.cpu_gemm_wna16, x, vw, vs, vz, None, 8, amx),
            "vllm vec": functools.partial(ops.cpu_gemm_wna16, x, vw, vs, vz, None, 8, "vec"),
            "bf16": functools.partial(torch.nn.functional.linear, x, dense),
        }
        for fn in paths.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(a.rounds):
            for name, fn in paths.items():
                times[name].append(_time(fn))
        med = {name: statistics.median(t) for name, t in times.items()}
        bandwidth[rows] = (nw.numel() + ns.numel() * 2 + nz.numel()) / med["native"] / 1e6
        cells = [f"{med[name]:.2f} ({med[name] / med['bf16']:.2f}x)" for name in names]
        print(f"| {rows} | " + " | ".join(cells) + " |", flush=True)
    for rows in (1, 8):
        if rows in bandwidth:
            print(f"native kernel at {rows} row(s): {bandwidth[rows]:.1f} GB/s of packed weight "
                  f"read, {bandwidth[rows] / copy:.0%} of the copy bandwidth")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
