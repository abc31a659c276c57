"""Tiny models of the other families users bring: dense Qwen2 and Qwen3, and the Qwen2-MoE and
Qwen3-MoE merges that `mergekit-moe` 0.1.5 writes.

- `tiny-qwen2`, `tiny-qwen3`: random weights in the tiny shape (tiny/shapes.py), each family's
  own layout (Qwen2's q/k/v biases, Qwen3's per-head q/k norms) and a byte-level tokenizer
  of the Qwen kind (tiny/tokenizer.py), for the quantize and serve paths;
- `tiny-qwen2-moe`: a Llama base trained on the chat pairs (tiny/train.py), two fine-tunes of it
  (Japanese, English: their MLPs alone, as fine-tunes of one base differ), merged by mergekit-moe
  with `architecture: qwen` and the base as the *shared expert* every token runs (with its
  sigmoid gate);
- `tiny-qwen3-moe`: the same from a Qwen3 base, merged into a Qwen3-MoE (experts stored fused,
  `mlp.experts.gate_up_proj`, as mergekit writes it under transformers 5).

The merges are served as mergekit wrote them, untuned: the experts share the base's attention, so
the merge answers as they do. They are trained because the 4-bit serving tests compare greedy
tokens with a reference forward, which needs a model sure of its next token (random weights flip
near-ties). As tiny-chat, they are built in the quantize environment (mergekit), and mergekit
runs as its command line.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from tiny.train import SEED, TEMPLATES, train_expert

# The experts of both merges: (name, question language or None for all): the base, then its
# fine-tunes.
EXPERTS = (("expert-all", None), ("expert-ja", "ja"), ("expert-en", "en"))
# mergekit-moe configs, in its documented format; paths are relative to the build folder.
MERGES: dict[str, dict[str, Any]] = {
    "tiny-qwen2-moe": {
        "base_model": "./expert-all", "architecture": "qwen", "gate_mode": "random",
        "dtype": "bfloat16", "experts_per_token": 2,
        "shared_experts": [{"source_model": "./expert-all", "positive_prompts": []}],
        "experts": [{"source_model": f"./{name}", "positive_prompts": []} for name, _ in EXPERTS],
    },
    "tiny-qwen3-moe": {
        "base_model": "./expert-all", "architecture": "qwen3", "gate_mode": "random",
        "dtype": "bfloat16", "experts_per_token": 2,
        "experts": [{"source_model": f"./{name}", "positive_prompts": []} for name, _ in EXPERTS],
    },
}
EXPERT_FAMILY = {"tiny-qwen2-moe": "llama", "tiny-qwen3-moe": "qwen3"}
BASE_STEPS = 200
FINETUNE_STEPS = 60


def random_dense(out: Path, family: str) -> None:
    """A dense model of `family` (shapes.DENSE) with random bf16 weights and the tiny Qwen
    (byte-level) tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny.shapes import dense_config
    from tiny.tokenizer import build_qwen_tokenizer

    build_qwen_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(SEED)
    # Qwen2's base models: <|endoftext|> begins (when a template adds it) and ends the text.
    model: Any = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        dense_config(family, len(tok), bos_token_id=tok.eos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))
    model.to(torch.bfloat16).save_pretrained(out)


def merged(out: Path, name: str) -> None:
    """A base and its fine-tunes merged by mergekit-moe from `MERGES[name]`, into `out`."""
    import yaml

    from tiny.chat import script
    from tiny.tokenizer import build_tokenizer
    from tiny.train import finetune_mlp

    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        work = Path(tmp)
        build_tokenizer(work / "tokenizer")
        (base, _), *tunes = EXPERTS
        train_expert(work / base, work / "tokenizer", None, TEMPLATES, seed=SEED,
                     steps=BASE_STEPS, family=EXPERT_FAMILY[name])
        for i, (expert, language) in enumerate(tunes, 1):
            finetune_mlp(work / base, work / expert, language, TEMPLATES, seed=SEED + i,
                         steps=FINETUNE_STEPS)
        (work / "moe.yml").write_text(yaml.safe_dump(MERGES[name], sort_keys=False))
        subprocess.run([script("mergekit-moe"), "moe.yml", "merged", "--random-seed", str(SEED),
                        "--quiet"], cwd=work, check=True)
        shutil.copytree(work / "merged", out, dirs_exist_ok=True)
        shutil.copy(work / "moe.yml", out / "mergekit-moe.yml")  # provenance
