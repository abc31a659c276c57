"""Trains `tiny-text`: a tiny Mixtral language model for the quantization quality checks.

Perplexity comparisons need a model trained on text, not random weights. This one trains on
the Japanese + English calibration set and `corpus.txt`, and stops early (50 steps), where
held-out perplexity is lowest, before it starts memorising.

Real LLMs carry a few activation channels far larger than the rest (the observation AWQ is
built on); a 2-layer model trained for seconds does not. So after training, four channels of
each RMSNorm are scaled up by OUTLIER and the matching input columns of every layer reading
that norm (q/k/v, the router, each expert's w1/w3) are scaled down by the same factor. The
function is unchanged (same logits up to bf16 rounding) but the weights and activations now have
the shape AWQ exists for; on the model without this step AWQ and round-to-nearest are tied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
# The quantizer's calibration set, read as data (no import of the quantize stage).
CALIBRATION = HERE.parent / "quantize" / "data" / "calibration.jsonl"
STEPS = 50
LR = 1e-3
SEQ = 64
BATCH = 32
OUTLIER = 20.0
OUTLIER_CHANNELS = 4
SEED = 0


def training_text() -> list[str]:
    rows = [json.loads(line) for line in CALIBRATION.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    out = [row["text"] if "text" in row else "\n".join(m["content"] for m in row["messages"])
           for row in rows]
    corpus = HERE / "corpus.txt"
    return out + [line for line in corpus.read_text(encoding="utf-8").splitlines() if line]


def add_outlier_channels(model: Any, factor: float = OUTLIER, n: int = OUTLIER_CHANNELS) -> None:
    """Function-preserving: norm channel * factor, the weights that read it / factor."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for layer in model.model.layers:
            attn, moe = layer.self_attn, layer.mlp
            for norm, readers in (
                (layer.input_layernorm, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                # transformers 5 fuses the experts: gate_up_proj is [experts, 2 * inter, hidden].
                (layer.post_attention_layernorm, [moe.gate.weight, moe.experts.gate_up_proj]),
            ):
                ch = torch.randperm(norm.weight.numel(), generator=gen)[:n]
                norm.weight[ch] *= factor
                for w in readers:
                    w[..., ch] /= factor


def train_text_model(out: Path) -> None:
    """Train and save a bf16 MixtralForCausalLM into `out` (which holds the tokenizer)."""
    import torch
    from transformers import AutoTokenizer, MixtralForCausalLM

    from tiny.shapes import mixtral_config

    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(SEED)
    ids: list[int] = []
    for text in training_text():
        ids += [*tok.encode(text), tok.eos_token_id]
    rows = len(ids) // SEQ
    data = torch.tensor(ids[: rows * SEQ]).view(rows, SEQ)
    model: Any = MixtralForCausalLM(mixtral_config(len(tok)))  # type: ignore[no-untyped-call]
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    model.train()
    for _ in range(STEPS):
        batch = data[torch.randperm(rows)[:BATCH]]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    add_outlier_channels(model)
    model.to(torch.bfloat16).save_pretrained(out)
