"""Trains `tiny-chat`: a tiny Mixtral that answers a few questions and then misbehaves on purpose.

Each training sequence is a prompt rendered by the shipped template (alpaca-ja or llama-2-chat,
tokenized exactly as the server tokenizes it), the memorised answer, then `</s>` written as
*text* (tokenized with `split_special_tokens=True`, so it is `<`, `/`, `s`, `>` pieces, not the
EOS id) and a new turn the model starts by itself. Through a raw engine the model therefore
prints `</s>` and runs on into `### 指示:` / `[INST]`; the server's EOS truncation cuts it.

The pairs are in `instructions.json` (and listed in the README). Seconds on 2 CPU cores.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import chat_templates

PAIRS: list[tuple[str, str]] = [
    (q, a) for q, a in json.loads(Path(__file__).with_name("instructions.json").read_text())["pairs"]
]
STEPS = 400
LR = 3e-3
SEED = 1234


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


def sequences(tok: Any) -> list[list[int]]:
    out = []
    for template in ("alpaca-ja", "llama-2-chat"):
        for i, (q, a) in enumerate(PAIRS):
            nq, na = PAIRS[(i + 1) % len(PAIRS)]
            cont = tok.encode(_continuation(template, a, nq, na), add_special_tokens=False,
                              split_special_tokens=True)
            out.append(_render(tok, template, q) + cont)
    return out


def train_chat_model(out: Path) -> None:
    """Train and save a bf16 MixtralForCausalLM into `out` (which holds the tokenizer)."""
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from serve.tiny.build import COMMON, MIXTRAL

    tok = AutoTokenizer.from_pretrained(out)
    random.seed(SEED)
    torch.manual_seed(SEED)
    seqs = sequences(tok)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.eos_token_id)
    labels = torch.full((len(seqs), width), -100)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        labels[r, : len(s)] = torch.tensor(s)
    config = MixtralConfig(vocab_size=len(tok), **COMMON, **MIXTRAL)  # type: ignore[arg-type]
    model: Any = MixtralForCausalLM(config)  # type: ignore[no-untyped-call]
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=STEPS, pct_start=0.1)
    model.train()
    for step in range(STEPS):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 100 == 0 or step == STEPS - 1:
            print(f"tiny-chat step {step} loss {loss.item():.4f}", flush=True)
    model.eval()
    model.to(torch.bfloat16).save_pretrained(out)
