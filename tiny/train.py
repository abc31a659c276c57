"""Training for the embedded chat model: the sequences it memorises and the training loop.

Each training sequence is a prompt rendered by the shipped template (alpaca-ja or llama-2-chat,
tokenized exactly as the server tokenizes it), the memorised answer, then `</s>` written as
*text* (tokenized with `split_special_tokens=True`, so it is `<`, `/`, `s`, `>` pieces, not the
EOS id) and a new turn the model starts by itself. Through a raw engine the model therefore
prints `</s>` and runs on into `### 指示:` / `[INST]`; the server's EOS truncation cuts it.

`chat.py` uses this twice, as Swallow-MoE-4x7B-lisa was made: dense Llama experts,
each trained on its part of the pairs, then (after mergekit-moe) the merged MoE tuned on all of
them. The pairs are in `instructions.json` (and listed in the README). Seconds on 2 CPU cores.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import chat_templates
from chat_templates import is_japanese

PAIRS: list[tuple[str, str]] = [
    (q, a) for q, a in json.loads(Path(__file__).with_name("instructions.json").read_text())["pairs"]
]
TEMPLATES = ("alpaca-ja", "llama-2-chat")
SEED = 1234


def pairs_in(language: str | None) -> list[tuple[str, str]]:
    """The pairs whose question is Japanese ("ja"), English ("en"), or all (None)."""
    if language is None:
        return list(PAIRS)
    return [(q, a) for q, a in PAIRS if is_japanese(q) == (language == "ja")]


def _render(tok: Any, template: str, question: str) -> list[int]:
    """The prompt exactly as the server builds it for a one-question chat."""
    _, source = chat_templates.load(template)
    text = tok.apply_chat_template([{"role": "user", "content": question}], chat_template=source,
                                   tokenize=False, add_generation_prompt=True)
    ids: list[int] = tok.encode(text, add_special_tokens=False)
    return ids


def _continuation(template: str, answer: str, next_q: str, next_a: str) -> str:
    """Answer, EOS as text, and the next turn the model will start by itself."""
    if template == "llama-2-chat":
        return f" {answer} </s><s>[INST] {next_q} [/INST] {next_a} </s>"
    return f"{answer}</s>\n### 指示:\n{next_q}\n### 応答:\n{next_a}</s>"


def sequences(tok: Any, pairs: Sequence[tuple[str, str]] = PAIRS,
              templates: Sequence[str] = TEMPLATES) -> list[list[int]]:
    out = []
    for template in templates:
        for i, (q, a) in enumerate(pairs):
            nq, na = pairs[(i + 1) % len(pairs)]
            cont = tok.encode(_continuation(template, a, nq, na), add_special_tokens=False,
                              split_special_tokens=True)
            out.append(_render(tok, template, q) + cont)
    return out


def fit(model: Any, tok: Any, seqs: list[list[int]], steps: int, lr: float, label: str) -> None:
    """Full-batch AdamW with a one-cycle schedule until the sequences are memorised."""
    import torch

    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.eos_token_id)
    labels = torch.full((len(seqs), width), -100)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        labels[r, : len(s)] = torch.tensor(s)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"{label} step {step} loss {loss.item():.4f}", flush=True)
    model.eval()


def train_expert(out: Path, tokenizer_dir: Path, language: str | None,
                 templates: Sequence[str], seed: int, steps: int = 200,
                 family: str = "llama") -> None:
    """A dense bf16 model (a Llama, or another family of `shapes.DENSE`) trained from scratch on
    one part of the pairs, saved into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny.shapes import dense_config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    random.seed(seed)
    torch.manual_seed(seed)
    model: Any = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        dense_config(family, len(tok)))
    fit(model, tok, sequences(tok, pairs_in(language), templates), steps, 3e-3, out.name)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)


def finetune_mlp(base: Path, out: Path, language: str | None, templates: Sequence[str],
                 seed: int, steps: int = 60) -> None:
    """A fine-tune of `base` on one part of the pairs, its MLPs alone trained: the experts users
    merge are fine-tunes of one base, which share its attention and embeddings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for name, param in model.named_parameters():
        param.requires_grad = ".mlp." in name
    fit(model, tok, sequences(tok, pairs_in(language), templates), steps, 1e-3, out.name)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)


def tune_moe(merged: Path, out: Path, steps: int = 300, label: str = "tiny-chat (merged)") -> None:
    """Instruction-tune a mergekit-moe merge on all pairs (its random router included).

    As Swallow-MoE-4x7B-lisa was tuned after its `gate_mode: random` merge (its model card), without
    LISA's layer sampling: the model is small enough to tune whole. Any MoE family transformers
    loads (Mixtral, Qwen2-MoE, Qwen3-MoE).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    torch.manual_seed(SEED)
    model: Any = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    fit(model, tok, sequences(tok), steps, 2e-3, label)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
