"""Model presets: the registry in `presets.json`, matching, and building the `ServedModel`.

Precedence, most specific first: explicit flags (`--chat-template`, `--default-system-prompt`,
`--sentence-trim`), then the `--preset` named on the command line, then the tokenizer's own
`chat_template` (the model author's statement), then an automatically matched preset. Request
fields override all of these per request.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import chat_templates
from serve.config import EngineConfig, ServerConfig
from serve.serving import ServedModel
from serve.stops import StopPolicy

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


def _load() -> tuple[dict[str, Preset], dict[str, tuple[str, ...]]]:
    data = json.loads(REGISTRY.read_text(encoding="utf-8"))
    presets = {
        name: Preset(name, tuple(p["match"]), p.get("template"), p["source"], p.get("system"),
                     tuple(p.get("stop", ())), p.get("sentence_trim"), p.get("sampling", {}))
        for name, p in data["presets"].items()
    }
    markers = {t: tuple(v["turn_markers"]) for t, v in data["templates"].items()}
    return presets, markers


PRESETS, TURN_MARKERS = _load()


def match(*candidates: str) -> Preset | None:
    """The first preset whose patterns match any candidate (served name, path, _name_or_path)."""
    for preset in PRESETS.values():
        for cand in candidates:
            if cand and any(fnmatch.fnmatch(cand.lower(), pat) for pat in preset.match):
                return preset
    return None


def _config_name(model_dir: str) -> str:
    cfg = Path(model_dir) / "config.json"
    if cfg.is_file():
        return str(json.loads(cfg.read_text()).get("_name_or_path", ""))
    return ""


def pick_preset(server: ServerConfig, engine: EngineConfig, name: str) -> tuple[Preset | None, bool]:
    """(preset, explicit). `--preset none` turns automatic matching off."""
    if server.preset == "none":
        return None, True
    if server.preset:
        if server.preset not in PRESETS:
            raise SystemExit(f"unknown --preset {server.preset!r}: use one of "
                             f"{', '.join(sorted(PRESETS))} or none")
        return PRESETS[server.preset], True
    return match(name, engine.model, _config_name(engine.model)), False


def resolve(server: ServerConfig, engine: EngineConfig, tokenizer: Any, name: str,
            max_model_len: int) -> ServedModel:
    preset, explicit = pick_preset(server, engine, name)
    template_name: str | None = None
    source: str | None = None
    if server.chat_template:
        template_name, source = chat_templates.load(server.chat_template)
    elif preset and explicit and preset.template:
        template_name, source = chat_templates.load(preset.template)
    elif getattr(tokenizer, "chat_template", None):
        template_name = "tokenizer"  # source None: the tokenizer's own is used
    elif preset and preset.template:
        template_name, source = chat_templates.load(preset.template)
    markers = TURN_MARKERS.get(template_name or "", ())
    stops = StopPolicy.for_tokenizer(tokenizer, (*(preset.stop if preset else ()), *markers),
                                     enforce=server.eos_truncation)
    trim = server.sentence_trim
    if trim is None:
        trim = bool(preset and preset.sentence_trim)
    return ServedModel(
        name=name, tokenizer=tokenizer, max_model_len=max_model_len, stops=stops,
        chat_template=source, template_name=template_name,
        preset=preset.name if preset else None,
        default_system=server.default_system_prompt or (preset.system if preset else None),
        sentence_trim=trim, sampling_defaults=dict(preset.sampling) if preset else {},
    )
