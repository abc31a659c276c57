"""The shapes of the tiny models: one place for the configs every builder and trainer uses.

Widths are multiples of 128 (the AWQ group size) and of 32 (vLLM's CPU WNA16 kernel), so the
same checkpoints feed the quantizer, the dense AWQ kernel and moegi's CPU MoE plugin.
"""

from __future__ import annotations

from typing import Any

VOCAB_SIZE = 600  # the sentencepiece vocabulary (build.py); byte fallback keeps it small

COMMON: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
EXPERTS = 4
EXPERTS_PER_TOKEN = 2


# Dense families the factory builds, by their transformers config class: each is the tiny shape
# above in that family's layout (Qwen2: q/k/v biases; Qwen3: per-head q/k norms).
DENSE = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}


def dense_config(family: str, vocab_size: int, **overrides: Any) -> Any:
    import transformers

    config_class = getattr(transformers, DENSE[family])
    extra = {"head_dim": COMMON["hidden_size"] // COMMON["num_attention_heads"]} \
        if family == "qwen3" else {}
    return config_class(vocab_size=vocab_size, **{**COMMON, **extra, **overrides})


def llama_config(vocab_size: int, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, **{**COMMON, **overrides})


def mixtral_config(vocab_size: int, **overrides: Any) -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=vocab_size, **{**COMMON, "num_local_experts": EXPERTS,
                                                   "num_experts_per_tok": EXPERTS_PER_TOKEN,
                                                   **overrides})
