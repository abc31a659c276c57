"""moegi's CPU int4 kernels (vllm_plugins/int4_cpu.py), run for real on random AutoAWQ weights.

PyTorch's CPU int4 matmul and the large-batch tiles, on AutoAWQ-packed experts at the tiny and
at the real shapes (Swallow-MoE-4x7B, Swallow-MX-8x7B), each group size, a tensor-parallel
split: compared with dequantize-then-matmul in float32 (awq/layout.py is the independent
reference).
"""

from __future__ import annotations

import pytest
import torch

from awq.layout import dequantize, pack_gemm
from vllm_plugins import awq_cpu, int4_cpu
from vllm_plugins.int4_cpu import CPUExperts

HIDDEN, INTER, GROUP = 128, 256, 128


def _random_awq(rows: int, cols: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One AutoAWQ GEMM linear `[in=rows, out=cols]`: qweight, qzeros, fp16 scales."""
    q = torch.randint(0, 16, (rows, cols), generator=gen)
    z = torch.randint(0, 16, (rows // GROUP, cols), generator=gen)
    s = (torch.rand(rows // GROUP, cols, generator=gen) * 0.02 + 0.002).half()
    return pack_gemm(q), pack_gemm(z), s


def _experts(n: int, dtype: torch.dtype) -> tuple[CPUExperts, list[tuple[torch.Tensor, ...]],
                                                   list[tuple[torch.Tensor, ...]]]:
    gen = torch.Generator().manual_seed(0)
    w13 = [_random_awq(HIDDEN, 2 * INTER, gen) for _ in range(n)]
    w2 = [_random_awq(INTER, HIDDEN, gen) for _ in range(n)]

    def stack(ws: list[tuple[torch.Tensor, ...]], i: int) -> torch.Tensor:
        return torch.stack([w[i] for w in ws])

    experts = CPUExperts(stack(w13, 0), stack(w13, 2).to(dtype), stack(w13, 1),
                         stack(w2, 0), stack(w2, 2).to(dtype), stack(w2, 1))
    return experts, w13, w2


def _reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               w13: list[tuple[torch.Tensor, ...]], w2: list[tuple[torch.Tensor, ...]],
               dtype: torch.dtype) -> torch.Tensor:
    """Dequantize each expert, then matmul, token by token, in float32."""
    out = torch.zeros(x.shape[0], HIDDEN)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            a13 = dequantize((w13[e][0], w13[e][1], w13[e][2].to(dtype).float()))  # [2I, H]
            a2 = dequantize((w2[e][0], w2[e][1], w2[e][2].to(dtype).float()))  # [H, I]
            h = x[t].float() @ a13.t()
            act = torch.nn.functional.silu(h[:INTER]) * h[INTER:]
            out[t] += weights[t, j] * (act @ a2.t())
    return out


def run(experts: int4_cpu.CPUExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
        weight_on_input: bool = False) -> torch.Tensor:
    """One MoE layer through the pure-torch experts, as the plugin's op calls them."""
    return int4_cpu.run_experts(x, weights, ids, experts.w13, experts.w13_sz, experts.w2,
                                experts.w2_sz, weight_on_input)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_experts_match_dequantize_then_matmul(dtype: torch.dtype) -> None:
    experts, w13, w2 = _experts(4, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, HIDDEN, generator=gen).to(dtype)
    # Experts 2 and 3 receive no token at all; expert 0 and 1 receive several.
    ids = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [0, 1], [1, 0]])
    weights = torch.rand(7, 2, generator=gen).softmax(-1)
    out = run(experts, x, weights, ids)
    ref = _reference(x, weights, ids, w13, w2, dtype)
    assert out.dtype == dtype and out.shape == (7, HIDDEN)
    # The kernel computes in the activation dtype; the error is that dtype's rounding.
    assert torch.allclose(out.float(), ref, atol=0.02 * float(ref.abs().max()), rtol=0.02)
    assert torch.nn.functional.cosine_similarity(out.float().flatten(), ref.flatten(), 0) > 0.9999


def test_every_expert_and_a_single_token() -> None:
    experts, w13, w2 = _experts(4, torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    for ids in (torch.tensor([[3, 2]]), torch.tensor([[2, 3], [0, 1], [1, 2], [3, 0]])):
        x = torch.randn(ids.shape[0], HIDDEN, generator=gen).to(torch.bfloat16)
        weights = torch.rand(ids.shape, generator=gen).softmax(-1)
        ref = _reference(x, weights, ids, w13, w2, torch.bfloat16)
        out = run(experts, x, weights, ids).float()
        assert torch.allclose(out, ref, atol=0.02 * float(ref.abs().max()), rtol=0.02)


def test_router_weight_on_input() -> None:
    experts, w13, w2 = _experts(2, torch.bfloat16)
    x = torch.randn(3, HIDDEN).to(torch.bfloat16)
    ids = torch.tensor([[1], [0], [1]])
    weights = torch.tensor([[0.5], [2.0], [1.0]])
    out = run(experts, x, weights, ids, weight_on_input=True).float()
    scaled = (x.float() * weights).to(torch.bfloat16)
    ref = _reference(scaled, torch.ones(3, 1), ids, w13, w2, torch.bfloat16)
    assert torch.allclose(out, ref, atol=0.03 * float(ref.abs().max()), rtol=0.03)


def test_weights_stay_four_bit() -> None:
    experts, _, _ = _experts(4, torch.bfloat16)
    # Two weights per byte: exactly the bytes of the checkpoint's qweight tensors.
    assert experts.w13.dtype == experts.w2.dtype == torch.uint8
    assert experts.w13.numel() == 4 * HIDDEN * 2 * INTER // 2
    assert experts.w2.numel() == 4 * INTER * HIDDEN // 2


def test_packing_in_blocks_equals_packing_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4x7B expert is packed in blocks of output channels; the blocks must join exactly."""
    gen = torch.Generator().manual_seed(3)
    qweight, _, _ = _random_awq(HIDDEN, 2 * INTER, gen)
    whole = int4_cpu.to_int4pack(qweight)
    monkeypatch.setattr(int4_cpu, "_COLS_PER_CHUNK", 64)
    assert torch.equal(int4_cpu.to_int4pack(qweight), whole)


def _awq_linear(rows: int, cols: int, group: int, gen: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randint(0, 16, (rows, cols), generator=gen)
    z = torch.randint(0, 16, (rows // group, cols), generator=gen)
    s = (torch.rand(rows // group, cols, generator=gen) * 0.02 + 0.002).half()
    return pack_gemm(q), pack_gemm(z), s


@pytest.mark.parametrize(("hidden", "inter"), [(4096, 11008), (4096, 14336)])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_one_expert_at_real_shapes(hidden: int, inter: int, group: int) -> None:
    """Swallow-MoE-4x7B's (11008) and Swallow-MX-8x7B's (14336) expert shapes, at each group
    the kernels run: the plugin's pack, scales and int4 matmuls against dequantize-then-matmul."""
    gen = torch.Generator().manual_seed(group)
    w13 = _awq_linear(hidden, 2 * inter, group, gen)
    w2 = _awq_linear(inter, hidden, group, gen)
    experts = CPUExperts(w13[0][None], w13[2][None].to(torch.bfloat16), w13[1][None],
                         w2[0][None], w2[2][None].to(torch.bfloat16), w2[1][None])
    x = torch.randn(3, hidden, generator=gen).to(torch.bfloat16)
    out = run(experts, x, torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.int64)).float()
    a13 = dequantize((w13[0], w13[1], w13[2].to(torch.bfloat16).float()))  # [2I, H]
    h = x.float() @ a13.t()
    del a13
    act = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]).to(torch.bfloat16).float()
    ref = act @ dequantize((w2[0], w2[1], w2[2].to(torch.bfloat16).float())).t()
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 1e-2, rel


def test_tensor_parallel_shards_sum_to_the_unsplit_experts() -> None:
    """vLLM's tensor parallel gives each rank a slice of every expert's intermediate channels
    (w13's gate and up rows, w2's inputs) and sums the ranks' outputs; the CPU experts on each
    rank's slice must add up to the unsplit layer."""
    gen = torch.Generator().manual_seed(5)
    hidden, inter, group, ranks = 256, 512, 64, 2
    q13, z13, s13 = (torch.randint(0, 16, (hidden, 2 * inter), generator=gen),
                     torch.randint(0, 16, (hidden // group, 2 * inter), generator=gen),
                     (torch.rand(hidden // group, 2 * inter, generator=gen) * 0.02 + 0.002))
    q2, z2, s2 = (torch.randint(0, 16, (inter, hidden), generator=gen),
                  torch.randint(0, 16, (inter // group, hidden), generator=gen),
                  (torch.rand(inter // group, hidden, generator=gen) * 0.02 + 0.002))

    def layer(cols: torch.Tensor) -> CPUExperts:
        """The experts restricted to intermediate channels `cols` (gate and up alike)."""
        c13 = torch.cat([cols, cols + inter])
        rows2 = cols.reshape(-1, group)[:, 0] // group  # whole groups of w2's input
        return CPUExperts(pack_gemm(q13[:, c13])[None], s13[:, c13].to(torch.bfloat16)[None],
                          pack_gemm(z13[:, c13])[None], pack_gemm(q2[cols])[None],
                          s2[rows2].to(torch.bfloat16)[None], pack_gemm(z2[rows2])[None])

    x = torch.randn(5, hidden, generator=gen).to(torch.bfloat16)
    ids, weights = torch.zeros(5, 1, dtype=torch.int64), torch.ones(5, 1)
    whole = run(layer(torch.arange(inter)), x, weights, ids).float()
    share = inter // ranks
    parts = sum(run(layer(torch.arange(r * share, (r + 1) * share)), x, weights, ids).float()
                for r in range(ranks))
    assert torch.allclose(parts, whole, atol=0.02 * float(whole.abs().max()))
    awq_cpu.check_layer(group, "gemm", hidden, inter, ranks, False)  # and it is allowed


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_large_batch_path_equals_the_int4_kernel(group: int) -> None:
    """Above LARGE_BATCH_ROWS an expert is dequantized tile by tile from torch's int4 layout;
    the product must be the int4 kernel's (up to bfloat16 rounding), tiles and halves included."""
    gen = torch.Generator().manual_seed(group)
    n, k = 64 * 20, 512  # 20 blocks: more than one tile of _TILE_BLOCKS, and a partial one
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    sz = torch.stack([torch.rand(k // group, n, generator=gen) * 0.02 + 0.001,
                      torch.rand(k // group, n, generator=gen) * 0.1], -1).to(torch.bfloat16)
    x = torch.randn(int4_cpu.LARGE_BATCH_ROWS + 3, k, generator=gen).to(torch.bfloat16)
    ref = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz).float()
    out = int4_cpu.int4mm(x, packed, sz).float()  # rows above the threshold: dequant path
    assert float((out - ref).norm() / ref.norm()) < 5e-3
    # And from the unpacked values directly, so the layout itself is what is checked.
    w = (q.t().float().view(k // group, group, n) - 8) * sz[..., 0].float()[:, None] \
        + sz[..., 1].float()[:, None]
    exact = x.float() @ w.view(k, n)
    assert float((out - exact).norm() / exact.norm()) < 5e-3


@pytest.mark.parametrize(("k", "n", "group", "ok"), [
    (4096, 12288, 128, True), (576, 960, 64, True), (4096, 4096, 16, False),
    (4096, 80, 128, False), (4000, 4096, 128, False)])
def test_dense_shapes_torch_cannot_run_stay_on_vllms_kernel(k: int, n: int, group: int,
                                                          ok: bool) -> None:
    assert int4_cpu.runs(k, n, group) is ok


@pytest.mark.parametrize(("k", "n"), [(128, 64), (256, 1088), (576, 3072), (4096, 2048), (64, 80)])
def test_repack_writes_torchs_own_int4_layout(k: int, n: int) -> None:
    """moegi writes torch's CPU int4 layout itself (nibble arithmetic): byte for byte what
    `_convert_weight_to_int4pack_for_cpu` makes, in and across blocks of output channels, and
    through the converter for a width that is not whole 64-channel blocks."""
    q = torch.randint(0, 16, (k, n), generator=torch.Generator().manual_seed(n), dtype=torch.int32)
    torchs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.t().contiguous(), 2)
    assert torch.equal(int4_cpu.to_int4pack(pack_gemm(q)), torchs)
