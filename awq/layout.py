"""The AutoAWQ GEMM layout: packing, unpacking and dequantizing it (pure torch).

The layout, as TheBloke's releases, vLLM `awq`/`awq_marlin`, TGI and transformers read it (the
conversion from llm-compressor's own output is `compressed.py`):

- `qweight` int32 `[in, out/8]`: eight 4-bit values per int32 along the *output* dimension,
  nibble i holding column 8j + AWQ_ORDER[i];
- `qzeros`  int32 `[in/G, out/8]`, same packing, unsigned zero points;
- `scales`  fp16  `[in/G, out]`;
- `w[o, i] = (q[i, o] - z[i // G, o]) * s[i // G, o]`.
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


def dequantize(g: GemmTensors | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight `[out, in]` a GEMM triple stands for."""
    qweight, qzeros, scales = (g.qweight, g.qzeros, g.scales) if isinstance(g, GemmTensors) else g
    q = unpack_gemm(qweight).to(torch.float32)  # [in, out]
    z = unpack_gemm(qzeros).to(torch.float32)  # [G, out]
    group = q.shape[0] // z.shape[0]
    w = (q - z.repeat_interleave(group, 0)) * scales.to(torch.float32).repeat_interleave(group, 0)
    return w.t().contiguous().to(dtype)
