"""moegi's native int4 kernels (vllm_plugins/csrc/int4.cpp) against two references:

- the kernels' own arithmetic done in float64 (activations quantized to int8 per 32 inputs as
  the kernel does, integer dot products, the scales folded per block and group): equal to
  rounding, so a misplaced nibble, scale or zero point fails by orders of magnitude;
- a float32 dequantize-then-matmul and the pure-torch kernels (int4_cpu.py), within what int8
  activations cost.

At every real K of the seed models (4096, 5120, 11008, 13824, 14336), groups 32 to 256, 1 to
2,048 rows, 1 or 2 threads, on every instruction set the dispatcher has (each in its own process,
as the choice is made once per process), and the fallback without a compiler.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from awq.layout import dequantize, pack_gemm
from vllm_plugins import int4_cpu, native

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert native.load(), "the native kernels did not build (a C++ compiler is on this machine)"


def awq(k: int, n: int, group: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
    """Random AutoAWQ GEMM tensors (qweight, qzeros, float16 scales)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    z = torch.randint(0, 16, (k // group, n), generator=gen, dtype=torch.int32)
    s = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.001).half()
    return pack_gemm(q), pack_gemm(z), s


def quantized_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation quantization: per row and 32 inputs, absmax over the width's
    largest integer (int8 for bfloat16 inputs, int16 for float16 and float32 ones), rounded to
    nearest even, in float32."""
    top = 127.0 if x.dtype == torch.bfloat16 else 32767.0
    m, k = x.shape
    xb = x.float().view(m, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(top) / amax, torch.zeros(()))
    return torch.round(xb * inv), amax / top


def kernel_arithmetic(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                      scales: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in float64: sum_g s (sum_b d_b sum xq q - z sum_b d_b sum xq)."""
    from awq.layout import unpack_gemm

    q = unpack_gemm(qweight).double()  # [K, N]
    z = unpack_gemm(qzeros).double()  # [K/G, N]
    k, n = q.shape
    group = k // z.shape[0]
    xq, d = quantized_rows(x)  # [M, K/32, 32], [M, K/32, 1]
    blocks = torch.einsum("mbi,bin->mbn", xq.double(), q.view(k // 32, 32, n)) * d.double()
    per_group = blocks.view(x.shape[0], k // group, group // 32, n).sum(2)  # [M, K/G, N]
    zsum = (xq.sum(-1, keepdim=True).double() * d.double()).view(
        x.shape[0], k // group, group // 32).sum(-1)  # [M, K/G]
    out = (scales.double() * (per_group - z * zsum[..., None])).sum(1)
    return out


@pytest.mark.parametrize(("k", "group"), [(4096, 128), (5120, 32), (11008, 64), (13824, 256),
                                          (14336, 128)])
@pytest.mark.parametrize("rows", [1, 3, 8, 67])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_is_the_kernels_arithmetic_at_real_widths(k: int, group: int, rows: int,
                                                         dtype: torch.dtype) -> None:
    """int8 rows for bfloat16 input, int16 rows for float32, each to float32 rounding."""
    qw, qz, s = awq(k, 128, group, seed=k + rows)
    w, ps, pz = torch.ops.moegi_native.repack(qw, qz, s, False)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
    out = torch.ops.moegi_native.linear(x, w, ps, pz, None)
    expected = kernel_arithmetic(x, qw, qz, s)
    assert out.dtype == dtype and out.shape == (rows, 128)
    tolerance = 5e-3 if dtype == torch.bfloat16 else 1e-5  # the output's own rounding
    assert float((out.double() - expected).norm() / expected.norm()) < tolerance


@pytest.mark.parametrize(("dtype", "bound"), [(torch.bfloat16, 1e-2), (torch.float16, 1e-3),
                                              (torch.float32, 1e-4)])
def test_the_activation_width_follows_the_dtype(dtype: torch.dtype, bound: float) -> None:
    """Against float32 dequantize-then-matmul: int8 activations cost about 0.5% of the output's
    norm (bfloat16 itself rounds to 0.4%); int16 ones, for a model served in float16 or float32,
    next to nothing."""
    qw, qz, s = awq(4096, 256, 128, seed=5)
    w, ps, pz = torch.ops.moegi_native.repack(qw, qz, s, False)
    x = torch.randn(6, 4096, generator=torch.Generator().manual_seed(6)).to(dtype)
    out = torch.ops.moegi_native.linear(x, w, ps, pz, None).float()
    expected = x.float() @ dequantize((qw, qz, s)).t()
    assert float((out - expected).norm() / expected.norm()) < bound


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 5, 64, 2048])
def test_linear_matches_dequantize_then_matmul(rows: int, threads: int) -> None:
    """Within what int8 activations cost (about 0.5% of the output's norm), for any row count
    and thread count, with a bias and `[B, T, K]` input, in the input's dtype."""
    k, n, group = 1024, 192, 64
    qw, qz, s = awq(k, n, group, seed=rows)
    w, ps, pz = torch.ops.moegi_native.repack(qw, qz, s, False)
    gen = torch.Generator().manual_seed(threads)
    x = torch.randn(1, rows, k, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.ops.moegi_native.linear(x, w, ps, pz, bias)
    finally:
        torch.set_num_threads(before)
    expected = x.float() @ dequantize((qw, qz, s)).t() + bias
    assert out.shape == (1, rows, n) and out.dtype == torch.bfloat16
    assert float((out.float() - expected).norm() / expected.norm()) < 1e-2


def test_a_row_gets_the_same_output_alone_or_in_a_batch() -> None:
    """Batch invariance: each row is quantized and summed on its own."""
    qw, qz, s = awq(512, 128, 128)
    w, ps, pz = torch.ops.moegi_native.repack(qw, qz, s, False)
    x = torch.randn(37, 512).to(torch.bfloat16)
    batch = torch.ops.moegi_native.linear(x, w, ps, pz, None)
    for r in (0, 5, 36):
        assert torch.equal(torch.ops.moegi_native.linear(x[r:r + 1], w, ps, pz, None)[0], batch[r])


def experts(e: int, hidden: int, inter: int, group: int) -> dict[str, torch.Tensor]:
    """AutoAWQ expert stacks as vLLM holds them: w13 [E, H, 2I/8] (gate, then up), w2 [E, I, H/8]."""
    w13 = [awq(hidden, 2 * inter, group, seed=i) for i in range(e)]
    w2 = [awq(inter, hidden, group, seed=100 + i) for i in range(e)]
    return {"w13_qweight": torch.stack([t[0] for t in w13]),
            "w13_qzeros": torch.stack([t[1] for t in w13]),
            "w13_scales": torch.stack([t[2] for t in w13]),
            "w2_qweight": torch.stack([t[0] for t in w2]),
            "w2_qzeros": torch.stack([t[1] for t in w2]),
            "w2_scales": torch.stack([t[2] for t in w2])}


def moe_native(t: dict[str, torch.Tensor], x: torch.Tensor, weights: torch.Tensor,
               ids: torch.Tensor, on_input: bool = False) -> torch.Tensor:
    packed: dict[str, list[torch.Tensor]] = {}
    for e in range(t["w13_qweight"].shape[0]):
        for w, interleave in (("w13", True), ("w2", False)):
            parts = torch.ops.moegi_native.repack(t[f"{w}_qweight"][e], t[f"{w}_qzeros"][e],
                                                  t[f"{w}_scales"][e], interleave)
            for leaf, v in zip(("qweight", "scales", "qzeros"), parts, strict=True):
                packed.setdefault(f"{w}_{leaf}", []).append(v)
    p = {k: torch.stack(v) for k, v in packed.items()}
    out: torch.Tensor = torch.ops.moegi_native.moe(
        x, weights, ids, p["w13_qweight"], p["w13_scales"], p["w13_qzeros"], p["w2_qweight"],
        p["w2_scales"], p["w2_qzeros"], on_input)
    return out


def moe_reference(t: dict[str, torch.Tensor], x: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor, on_input: bool = False) -> torch.Tensor:
    """float32, expert by expert, from the dequantized AutoAWQ tensors."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    inter = t["w2_qweight"].shape[1]
    for m in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e, w = int(ids[m, j]), float(weights[m, j])
            xe = x[m].float() * (w if on_input else 1.0)
            h = xe @ dequantize((t["w13_qweight"][e], t["w13_qzeros"][e], t["w13_scales"][e])).t()
            act = torch.nn.functional.silu(h[:inter]) * h[inter:]
            y = act @ dequantize((t["w2_qweight"][e], t["w2_qzeros"][e], t["w2_scales"][e])).t()
            out[m] += y if on_input else w * y
    return out


@pytest.mark.parametrize(("e", "hidden", "inter", "group", "tokens"), [
    (4, 128, 256, 32, 1), (4, 128, 256, 32, 9), (8, 576, 1536, 64, 5), (4, 512, 1024, 128, 70)])
def test_moe_layer_matches_the_reference(e: int, hidden: int, inter: int, group: int,
                                         tokens: int) -> None:
    """One call for the whole layer: routing, gate and up, SiLU, down, weighted sum; experts
    that received no token cost nothing. Two int8 quantizations (the input, the activation):
    within 2% of the output's norm."""
    t = experts(e, hidden, inter, group)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    weights, ids = torch.topk(torch.softmax(torch.randn(tokens, e, generator=gen), -1), 2)
    out = moe_native(t, x, weights, ids.to(torch.int32))
    expected = moe_reference(t, x, weights, ids)
    assert out.dtype == torch.bfloat16
    assert float((out.float() - expected).norm() / expected.norm()) < 2e-2


def test_router_weight_on_input_and_one_expert_per_token() -> None:
    t = experts(4, 128, 128, 64)
    x = torch.randn(6, 128)
    weights, ids = torch.rand(6, 1), torch.tensor([[3], [3], [0], [3], [1], [3]])
    out = moe_native(t, x, weights, ids, on_input=True)
    expected = moe_reference(t, x, weights, ids, on_input=True)
    assert float((out - expected).norm() / expected.norm()) < 2e-2


def test_expert_ids_out_of_range_are_refused() -> None:
    t = experts(2, 128, 128, 64)
    with pytest.raises(RuntimeError, match="expert id 5 out of range"):
        moe_native(t, torch.randn(1, 128), torch.ones(1, 1), torch.tensor([[5]]))


def test_the_native_kernel_agrees_with_the_pure_torch_one() -> None:
    """The fallback (bfloat16 activations) and the native kernel (int8), both near float32."""
    qw, qz, s = awq(4096, 256, 128)
    w, ps, pz = torch.ops.moegi_native.repack(qw, qz, s, False)
    x = torch.randn(8, 4096).to(torch.bfloat16)
    ours = torch.ops.moegi_native.linear(x, w, ps, pz, None).float()
    fallback = int4_cpu.int4mm(x, int4_cpu.to_int4pack(qw), int4_cpu.to_scales_and_zeros(s, qz)).float()
    assert float((ours - fallback).norm() / fallback.norm()) < 1e-2


@pytest.mark.parametrize(("k", "n", "group", "takes"), [
    (4096, 12288, 128, True), (576, 960, 64, True), (128, 80, 32, False), (4096, 4096, 16, False),
    (100, 128, 50, False)])
def test_the_shapes_the_native_kernels_take(k: int, n: int, group: int, takes: bool) -> None:
    assert native.runs(k, n, group) is takes


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_every_instruction_set_computes_the_same(isa: str) -> None:
    """MOEGI_NATIVE_ISA holds the dispatcher below what this CPU has: the AVX2 and scalar paths
    agree with the kernel's arithmetic as the AVX-512 one does (checked in a fresh process, since
    the choice is made once per process)."""
    code = (
        "import torch\n"
        "from tests.vllm_plugins.test_native import awq, kernel_arithmetic\n"
        "from vllm_plugins import native\n"
        "assert native.load()\n"
        "qw, qz, s = awq(1024, 192, 64, seed=3)\n"
        "w, ps, pz = torch.ops.moegi_native.repack(qw, qz, s, False)\n"
        "errs = []\n"
        "for dtype in (torch.bfloat16, torch.float32):\n"
        "    x = torch.randn(5, 1024).to(dtype)\n"
        "    out = torch.ops.moegi_native.linear(x, w, ps, pz, None).double()\n"
        "    ref = kernel_arithmetic(x, qw, qz, s)\n"
        "    errs.append(float((out - ref).norm() / ref.norm()))\n"
        "print(native.isa(), *errs)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "MOEGI_NATIVE_ISA": isa}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    name, int8_error, int16_error = done.stdout.split()
    assert name == isa and float(int8_error) < 5e-3 and float(int16_error) < 1e-5


def test_without_a_compiler_the_pure_torch_kernels_run(tmp_path: Path) -> None:
    """A machine without g++: one warning, and the plugin's layers take the torch path."""
    code = (
        "from vllm_plugins import native, awq_cpu\n"
        "print(native.load(), awq_cpu.dense_kernel(4096, 4096, 128, True))\n")
    env = {**os.environ, "MOEGI_CACHE": str(tmp_path), "CXX": str(tmp_path / "no-such-g++"),
           "PATH": "/nonexistent"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "torch"]
    assert done.stderr.count("native int4 kernels could not be built") == 1
