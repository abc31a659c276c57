"""The AutoAWQ GEMM layout (awq/layout.py): packing against AutoAWQ's own loop, and dequantize."""

from __future__ import annotations

import pytest
import torch

from awq import layout


def autoawq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ 0.2.9's WQLinear_GEMM packing loop, transcribed as the reference."""
    qweight = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i, o in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
            qweight[:, col] |= intweight[:, col * 8 + o].to(torch.int32) << (i * 4)
    return qweight


def test_pack_matches_autoawq_and_round_trips() -> None:
    values = torch.randint(0, 16, (16, 64), generator=torch.Generator().manual_seed(0))
    packed = layout.pack_gemm(values)
    assert packed.dtype == torch.int32 and packed.shape == (16, 8)
    assert torch.equal(packed, autoawq_pack(values))
    assert torch.equal(layout.unpack_gemm(packed), values.to(torch.int32))


def test_pack_rejects_bad_shapes_and_ranges() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        layout.pack_gemm(torch.zeros(2, 12, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"0\.\.15"):
        layout.pack_gemm(torch.full((2, 8), 16))


def test_dequantize_formula() -> None:
    # w[o, i] = (q[i, o] - z[i // G, o]) * s[i // G, o], here with 2 groups of 4 inputs.
    q = torch.randint(0, 16, (8, 8), generator=torch.Generator().manual_seed(1))
    z = torch.tensor([[3] * 8, [12] * 8])
    s = torch.tensor([[0.5] * 8, [0.25] * 8], dtype=torch.float16)
    w = layout.dequantize((layout.pack_gemm(q), layout.pack_gemm(z), s))
    expect = torch.cat([(q[:4] - 3) * 0.5, (q[4:] - 12) * 0.25]).t()
    assert torch.equal(w, expect.float())
