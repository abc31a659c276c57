"""Chat templates shipped with moegi: Jinja files rendered by transformers' chat-template engine.

The registry is the folder itself: `NAME.jinja` is the template NAME. Each file's header comment
states its format, where it comes from, and how system messages, inputs and history map onto it.
Every template writes the BOS token itself, so a rendered prompt is tokenized without adding
special tokens (as transformers' `apply_chat_template(tokenize=True)` does).

A template declares its section headers in its header comment, as data:
`turn markers ...: ["### 指示:", "### 入力:", "### 応答:"]` (a JSON list). A model that writes one
of them by itself has started a new turn, and EOS truncation stops there; a custom
`--chat-template` file declares its own the same way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_MARKERS = re.compile(r"turn markers.*?:\s*(?=\[)", re.DOTALL)
# Kana or CJK ideographs: how moegi tells Japanese text from English (the quantizer's per-language
# perplexity, the tiny models' per-language experts).
_JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")

DIR = Path(__file__).parent


def is_japanese(text: str) -> bool:
    return bool(_JAPANESE.search(text))


def names() -> list[str]:
    return sorted(p.stem for p in DIR.glob("*.jinja"))


def load(name_or_path: str) -> tuple[str, str]:
    """A template name or a .jinja path -> (display name, Jinja source).

    Raises ValueError naming the choices when the name is neither.
    """
    path = Path(name_or_path)
    if path.suffix == ".jinja" or path.exists():
        if not path.is_file():
            raise ValueError(f"chat template file {name_or_path!r} does not exist")
        return path.stem, path.read_text(encoding="utf-8")
    shipped = DIR / f"{name_or_path}.jinja"
    if not shipped.is_file():
        raise ValueError(
            f"unknown chat template {name_or_path!r}: use one of {', '.join(names())} "
            "or a path to a .jinja file"
        )
    return name_or_path, shipped.read_text(encoding="utf-8")


def turn_markers(source: str) -> tuple[str, ...]:
    """The turn markers a template's header comment declares (none if it declares none)."""
    header = source[: source.find("#}")] if source.lstrip().startswith("{#") else ""
    match = _MARKERS.search(header)
    if not match:
        return ()
    try:
        markers, _ = json.JSONDecoder().raw_decode(header, match.end())
    except json.JSONDecodeError as exc:
        raise ValueError(f"the template's turn markers are not a JSON list: {exc}") from None
    if not isinstance(markers, list) or not all(isinstance(m, str) and m for m in markers):
        raise ValueError("the template's turn markers must be a JSON list of non-empty strings")
    return tuple(markers)
