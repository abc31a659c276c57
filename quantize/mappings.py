"""The AWQ mapping registry (`mappings.json`), keyed by architecture class.

A mapping says which activation is smoothed and which linear layers absorb the inverse scale.
Keeping them as data makes a new architecture one JSON entry, and lets the tests check the
Mixtral router sits in the post-attention mapping (compensated) but is never quantized.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REGISTRY = Path(__file__).with_name("mappings.json")


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class ArchSpec:
    architecture: str
    family: str  # "dense" or "moe"
    mappings: tuple[tuple[str, tuple[str, ...]], ...]  # (smooth, balance layers)
    ignore: tuple[str, ...]
    modules_to_not_convert: tuple[str, ...] | None
    rename: tuple[tuple[str, str], ...]

    @property
    def is_moe(self) -> bool:
        return self.family == "moe"

    def awq_mappings(self) -> list[Any]:
        """llm-compressor `AWQMapping` objects (imported lazily: quantize env only)."""
        from llmcompressor.modifiers.transform.awq import AWQMapping

        return [AWQMapping(smooth, list(balance)) for smooth, balance in self.mappings]

    def original_name(self, name: str) -> str:
        """llm-compressor's tensor name -> the original checkpoint's (e.g. experts.E.w1)."""
        for pattern, repl in self.rename:
            name = re.sub(pattern, repl, name)
        return name


def _registry() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(REGISTRY.read_text(encoding="utf-8"))
    return data


def supported() -> list[str]:
    return sorted(_registry()["architectures"])


def lookup(architecture: str) -> ArchSpec:
    """The spec for an architecture class; unsupported ones fail with the supported list."""
    data = _registry()
    entry = data["architectures"].get(architecture)
    if entry is None:
        raise UnsupportedArchitecture(
            f"architecture {architecture!r} has no AWQ mapping; supported: {', '.join(supported())}"
            " (add one to quantize/mappings.json)")
    fam = data["families"][entry["family"]]
    maps = tuple((m["smooth"], tuple(m["balance"])) for m in data["mappings"][entry["mappings"]])
    mtnc = fam["modules_to_not_convert"]
    return ArchSpec(architecture, entry["family"], maps, tuple(fam["ignore"]),
                    tuple(mtnc) if mtnc is not None else None, tuple(fam["rename"].items()))


def for_config(config: dict[str, Any]) -> ArchSpec:
    """The spec for a model's parsed config.json."""
    archs = config.get("architectures") or ["<none in config.json>"]
    return lookup(archs[0])
