"""The AutoAWQ GEMM layout, written from llm-compressor's packed output (pure torch).

llm-compressor saves compressed-tensors `pack-quantized` tensors and has no AutoAWQ writer
(compressed-tensors only converts the other way), so this small repacker is ours. Layout, as
TheBloke's releases, vLLM `awq`/`awq_marlin`, TGI and transformers read it:

- `qweight` int32 `[in, out/8]`: eight 4-bit values per int32 along the *output* dimension,
  nibble i holding column 8j + AWQ_ORDER[i];
- `qzeros`  int32 `[in/G, out/8]`, same packing, unsigned zero points;
- `scales`  fp16  `[in/G, out]`;
- `w[o, i] = (q[i, o] - z[i // G, o]) * s[i // G, o]`.

compressed-tensors packs signed values (range [-8, 7]) offset by +8 along the input dimension
(weights) or output dimension (zero points); unpacking uses its own `unpack_from_int32`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = 4
PACK = 32 // BITS
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_INVERSE = tuple(AWQ_ORDER.index(i) for i in range(PACK))
_SHIFTS = torch.arange(PACK, dtype=torch.int64) * BITS
# Column c of a word sits in nibble _INVERSE[c]: shifting each column by its own amount unpacks
# in output order with no gather, in int32 (an arithmetic shift's sign bits are masked off).
_UNPACK_SHIFTS = torch.tensor([BITS * _INVERSE[c] for c in range(PACK)], dtype=torch.int32)


def pack_gemm(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values `[rows, cols]` -> AutoAWQ-packed int32 `[rows, cols/8]`."""
    rows, cols = values.shape
    if cols % PACK:
        raise ValueError(f"output features ({cols}) must be a multiple of {PACK} for AWQ GEMM")
    if values.min() < 0 or values.max() > 15:
        raise ValueError("values must be unsigned 4-bit (0..15)")
    v = values.to(torch.int64).reshape(rows, cols // PACK, PACK)[:, :, list(AWQ_ORDER)]
    words = (v << _SHIFTS).sum(-1)
    # Reinterpret the unsigned 32-bit words as int32 (two's complement), as AutoAWQ stores them.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_gemm(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ-packed int32 `[rows, cols/8]` -> unsigned values int32 `[rows, cols]`."""
    rows, words = packed.shape
    return ((packed.unsqueeze(-1) >> _UNPACK_SHIFTS) & 0xF).reshape(rows, words * PACK)


@dataclass
class GemmTensors:
    qweight: torch.Tensor  # int32 [in, out/8]
    qzeros: torch.Tensor  # int32 [in/G, out/8]
    scales: torch.Tensor  # fp16 [in/G, out]
    inexact_scales: int = 0  # scales that fp16 cannot hold exactly (outside its normal range)


def ct_integers(weight_packed: torch.Tensor, zero_point: torch.Tensor, shape: tuple[int, int],
                groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' signed integers: weights `[out, in]`, zero points `[out, groups]`."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    out_f, in_f = shape
    q = unpack_from_int32(weight_packed, BITS, torch.Size((out_f, in_f)), packed_dim=1)
    z = unpack_from_int32(zero_point, BITS, torch.Size((out_f, groups)), packed_dim=0)
    return q, z


def from_compressed(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                    zero_point: torch.Tensor, shape: tuple[int, int]) -> GemmTensors:
    """One linear layer from compressed-tensors pack-quantized to AutoAWQ GEMM."""
    groups = weight_scale.shape[1]
    q, z = ct_integers(weight_packed, zero_point, shape, groups)
    offset = 1 << (BITS - 1)
    scales = weight_scale.t().contiguous()
    half = scales.to(torch.float16)
    inexact = int((half.to(scales.dtype) != scales).sum())
    return GemmTensors(pack_gemm((q.to(torch.int32) + offset).t()),
                       pack_gemm((z.to(torch.int32) + offset).t()), half, inexact)


def dequantize(g: GemmTensors | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight `[out, in]` a GEMM triple stands for."""
    qweight, qzeros, scales = (g.qweight, g.qzeros, g.scales) if isinstance(g, GemmTensors) else g
    q = unpack_gemm(qweight).to(torch.float32)  # [in, out]
    z = unpack_gemm(qzeros).to(torch.float32)  # [G, out]
    group = q.shape[0] // z.shape[0]
    w = (q - z.repeat_interleave(group, 0)) * scales.to(torch.float32).repeat_interleave(group, 0)
    return w.t().contiguous().to(dtype)


def whole_groups(width: int, group: int, tensor_parallel: int) -> bool:
    """Whether `tensor_parallel` ranks, each holding `width / tensor_parallel` input channels of a
    row-parallel linear, each hold a whole number of AWQ groups: vLLM floors a fraction, and the
    kernels fail at warm-up. The one check the server (before loading) and the CPU kernel hook
    (at construction) both make."""
    return width % tensor_parallel == 0 and (width // tensor_parallel) % group == 0


def tensor_parallel_fits(widths: list[int], group: int, up_to: int) -> list[int]:
    """The tensor-parallel sizes from 1 to `up_to` that give every rank whole groups of each
    width, for an error message that names the sizes that work."""
    return [t for t in range(1, up_to + 1) if all(whole_groups(w, group, t) for w in widths)]

