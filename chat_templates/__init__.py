"""Chat templates shipped with moegi: Jinja files rendered by transformers' chat-template engine.

The registry is the folder itself: `NAME.jinja` is the template NAME. Each file's header comment
states its format, where it comes from, and how system messages, inputs and history map onto it.
Every template writes the BOS token itself, so a rendered prompt is tokenized without adding
special tokens (as transformers' `apply_chat_template(tokenize=True)` does).
"""

from __future__ import annotations

from pathlib import Path

DIR = Path(__file__).parent


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
