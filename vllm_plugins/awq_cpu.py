"""moegi's vLLM hook for 4-bit AutoAWQ layers on x86 CPUs (the kernels are `int4_cpu.py`).

vLLM loads it in every one of its processes (entry point `vllm.general_plugins` ->
`vllm_plugins.awq_cpu:register`, declared in pyproject.toml). On CPUs only, it wraps
`AutoAWQConfig.get_quant_method`:

- **MoE experts**, where vLLM has no backend: on an x86 CPU without AMX, vLLM 0.32 has no WNA16
  MoE kernel for AutoAWQ GEMM checkpoints (`CPUExpertsInt4` needs AMX tiles, the zentorch
  backend takes symmetric weights only), so `AutoAWQMoEMethod.__init__` raises in
  `select_wna16_moe_backend`. The hook asks vLLM's own oracle first and answers only that case
  (or every case with `MOEGI_CPU_MOE=plugin`, which `make bench-moe` uses on AMX hosts).
  Weight creation and loading stay vLLM's; after loading, the experts are repacked once into
  torch's CPU int4 layout, replacing the loaded tensors. A loop over the experts that received
  tokens cannot be traced by torch.compile (vLLM calls the MoE layer inline in the model it
  compiles), so it runs as the custom op `torch.ops.moegi.awq_moe_cpu`.
- **Dense 4-bit linears** (attention, dense models) where vLLM's kernel is slow: without AMX
  tiles (or in float16) vLLM runs them on `cpu_gemm_wna16`'s generic path. At Swallow-MoE-4x7B's
  fused qkv (N 12288, K 4096) on this 2-core CPU (`python -m bench.kernel --shape 4x7b-qkv`,
  ms): 6.9 / 11.3 / 18.3 / 410 at 1 / 8 / 16 / 512 rows, against moegi's 1.6 / 6.0 / 12.7 / 48.
  With AMX and bfloat16, vLLM's default W4A8 AMX kernel (`int4_scaled_mm_cpu`) wins at every
  row count (1.1 / 3.6 / 4.6 / 47), so the layer stays vLLM's (`vllm_has_fast_linear`). Through
  the custom op `torch.ops.moegi.awq_linear_cpu`.

Written against vLLM 0.32.0 (`TESTED_VLLM`). The internals it relies on, each checked by
tests/vllm_plugins/test_awq_cpu.py so that an upgrade fails a test before it fails a user:
- `vllm.model_executor.layers.quantization.auto_awq`: `AutoAWQConfig.get_quant_method(layer,
  prefix)`, `AutoAWQConfig.{weight_bits, group_size, zero_point, modules_to_not_convert}`,
  `AutoAWQMoEMethod` (its `create_weights` registers `w13_qweight [E, H, 2I/8]`,
  `w13_scales [E, H/G, 2I]`, `w13_qzeros [E, H/G, 2I/8]`, `w2_qweight [E, I, H/8]`,
  `w2_scales [E, I/G, H]`, `w2_qzeros [E, I/G, H/8]`, AutoAWQ-packed along the output dim), and
  `AutoAWQMarlinLinearMethod` (`create_weights(layer, input_size_per_partition,
  output_partition_sizes, input_size, output_size, params_dtype)` registers `qweight`, `qzeros`,
  `scales` in AutoAWQ's layout, which its `process_weights_after_loading` converts);
- `fused_moe.oracle.int_wna16.select_wna16_moe_backend` (raises NotImplementedError when no
  backend fits) and `quantization.utils.quant_utils.kInt4Static`;
- `fused_moe.RoutedExperts`, `FusedMoEMethodBase.apply(layer, x, topk_weights, topk_ids,
  shared_experts, shared_experts_input)` for modular (router-first) methods, and
  `RoutedExperts.{activation, apply_router_weight_on_input, moe_config}`;
- `vllm.utils.torch_utils.direct_register_custom_op(op_name, op_func, fake_impl=, target_lib=)`.
Shapes follow the legend in `int4_cpu.py`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from awq.widths import tensor_parallel_fits, whole_groups
from vllm_plugins import native
from vllm_plugins.int4_cpu import (
    KERNEL_GROUPS,
    CPUExperts,
    int4mm,
    log,
    run_experts,
    runs,
    to_int4pack,
    to_scales_and_zeros,
)

TESTED_VLLM = ("0.32.0",)


class UnsupportedLayer(ValueError):
    """A checkpoint or split the CPU experts cannot run, found before any weight is loaded."""


def check_layer(group_size: int, version: str, hidden: int, intermediate: int, tp_size: int,
                use_ep: bool) -> None:
    """Refuse, at construction (before the load), what would otherwise fail at warm-up inside
    the kernel, with a message naming the fix. `intermediate` is the whole expert's width; a
    tensor-parallel rank holds `intermediate / tp_size` of it, which the groups must tile."""
    if version.lower() != "gemm":
        raise UnsupportedLayer(f"AWQ version {version!r}: moegi's CPU experts read the GEMM layout "
                               "only (quantize the model again with moegi-quantize, which writes "
                               "version gemm)")
    if group_size not in KERNEL_GROUPS:
        raise UnsupportedLayer(f"AWQ group size {group_size}: the CPU int4 kernel runs group sizes "
                               f"{', '.join(map(str, KERNEL_GROUPS))} only; quantize again with "
                               "moegi-quantize --group-size 128 (or 64, 32)")
    if use_ep:
        raise UnsupportedLayer("moegi's CPU AWQ MoE experts do not support expert parallelism: "
                               "leave --enable-expert-parallel out (tensor or pipeline parallel "
                               "split the experts instead)")
    if hidden % group_size:
        raise UnsupportedLayer(f"hidden size {hidden} is not a multiple of the AWQ group size "
                               f"{group_size}")
    if not whole_groups(intermediate, group_size, tp_size):
        fits = tensor_parallel_fits([intermediate], group_size, tp_size)
        raise UnsupportedLayer(
            f"--tensor-parallel-size {tp_size} gives each rank {intermediate / tp_size:g} of the "
            f"experts' {intermediate} intermediate channels, not a whole number of AWQ groups of "
            f"{group_size}: use --tensor-parallel-size {' or '.join(map(str, fits))}, or "
            "--pipeline-parallel-size to split by layers")


def _run_experts_fake(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      w13: torch.Tensor, w13_sz: torch.Tensor, w2: torch.Tensor,
                      w2_sz: torch.Tensor, weight_on_input: bool) -> torch.Tensor:
    return torch.empty_like(x)


def awq_linear(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x `[..., K]` @ one dense linear in torch's int4 layout (`w [N, K/2]`, `sz [K/G, N, 2]`)
    -> `[..., N]`. A custom op: `int4mm` chooses its path by the number of rows, which must
    happen at run time, not once when vLLM traces the model with a symbolic batch size."""
    x2 = x.reshape(-1, x.shape[-1])
    out = int4mm(x2.to(torch.bfloat16), w, sz)
    if bias is not None:
        out = out + bias
    return out.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def _awq_linear_fake(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


_OP_LIB: Any = None  # the torch.library that owns moegi's ops (kept alive here)
_LOGGED: set[str] = set()  # log lines written once per process


def _once(key: str, message: str, *args: object) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info(message, *args)


def _register_ops() -> None:
    """Define `torch.ops.moegi.awq_moe_cpu` and `awq_linear_cpu` once per process, as vLLM
    defines its own ops."""
    global _OP_LIB
    if _OP_LIB is not None:
        return
    from torch.library import Library
    from vllm.utils.torch_utils import direct_register_custom_op

    _OP_LIB = Library("moegi", "FRAGMENT")  # type: ignore[no-untyped-call]
    direct_register_custom_op("awq_moe_cpu", run_experts, fake_impl=_run_experts_fake,
                              target_lib=_OP_LIB)
    direct_register_custom_op("awq_linear_cpu", awq_linear, fake_impl=_awq_linear_fake,
                              target_lib=_OP_LIB)


def vllm_has_fast_linear(params_dtype: torch.dtype) -> bool:
    """Whether vLLM's own CPU AWQ linear kernel is the fast one here: with AMX tiles and bfloat16
    it quantizes activations to int8 and multiplies on AMX (`int4_scaled_mm_cpu`, its default
    `VLLM_CPU_INT4_W4A8`), ahead of torch's int4 kernel at every row count; without them it
    takes a generic path that moegi's int4 kernels beat (figures in this module's docstring)."""
    from vllm import envs

    return (bool(torch.cpu._is_amx_tile_supported()) and params_dtype == torch.bfloat16
            and bool(envs.VLLM_CPU_INT4_W4A8))


def _replace_parameters(layer: torch.nn.Module, emptied: tuple[str, ...],
                        **tensors: torch.Tensor) -> None:
    """The repacked tensors replace the loaded ones as the layer's parameters: one 4-bit copy,
    and parameters (not attributes of a Python object) so that torch.compile sees them. The
    `emptied` ones (the zero points, folded into the kernels' scales) become empty tensors."""
    for name in emptied:
        tensors[name] = torch.empty(0, dtype=torch.int32)
    for name, value in tensors.items():
        layer.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))


def dense_kernel(in_features: int, out_features: int, group_size: int, take: bool) -> str | None:
    """Which of moegi's kernels runs a dense 4-bit linear: "native" (csrc/int4.cpp), "torch"
    (int4_cpu.py, where the native ones cannot be built or the shape is not theirs), or None
    (vLLM's own kernel keeps it)."""
    if not take:
        return None
    if native.runs(in_features, out_features, group_size) and native.load():
        return "native"
    return "torch" if runs(in_features, out_features, group_size) else None


def _linear_class(force: bool) -> type:
    """vLLM's CPU AWQ linear method (its weights and loader) with moegi's int4 kernels."""
    from vllm.model_executor.layers.quantization.auto_awq import AutoAWQMarlinLinearMethod

    class MoegiCPUAWQLinearMethod(AutoAWQMarlinLinearMethod):  # type: ignore[misc]
        """A dense AutoAWQ linear on CPU through moegi's int4 kernels, where they are faster
        than vLLM's and run the shape; else vLLM's method, unchanged."""

        def create_weights(self, layer: Any, input_size_per_partition: int,
                           output_partition_sizes: list[int], input_size: int,
                           output_size: int, params_dtype: torch.dtype, **extra: Any) -> None:
            super().create_weights(layer, input_size_per_partition, output_partition_sizes,
                                   input_size, output_size, params_dtype, **extra)
            layer.moegi_kernel = dense_kernel(
                input_size_per_partition, sum(output_partition_sizes),
                self.quant_config.group_size, force or not vllm_has_fast_linear(params_dtype))
            if layer.moegi_kernel:
                _once("dense", "moegi: dense 4-bit AWQ linears go to moegi's %s int4 kernel "
                      "(vLLM's CPU kernel has no AMX path for them here)",
                      f"native ({native.isa()})" if layer.moegi_kernel == "native" else "torch")

        def process_weights_after_loading(self, layer: Any) -> None:
            if layer.moegi_kernel is None:
                super().process_weights_after_loading(layer)
            elif layer.moegi_kernel == "native":
                w, s, z = torch.ops.moegi_native.repack(layer.qweight.data, layer.qzeros.data,
                                                        layer.scales.data, False)
                _replace_parameters(layer, (), qweight=w, scales=s, qzeros=z)
                # After the repack only moegi's kernel can read the layer: this line says which
                # kernel runs, where the one above says which was chosen.
                _once("dense-native", "moegi: dense 4-bit AWQ linears repacked for moegi's "
                      "native kernel (%s)", native.isa())
            else:
                w = to_int4pack(layer.qweight.data)
                sz = to_scales_and_zeros(layer.scales.data, layer.qzeros.data)
                _replace_parameters(layer, ("qzeros",), qweight=w, scales=sz)

        def apply(self, layer: Any, x: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
            out: torch.Tensor
            if layer.moegi_kernel is None:
                out = super().apply(layer, x, bias)
            elif layer.moegi_kernel == "native":
                out = torch.ops.moegi_native.linear(x, layer.qweight, layer.scales, layer.qzeros,
                                                    bias)
            else:
                out = torch.ops.moegi.awq_linear_cpu(x, layer.qweight, layer.scales, bias)
            return out

    return MoegiCPUAWQLinearMethod


def _method_class() -> type:
    """`AutoAWQMoEMethod` with vLLM's weights and loader, and our expert computation."""
    from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.quantization.auto_awq import AutoAWQMoEMethod
    from vllm.scalar_type import scalar_types

    class MoegiCPUAWQMoEMethod(AutoAWQMoEMethod):  # type: ignore[misc]
        """AutoAWQ MoE on CPU through moegi's experts (vLLM found no backend here)."""

        def __init__(self, quant_config: Any, moe: Any) -> None:
            # Skip AutoAWQMoEMethod.__init__: its backend selection is what fails here.
            FusedMoEMethodBase.__init__(self, moe)
            self.quant_config = quant_config
            self.quant_type = scalar_types.uint4
            self.input_dtype = None
            self.use_marlin = False
            self.processed = False
            if moe.activation != MoEActivation.SILU:
                raise NotImplementedError(f"moegi's CPU AWQ MoE experts support SiLU only, "
                                          f"not {moe.activation}")
            check_layer(quant_config.group_size,
                        str(quant_config.full_config.get("version", "gemm")), moe.hidden_dim,
                        moe.intermediate_size, moe.tp_size, moe.moe_parallel_config.use_ep)

        def process_weights_after_loading(self, layer: Any) -> None:
            experts, hidden, inter8 = layer.w13_qweight.shape
            self.native = native.runs_experts(hidden, inter8 * 4, self.quant_config.group_size) \
                and native.load()
            if self.native:
                self._pack_native(layer, experts)
                _once("moe-native", "moegi: 4-bit AWQ experts repacked for moegi's native "
                      "MoE kernel (%s)", native.isa())
            else:
                packed = CPUExperts(layer.w13_qweight.data, layer.w13_scales.data,
                                    layer.w13_qzeros.data, layer.w2_qweight.data,
                                    layer.w2_scales.data, layer.w2_qzeros.data)
                _replace_parameters(layer, ("w13_qzeros", "w2_qzeros"), w13_qweight=packed.w13,
                                    w13_scales=packed.w13_sz, w2_qweight=packed.w2,
                                    w2_scales=packed.w2_sz)
            self.processed = True

        @staticmethod
        def _pack_native(layer: Any, experts: int) -> None:
            """Each expert repacked once (one at a time: bounded temporary memory), gate and up
            blocks interleaved so the op computes SiLU(gate) * up block by block."""
            packed: dict[str, list[torch.Tensor]] = {}
            for e in range(experts):
                for w, interleave in (("w13", True), ("w2", False)):
                    parts = torch.ops.moegi_native.repack(
                        getattr(layer, f"{w}_qweight").data[e],
                        getattr(layer, f"{w}_qzeros").data[e],
                        getattr(layer, f"{w}_scales").data[e], interleave)
                    for leaf, t in zip(("qweight", "scales", "qzeros"), parts, strict=True):
                        packed.setdefault(f"{w}_{leaf}", []).append(t)
            _replace_parameters(layer, (), **{k: torch.stack(v) for k, v in packed.items()})

        def get_fused_moe_quant_config(self, layer: Any) -> Any:
            return None  # no modular kernel: the experts are computed in `apply`

        def apply(self, layer: Any, x: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, shared_experts: Any,
                  shared_experts_input: torch.Tensor | None) -> torch.Tensor:
            assert self.processed, "weights were not processed after loading"
            # Shared experts (Qwen2-MoE) are not ours to run: vLLM's MoE runner has run them
            # already (SharedExpertsOrder.NO_OVERLAP) and adds their output to ours; it passes
            # them for modular kernels that overlap them with the routed ones.
            del shared_experts, shared_experts_input
            on_input = bool(layer.apply_router_weight_on_input)
            out: torch.Tensor
            if self.native:
                out = torch.ops.moegi_native.moe(
                    x, topk_weights, topk_ids, layer.w13_qweight, layer.w13_scales,
                    layer.w13_qzeros, layer.w2_qweight, layer.w2_scales, layer.w2_qzeros,
                    on_input)
            else:
                out = torch.ops.moegi.awq_moe_cpu(
                    x, topk_weights, topk_ids, layer.w13_qweight, layer.w13_scales,
                    layer.w2_qweight, layer.w2_scales, on_input)
            return out

    return MoegiCPUAWQMoEMethod


def vllm_has_backend(quant_config: Any, moe_config: Any) -> bool:
    """Whether vLLM itself can run this layer on this (CPU) host. `AutoAWQConfig.get_quant_method`
    first asks whether the layer's shape suits Marlin; when it does not (SmolLM2's hidden 576 at
    group 64), vLLM falls back to its MoE WNA16 kernels, which need a GPU; when it does,
    `AutoAWQMoEMethod` asks the WNA16 MoE oracle for a backend."""
    from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import select_wna16_moe_backend
    from vllm.model_executor.layers.quantization.utils.marlin_utils import (
        check_moe_marlin_supports_config,
    )
    from vllm.model_executor.layers.quantization.utils.quant_utils import kInt4Static

    if not check_moe_marlin_supports_config(moe_config, quant_config.group_size,
                                            allow_tile_padding=True):
        return False
    try:
        select_wna16_moe_backend(moe_config, kInt4Static, quant_config=quant_config,
                                 may_have_zp=quant_config.zero_point, may_have_bias=True,
                                 allow_tile_padding=True)
    except NotImplementedError:
        return False
    return True


# `MOEGI_CPU_MOE=plugin` runs moegi's experts even where vLLM has a CPU backend of its own (AMX):
# `make bench-moe` measures with it, on an AMX host, what hosts without AMX get. Read from the
# environment because the plugin runs inside vLLM's engine processes, which inherit it.
CPU_MOE_ENV = "MOEGI_CPU_MOE"
CPU_MOE_MODES = ("auto", "plugin")


def forced() -> bool:
    """Whether the environment asks for moegi's experts wherever the plugin can run."""
    mode = os.environ.get(CPU_MOE_ENV, "auto")
    if mode not in CPU_MOE_MODES:
        raise ValueError(f"{CPU_MOE_ENV}={mode!r}: use one of {', '.join(CPU_MOE_MODES)}")
    return mode == "plugin"


def register() -> None:
    """Entry point (`vllm.general_plugins`): hook AutoAWQ's MoE method on CPUs only.

    vLLM may call it more than once per process; the hook is installed once.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return  # CUDA and the rest: vLLM's kernels (Marlin MoE)
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig
    from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped

    original = AutoAWQConfig.get_quant_method
    if getattr(original, "_moegi_hook", False):
        return
    _register_ops()
    force = forced()
    method_class, linear_class = _method_class(), _linear_class(force)

    def get_quant_method(self: Any, layer: torch.nn.Module, prefix: str) -> Any:
        if (isinstance(layer, RoutedExperts) and self.weight_bits == 4
                and not is_layer_skipped(prefix, self.modules_to_not_convert or [],
                                         match_mode="substring")
                and (force or not vllm_has_backend(self, layer.moe_config))):
            log.info("moegi: 4-bit AWQ experts of %s run on moegi's CPU kernel (%s; %s)", prefix,
                     f"native, {native.isa()}" if native.load() else "torch's int4 kernel",
                     f"{CPU_MOE_ENV}=plugin" if force else
                     "vLLM has no WNA16 MoE backend on this CPU")
            return method_class(self, layer.moe_config)
        method = original(self, layer, prefix)
        if type(method).__name__ == "AutoAWQMarlinLinearMethod" and self.weight_bits == 4:
            return linear_class(self)  # a dense 4-bit linear (the 16-bit ones stay vLLM's)
        return method

    get_quant_method._moegi_hook = True  # type: ignore[attr-defined]
    get_quant_method._moegi_original = original  # type: ignore[attr-defined]
    AutoAWQConfig.get_quant_method = get_quant_method  # type: ignore[method-assign]
