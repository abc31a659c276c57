"""Calibration data: the built-in Japanese + English set or the user's JSONL, tokenized.

Rows are `{"text": ...}` (natural text) or `{"messages": [...]}` (an instruction/response pair,
rendered in the model's prompt format, so the search sees the activations the served model
will see). The format comes from the tokenizer's own chat template, else from the moegi preset
matched to the model name (`chat_templates/presets.json`), else the pair is joined as plain text.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN = Path(__file__).parent / "data" / "calibration.jsonl"
HELDOUT = Path(__file__).parent / "data" / "heldout.jsonl"
SEED = 0


TOKENIZER_HINT = ("check that the model's tokenizer loads as its own (AutoTokenizer) and "
                  "encodes Japanese and English text")


class CalibrationError(ValueError):
    pass


# The quality gate's text (verify.gate): with the user's --calib file, this many of its rows are
# held out from calibration, so the gate measures on the user's own kind of text; with the
# built-in set, its held-out file (the same kind of text, never calibrated on).
GATE_ROWS = 4


@dataclass
class Calibration:
    samples: list[list[int]]
    source: str  # "built-in (moegi ja+en)" or the file name
    prompt_format: str  # how messages were rendered
    seq_len: int
    heldout: list[list[int]]  # the gate's sequences, rendered like the samples, never among them
    heldout_source: str

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.samples))

    def dataset(self) -> Any:
        """A `datasets.Dataset` of input_ids, as llm-compressor's oneshot takes it."""
        from datasets import Dataset

        return Dataset.from_dict({"input_ids": self.samples,
                                  "attention_mask": [[1] * len(s) for s in self.samples]})


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}:{n}: not JSON ({exc.msg}); each line must be an "
                                   'object like {"text": "..."} or {"messages": [...]}') from None
        if not isinstance(row, dict) or not ({"text", "messages"} & row.keys()):
            raise CalibrationError(f'{path}:{n}: expected {{"text": ...}} or {{"messages": [...]}}')
        rows.append(row)
    if not rows:
        raise CalibrationError(f"{path} holds no calibration rows")
    return rows


def _chat_template(tokenizer: Any, model_dir: Path) -> tuple[str | None, str]:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template, "the tokenizer's own chat template"
    import chat_templates
    from chat_templates.presets import config_name, match

    preset = match(str(model_dir), config_name(model_dir))
    if preset is not None and preset.template:
        return chat_templates.load(preset.template)[1], f"{preset.template} (moegi preset {preset.name})"
    return None, "plain text (no chat template or preset known)"


def template_source(tokenizer: Any, model_dir: Path) -> str | None:
    """The chat template to ship with the checkpoint when the tokenizer has none."""
    if getattr(tokenizer, "chat_template", None):
        return None
    return _chat_template(tokenizer, model_dir)[0]


def render(tokenizer: Any, row: dict[str, Any], template: str | None) -> list[int]:
    if "text" in row:
        ids: list[int] = tokenizer.encode(str(row["text"]))
        return ids
    messages = row["messages"]
    if template is None:
        text = "\n".join(str(m.get("content", "")) for m in messages)
        return list(tokenizer.encode(text))
    rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    # Our templates (and Llama-2-style ones) write BOS themselves.
    return list(tokenizer.encode(rendered, add_special_tokens=False))


def load(tokenizer: Any, model_dir: Path, calib: Path | None = None, num_samples: int = 128,
         seq_len: int = 512) -> Calibration:
    path = calib or BUILTIN
    rows = read_rows(path)
    template, fmt = _chat_template(tokenizer, model_dir)
    random.Random(SEED).shuffle(rows)
    if calib is not None and len(rows) >= 2 * GATE_ROWS:
        held, rows = rows[:GATE_ROWS], rows[GATE_ROWS:]
        heldout = [render(tokenizer, r, template) for r in held]
        heldout_source = f"{GATE_ROWS} rows of {path.name} held out from calibration"
    else:
        heldout = [tokenizer.encode(t) for t in heldout_texts()[:GATE_ROWS]]
        heldout_source = "moegi's built-in held-out text" + (
            f" ({path.name} has under {2 * GATE_ROWS} rows to spare {GATE_ROWS})" if calib else "")
    samples = [ids[:seq_len] for ids in (render(tokenizer, r, template) for r in rows[:num_samples])]
    samples = [s for s in samples if len(s) > 1]
    if not samples:
        raise CalibrationError(f"{path}: every row is under 2 tokens after tokenization: "
                               f"{TOKENIZER_HINT}")
    heldout = [h for h in heldout if len(h) > 1]
    if not heldout:
        # A tokenizer that maps whole texts to one token would leave the gate nothing to
        # measure, after the whole search: said now, before anything loads.
        raise CalibrationError(f"the gate's text ({heldout_source}) is under 2 tokens a row "
                               f"with this model's tokenizer: {TOKENIZER_HINT}")
    source = "built-in moegi set (Japanese + English text and instructions)" if calib is None \
        else path.name
    return Calibration(samples, source, fmt, seq_len, heldout, heldout_source)


def heldout_texts(path: Path | None = None) -> list[str]:
    """Held-out evaluation text (never used for calibration or for training the test models)."""
    source = path or HELDOUT
    if not source.is_file():
        raise CalibrationError(f"--eval {source}: no such file")
    texts = [str(r["text"]) for r in read_rows(source) if "text" in r and str(r["text"]).strip()]
    if not texts:
        raise CalibrationError(f'{source} holds no {{"text": ...}} rows to evaluate on')
    return texts
