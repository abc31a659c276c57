"""What a quantization run is asked (`Options`) and what it reports (`Result`), typed.

The CLI (`cli.py`) builds `Options`, the run (`run.py`) returns `Result`, and the model card
(`card.py`) renders both; the closed choices are `Literal`s, so mypy checks every use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from awq.registry import ArchSpec
from quantize import calibration, checkpoint, verify

Format = Literal["awq-gemm", "compressed-tensors"]
Method = Literal["awq", "gptq", "rtn"]
Observer = Literal["minmax", "mse", "imatrix"]
FORMATS: tuple[Format, ...] = ("awq-gemm", "compressed-tensors")
METHODS: tuple[Method, ...] = ("awq", "gptq", "rtn")


# How each group's range is set once AWQ has scaled the weights (llm-compressor's observers):
# "minmax" takes the group's extremes; "mse" searches the clipped range with the least weight
# error; "imatrix" searches it with the error weighted by each input channel's mean squared
# activation on the calibration data, the output-aware clipping AutoAWQ calls auto_clip.
# Measured on SmolLM2-135M (group 64, 32 x 256 calibration tokens), mean KL on held-out text
# against round-to-nearest's: minmax 0.57x, mse 0.57x, imatrix 0.51x (README: Quantize).
OBSERVERS: dict[Observer, str] = {"minmax": "memoryless_minmax", "mse": "memoryless_mse",
                                  "imatrix": "imatrix_mse"}
DEFAULT_OBSERVER: Observer = "imatrix"


@dataclass
class Options:
    model: Path
    out: Path
    format: Format = "awq-gemm"
    method: Method = "gptq"  # guard.py: AWQ smoothing, then GPTQ's rounding where it helps
    calib: Path | None = None
    num_samples: int = 128
    seq_len: int = 512
    group_size: int | None = None  # None: the largest size every serving kernel runs that fits
    overwrite: bool = False
    max_shard_gb: float = 1.0  # llm-compressor's save holds one shard in memory
    accept_quality_loss: bool = False  # publish a checkpoint that beats RTN but passes the limit
    observer: Observer = DEFAULT_OBSERVER  # OBSERVERS: how each group's range is set


@dataclass
class Result:
    out: Path
    spec: ArchSpec
    calib: calibration.Calibration
    seconds: float
    peak_rss_gb: float
    peak_gpu_gb: float | None
    device: str
    size_bytes: int
    gate: verify.Gate
    group_note: str | None = None
    report: checkpoint.WriteReport | None = None
    choices: list[str] = field(default_factory=list)  # per layer, the candidate it kept (guard.py)
