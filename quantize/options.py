"""What a quantization run is asked (`Options`, `VerifyOptions`) and what it reports (`Result`).

The options are pydantic settings, as the server's are (serve/config.py): the command line's
flags, `MOEGI_QUANTIZE_*` variables and the defaults all come from the fields here, the one place
a default lives. The CLI (`cli.py`) parses them, the run (`run.py`) returns `Result`, and the
model card (`card.py`) renders both; the closed choices are `Literal`s, so mypy checks every use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, CliPositionalArg, SettingsConfigDict

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


class Options(BaseSettings):
    """moegi-quantize MODEL OUT: quantize a merged (MoE or dense) model to a 4-bit AutoAWQ GEMM
    checkpoint, calibrated on Japanese and English text and checked before it is published.
    Every option is also a MOEGI_QUANTIZE_* variable (MOEGI_QUANTIZE_GROUP_SIZE=64)."""

    model_config = SettingsConfigDict(
        env_prefix="MOEGI_QUANTIZE_", cli_prog_name="moegi-quantize", cli_kebab_case=True,
        cli_implicit_flags=True, cli_avoid_json=True, cli_exit_on_error=True,
        cli_hide_none_type=True, extra="ignore")

    model: CliPositionalArg[Path] = Field(
        description="A local Hugging Face model folder (or a tiny test model's name).")
    out: CliPositionalArg[Path] = Field(
        description="The output folder (must not exist unless --overwrite).")
    format: Format = Field("awq-gemm", description="What is written: AutoAWQ GEMM (vLLM, TGI, "
                           "transformers) or llm-compressor's compressed-tensors.")
    method: Method = Field(
        "gptq", description="gptq: AWQ smoothing, then each layer keeps the best of AWQ, GPTQ's "
        "rounding and round-to-nearest on the calibration data (guard.py; with too little "
        "calibration text for GPTQ, AWQ's alone, as said at the start); awq: AWQ alone, never "
        "worse than round-to-nearest per layer; rtn: plain round-to-nearest.")
    calib: Path | None = Field(
        None, description='JSONL of {"text": ...} or {"messages": [...]} (a few rows are held out '
        "for the quality gate); default: the built-in Japanese + English set.")
    num_samples: int = Field(128, ge=1, description="Calibration sequences.")
    seq_len: int = Field(512, ge=2, description="Tokens per calibration sequence, at most.")
    group_size: int | None = Field(
        None, description="Inputs per scale and zero point; default 128, or the largest size "
        "that divides the model's layer widths and that every serving kernel runs (64 for a "
        "hidden size of 576).")
    overwrite: bool = Field(False, description="Replace OUT if it exists.")
    max_shard_gb: float = Field(
        1.0, description="Largest shard written, GiB; llm-compressor's save holds one shard of "
        "its files in memory, so this bounds that step.")
    accept_quality_loss: bool = Field(
        False, description="Publish a checkpoint the gate finds worse than round-to-nearest or "
        "past the quality limit (never a broken one); the card says so. A run the gate refused "
        "goes on from OUT.resume/ without a new search.")
    observer: Observer = Field(
        DEFAULT_OBSERVER, description="How each group's range is set after AWQ scaling: imatrix "
        "searches the clipping with the least activation-weighted error (AutoAWQ's auto_clip), "
        "mse the least weight error, minmax takes the extremes.")


class VerifyOptions(BaseSettings):
    """moegi-quantize verify CHECKPOINT --original MODEL: perplexity and agreement of a 4-bit
    checkpoint against its original, on held-out Japanese and English text."""

    model_config = SettingsConfigDict(
        env_prefix="MOEGI_QUANTIZE_", cli_prog_name="moegi-quantize verify", cli_kebab_case=True,
        cli_implicit_flags=True, cli_avoid_json=True, cli_exit_on_error=True,
        cli_hide_none_type=True, extra="ignore")

    checkpoint: CliPositionalArg[Path] = Field(description="The quantized checkpoint folder.")
    original: str = Field(description="The unquantized model folder (or a tiny model's name).")
    eval: Path | None = Field(None, description="Held-out JSONL; default: the built-in ja + en "
                              "text.")
    accept_quality_loss: bool = Field(
        False, description="Pass a checkpoint that is past the limits or worse than "
        "round-to-nearest (never a broken one).")


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
