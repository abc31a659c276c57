"""moegi's int4 kernels for CPUs: AutoAWQ weights in PyTorch's CPU int4 layout, and their matmuls.

Pure torch (no vLLM import), so the benchmarks and unit tests run them without an engine; the
vLLM hook that puts them into served layers is `awq_cpu.py`.

Shapes, one legend for this package: E experts, H hidden size, I an expert's intermediate size
(per tensor-parallel rank), K input and N output channels of one linear, G the AWQ group size,
M rows (tokens) multiplied at once. AutoAWQ stores a linear as `qweight [K, N/8]` and
`qzeros [K/G, N/8]` (int32, eight nibbles per word along N, `awq/layout.py`) and
`scales [K/G, N]`; MoE experts stack them: `w13 [E, H, 2I/8]`, `w2 [E, I, H/8]`.

The kernel is PyTorch's `aten._weight_int4pack_mm_for_cpu` (the one gpt-fast and torchao use,
AVX-512 vectorized for bfloat16 activations), on weights repacked once at load into the layout
of `aten._convert_weight_to_int4pack_for_cpu` (`to_int4pack`), `[N, K/2]` uint8, with a bfloat16
scale and zero per group, `[K/G, N, 2]`. It reads and dequantizes the whole weight again for every 4 rows, so
from `LARGE_BATCH_ROWS` rows on the same bytes are dequantized tile by tile into bfloat16 and
multiplied by a bfloat16 matmul instead. The weights stay 4-bit at rest: a tile is transient.
"""

from __future__ import annotations

import logging

import torch

from awq.layout import PACK, unpack_gemm

# Under "vllm." so that vLLM's own logging set-up prints it in its engine processes too.
log = logging.getLogger("vllm.moegi_plugin")

# Group sizes PyTorch's CPU int4 kernel runs ("expect qGroupSize to be 32, 64, 128 or 256").
KERNEL_GROUPS = (32, 64, 128, 256)
BLOCK_N = 64  # output channels per block of torch's CPU int4 layout
_COLS_PER_CHUNK = 1024  # output channels per packing step: a multiple of BLOCK_N

# Rows (tokens routed to one expert) from which dequantizing the expert tile by tile and running
# a bfloat16 matmul beats torch's int4 kernel. Measured by `python -m bench.kernel` at the 8x7B
# w13 shape (N 28672, K 4096) on this project's 2-core AVX-512 CPU (ms, median of 3): int4
# kernel 60 at 32 rows, 114 at 64, 478 at 256; the tiled path 125, 86, 95; a resident bf16
# weight's F.linear 16, 18, 39.
LARGE_BATCH_ROWS = 64
_TILE_BLOCKS = 16  # blocks dequantized at once: a [K, 1024] bfloat16 tile, 8 MiB at K 4096


def to_int4pack(qweight: torch.Tensor) -> torch.Tensor:
    """One AutoAWQ linear `[K, N/8]` (int32) -> torch's CPU int4 layout `[N, K/2]` (uint8).

    The layout `_convert_weight_to_int4pack_for_cpu` makes (`_dequant_tile` says it; the tests
    check it byte for byte): `[N/64, K, 32]`, byte j of block b at row k holding output channel
    `64b + j` in its low nibble and `64b + 32 + j` in its high one. Written here by nibble
    arithmetic, 2x faster than torch's converter, which needs the values unpacked to int32 and
    transposed first (4x7B w13 `[22016, 4096]`: 0.6 s against 1.15 s on this CPU), in blocks of
    output channels, so a 4x7B expert never has more than a slice unpacked. A width that is not
    a whole number of 64-channel blocks goes through torch's converter.
    """
    k, n = qweight.shape[0], qweight.shape[1] * PACK
    step = _COLS_PER_CHUNK // PACK  # int32 words per block
    if n % BLOCK_N:
        return torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            unpack_gemm(qweight[:, c : c + step]).t().contiguous(), 2)
            for c in range(0, qweight.shape[1], step)])
    out = torch.empty(n // BLOCK_N, k, BLOCK_N // 2, dtype=torch.uint8)
    for c in range(0, qweight.shape[1], step):
        q = unpack_gemm(qweight[:, c : c + step]).to(torch.uint8)  # [K, cols]
        blocks = q.shape[1] // BLOCK_N
        q = q.view(k, blocks, 2, BLOCK_N // 2)
        first = c * PACK // BLOCK_N
        out[first : first + blocks] = (q[:, :, 0] | (q[:, :, 1] << 4)).permute(1, 0, 2)
    return out.view(n, k // 2)


def to_scales_and_zeros(scales: torch.Tensor, qzeros: torch.Tensor) -> torch.Tensor:
    """AutoAWQ scales `[K/G, N]` and zero points `[K/G, N/8]` -> `[K/G, N, 2]` in bfloat16.

    AWQ dequantizes `(q - z) * s`; torch's int4 kernel computes `(q - 8) * s + zero`, so
    `zero = (8 - z) * s` (formed in float32, then rounded once to bfloat16).
    """
    z = unpack_gemm(qzeros).to(torch.float32)
    s = scales.to(torch.float32)
    return torch.stack([s, (8 - z) * s], dim=-1).to(torch.bfloat16)


def runs(in_features: int, out_features: int, group_size: int) -> bool:
    """Whether these kernels run a linear of this shape (else it stays on vLLM's kernel)."""
    return (group_size in KERNEL_GROUPS and in_features % group_size == 0
            and out_features % BLOCK_N == 0)


def int4mm(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
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
    nb, half = n // BLOCK_N, BLOCK_N // 2
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
        torch.matmul(x, tile, out=out[:, b0 * BLOCK_N:b1 * BLOCK_N])
    return out


class CPUExperts:
    """One MoE layer's experts in torch's CPU int4 layout (4-bit): `w13 [E, 2I, H/2]`,
    `w2 [E, H, I/2]`, their scales and zeros `[E, H/G, 2I, 2]` and `[E, I/G, H, 2]`."""

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


def run_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                w13: torch.Tensor, w13_sz: torch.Tensor, w2: torch.Tensor, w2_sz: torch.Tensor,
                weight_on_input: bool) -> torch.Tensor:
    """x `[M, H]`, topk_weights/topk_ids `[M, k]`, experts in torch's int4 layout -> `[M, H]`.

    Tokens are sorted by expert; an expert that received none costs nothing. The experts run in
    bfloat16, whatever the model's dtype: torch's CPU int4 kernel is vectorized for bfloat16
    only (in float16 it is 20-60 times slower). The loop over experts depends on the routing
    (data), so torch.compile cannot trace it: vLLM's compiled model calls it as an opaque custom
    op (`awq_cpu.py`).
    """
    tokens, k = topk_ids.shape
    intermediate = w13.shape[1] // 2  # w13 `[E, 2I, H/2]`
    flat = topk_ids.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    token_of = order // k  # [M*k] the token of each sorted assignment
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
        h = int4mm(xe, w13[e], w13_sz[e])  # [n, 2I]
        act = torch.nn.functional.silu(h[:, :intermediate]) * h[:, intermediate:]
        y = int4mm(act, w2[e], w2_sz[e])
        out.index_add_(0, idx, y.to(torch.float32) if weight_on_input else y * w)
        start += n
    return out.to(x.dtype)
