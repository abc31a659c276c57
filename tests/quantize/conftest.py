"""Quantization fixtures (quantize environment): tiny models quantized once per session."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tiny.build import ensure_model


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's shards (small test models only)."""
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def quantize_keeping_compressed(model: str, out: Path, keep: Path, **kw: Any) -> Any:
    """Run a quantization and keep a copy of llm-compressor's own output for bit checks."""
    from quantize import checkpoint
    from quantize.run import Options, quantize

    real = checkpoint.check_repack

    def spy(ct_dir: Path, gemm_dir: Path, spec: Any) -> int:
        shutil.copytree(ct_dir, keep)
        return real(ct_dir, gemm_dir, spec)

    checkpoint.check_repack = spy  # type: ignore[assignment]
    try:
        return quantize(Options(model=ensure_model(model), out=out, **kw))
    finally:
        checkpoint.check_repack = real  # type: ignore[assignment]


@pytest.fixture(scope="session")
def awq_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Any]]:
    """{name: (AWQ GEMM checkpoint, llm-compressor output, result)} for the tiny models."""
    root = tmp_path_factory.mktemp("awq")
    out = {}
    for name in ("tiny-llama", "tiny-mixtral"):
        # Random weights: nothing to lose to 4 bits, so the gate's verdict on them is noise
        # and these mechanics tests accept it (trained models are gated in their own tests).
        result = quantize_keeping_compressed(name, root / name, root / f"{name}-ct", num_samples=16,
                                             accept_quality_loss=True)
        out[name] = (root / name, root / f"{name}-ct", result)
    return out
