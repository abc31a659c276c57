"""llm-compressor's compressed-tensors output, converted to the AutoAWQ GEMM layout (`layout.py`).

llm-compressor saves compressed-tensors `pack-quantized` tensors and has no AutoAWQ writer
(compressed-tensors only converts the other way), so this small converter is ours.
compressed-tensors packs signed values (range [-8, 7]) offset by +8 along the input dimension
(weights) or output dimension (zero points); unpacking uses its own `unpack_from_int32`
(imported when called: the quantize environment has it, the serving one need not).
"""

from __future__ import annotations

import torch

from awq.layout import BITS, GemmTensors, pack_gemm


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
