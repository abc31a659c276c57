"""The model preset registry (`presets.json`): which prompt format, system prompt, stop strings
and sampling defaults each model of the Swallow-MoE / shisa / ELYZA / Japanese StableLM family
uses, and matching a model to its preset.

Data that both stages read: the server applies a preset (serve/presets.py), the quantizer
renders its calibration pairs in the preset's format (quantize/calibration.py). This module
needs nothing but the standard library, so neither stage pulls in the other's stack.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGISTRY = Path(__file__).with_name("presets.json")


@dataclass(frozen=True)
class Preset:
    name: str
    match: tuple[str, ...]
    template: str | None
    source: str
    system: str | None = None
    stop: tuple[str, ...] = ()
    sentence_trim: bool | None = None
    sampling: dict[str, Any] = field(default_factory=dict)


def _load() -> dict[str, Preset]:
    data = json.loads(REGISTRY.read_text(encoding="utf-8"))
    return {
        name: Preset(name, tuple(p["match"]), p.get("template"), p["source"], p.get("system"),
                     tuple(p.get("stop", ())), p.get("sentence_trim"), p.get("sampling", {}))
        for name, p in data["presets"].items()
    }


PRESETS = _load()


def named(name: str) -> Preset:
    """The preset called `name`; ValueError naming the choices otherwise (the --preset check)."""
    if name not in PRESETS:
        raise ValueError(f"unknown --preset {name!r}: use one of {', '.join(sorted(PRESETS))} "
                         "or none")
    return PRESETS[name]


def match(*candidates: str) -> Preset | None:
    """The first preset whose patterns match any candidate (served name, path, _name_or_path)."""
    for preset in PRESETS.values():
        for cand in candidates:
            if cand and any(fnmatch.fnmatch(cand.lower(), pat) for pat in preset.match):
                return preset
    return None


def config_name(model_dir: str | Path) -> str:
    """config.json's `_name_or_path` (what the model was saved from), or ""."""
    cfg = Path(model_dir) / "config.json"
    if cfg.is_file():
        return str(json.loads(cfg.read_text()).get("_name_or_path", ""))
    return ""


def docs_table() -> str:
    """The presets as the Markdown table of docs/prompts.md (a test keeps that copy equal)."""
    rows = ["| Preset | Matches | Template | System prompt | Sampling defaults |",
            "|---|---|---|---|---|"]
    for p in PRESETS.values():
        sampling = ", ".join(f"{k} {v}" for k, v in p.sampling.items()) or "-"
        rows.append(f"| `{p.name}` | {', '.join(f'`{m}`' for m in p.match)} | "
                    f"{f'`{p.template}`' if p.template else 'none (a base model)'} | "
                    f"{p.system or '-'} | {sampling} |")
    return "\n".join(rows)
