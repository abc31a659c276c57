"""The benchmarks' models: random weights at a chosen size, cached, bf16 and 4-bit.

Random weights, with one change: the head's rows of the 256 byte-fallback pieces are zero, so
their logit is exactly 0 while the other pieces' are random; greedy decoding never picks one, and
every token spells whole characters. Both servers then send one chunk per token (a byte piece
alone is no character, and both hold such bytes back), whatever the server version.

4-bit checkpoints are written by `moegi-quantize --method rtn`: the same AutoAWQ GEMM files an
AWQ run writes (AWQ only chooses other scales), without the calibration forward, which would
take most of a benchmark's time on 2 cores.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tiny import shapes
from tiny.build import REPO, cache_root, ensure_model, quantize_python

BYTE_PIECES = range(3, 259)  # <0x00>..<0xFF> in the tiny tokenizer (after unk, bos, eos)
COMMON: dict[str, Any] = dict(max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
                              eos_token_id=2, tie_word_embeddings=False)
# The embedded tiny models' shapes (tiny/shapes.py), as a Mixtral.
TINY_MOE: dict[str, Any] = {**{k: shapes.COMMON[k] for k in (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads")}, "num_local_experts": shapes.EXPERTS,
    "num_experts_per_tok": shapes.EXPERTS_PER_TOKEN}
LARGE_MOE: dict[str, Any] = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                 num_attention_heads=8, num_key_value_heads=8,
                                 num_local_experts=8, num_experts_per_tok=2)
# The layer shapes of the seed models (layers are chosen per run): Swallow-MoE-4x7B (Llama-2-7B
# experts, full multi-head attention) and Swallow-MX-8x7B (Mixtral-8x7B: grouped-query, 8 KV heads).
REAL_SHAPES: dict[str, dict[str, Any]] = {
    "4x7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, num_local_experts=4, num_experts_per_tok=2),
    "8x7b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2),
}


def _save(out: Path, arch: str, shape: dict[str, Any]) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    tokenizer = ensure_model("tiny-llama")
    torch.manual_seed(0)
    model: Any
    # Initialised in bf16 directly: a real-shape model in float32 would need twice the memory.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        if arch == "mixtral":
            model = MixtralForCausalLM(MixtralConfig(vocab_size=600, **COMMON, **shape))  # type: ignore[no-untyped-call]
        else:
            model = LlamaForCausalLM(LlamaConfig(vocab_size=600, **COMMON, **shape))  # type: ignore[no-untyped-call]
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        model.lm_head.weight[list(BYTE_PIECES)] = 0
    model.to(torch.bfloat16).save_pretrained(out)
    for f in tokenizer.glob("tokenizer*"):
        shutil.copy(f, out / f.name)


def model(name: str, arch: str, shape: dict[str, Any], quantized: bool = False) -> Path:
    """The folder of a bench model, built on first use (`quantized`: its RTN 4-bit copy)."""
    root = cache_root() / "bench"
    src = root / f"{name}-bf16"
    if not (src / "config.json").exists():
        tmp = root / f".{name}-bf16.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        _save(tmp, arch, shape)
        tmp.rename(src)
    if not quantized:
        return src
    dst = root / f"{name}-awq"
    if not (dst / "config.json").exists():
        subprocess.run([str(quantize_python()), "-m", "quantize", str(src), str(dst),
                        "--method", "rtn", "--num-samples", "4", "--overwrite",
                        # Random weights: 4 bits cost what they cost; the gate has no say here.
                        "--accept-quality-loss"], check=True,
                       cwd=REPO, stdout=sys.stderr)
    return dst
