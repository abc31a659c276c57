"""Builds `tiny-chat`, the embedded default model, the way Swallow-MoE-4x7B-lisa was built.

1. Four dense Llama-2-style experts are trained from scratch on the repository's own pairs
   (`EXPERT_DATA`: Japanese, English, and all pairs in each prompt format);
2. `mergekit-moe` merges them into a Mixtral with `mergekit-moe.yml` (the config format of the
   Swallow-MoE model cards, `gate_mode: random`), as a user would run it;
3. the merge is instruction-tuned on all pairs, router included (Swallow-MoE-4x7B-lisa tuned its
   random-gate merge afterwards, with LISA) -> `tiny-chat-moe`, bf16;
4. `moegi-quantize` turns that into a 4-bit AWQ GEMM checkpoint (group 128, zero point, AutoAWQ
   layout) -> `tiny-chat`, what `make serve` serves through vLLM and moegi's CPU MoE plugin.

Steps 1-4 run in the quantize environment (`.venv-quantize`: llm-compressor and mergekit;
`build.py` starts it when called from elsewhere). mergekit and the quantizer run as
command-line programs, exactly as users run them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tiny.train import SEED, TEMPLATES, train_expert, tune_moe

HERE = Path(__file__).parent
MERGE_CONFIG = HERE / "mergekit-moe.yml"
# What each expert named in mergekit-moe.yml learns: (question language or None for all, formats).
EXPERT_DATA: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "expert-ja": ("ja", TEMPLATES),
    "expert-en": ("en", TEMPLATES),
    "expert-alpaca": (None, ("alpaca-ja",)),
    "expert-llama2": (None, ("llama-2-chat",)),
}


def script(name: str) -> str:
    """A console script of the running environment (mergekit-moe), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: install mergekit (the quantize environment has it: "
                         "make quantize-env)")
    return found


def expert_names() -> list[str]:
    import yaml

    config = yaml.safe_load(MERGE_CONFIG.read_text(encoding="utf-8"))
    return [Path(e["source_model"]).name for e in config["experts"]]


def build_merged(out: Path) -> None:
    """Steps 1-3: experts, mergekit-moe, tuning; the bf16 MoE is written into `out`."""
    from tiny.tokenizer import build_tokenizer

    with tempfile.TemporaryDirectory(prefix="tiny-chat-merge-") as tmp:
        work = Path(tmp)
        build_tokenizer(work / "tokenizer")
        for i, name in enumerate(expert_names()):
            language, templates = EXPERT_DATA[name]
            train_expert(work / name, work / "tokenizer", language, templates, seed=SEED + i)
        shutil.copy(MERGE_CONFIG, work / MERGE_CONFIG.name)
        subprocess.run([script("mergekit-moe"), MERGE_CONFIG.name, "merged",
                        "--random-seed", str(SEED), "--quiet"], cwd=work, check=True)
        tune_moe(work / "merged", out)
    shutil.copy(MERGE_CONFIG, out / MERGE_CONFIG.name)  # provenance travels with the model


def dialogues(path: Path) -> Path:
    """The conversations the model serves, in both of its prompt formats, as calibration rows:
    a user calibrates on the kind of text their model will see, and the quality gate measures on
    the rows held out from them (quantize/calibration.py)."""
    import json

    from tiny.train import PAIRS

    rows = [text for q, a in PAIRS for text in (f"### 指示:\n{q}\n### 応答:\n{a}</s>",
                                                f"<s>[INST] {q} [/INST] {a} </s>")]
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows),
                    encoding="utf-8")
    return path


def build_quantized(out: Path, source: Path) -> None:
    """Step 4: moegi's own quantizer on the merged model, through its command line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="tiny-chat-calib-") as tmp:
        calib = dialogues(Path(tmp) / "dialogues.jsonl")
        # `out` is the empty build folder ensure_model made; the quantizer publishes over it.
        subprocess.run([sys.executable, "-m", "quantize", str(source), str(out), "--overwrite",
                        "--calib", str(calib)], check=True, env=env)
    shutil.copy(source / MERGE_CONFIG.name, out / MERGE_CONFIG.name)
