"""Applying a model preset (chat_templates/presets.py): building the `ServedModel`.

Precedence, most specific first: explicit flags (`--chat-template`, `--default-system-prompt`,
`--sentence-trim`), then the `--preset` named on the command line, then the tokenizer's own
`chat_template` (the model author's statement), then an automatically matched preset. Request
fields override all of these per request.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import chat_templates
from chat_templates.presets import PRESETS, Preset, config_name, match, named
from serve.config import Limits, Settings
from serve.model import ServedModel
from serve.stops import EosSources, StopPolicy

log = logging.getLogger("moegi")

__all__ = ["PRESETS", "Preset", "match", "pick_preset", "resolve"]


def pick_preset(settings: Settings, name: str) -> tuple[Preset | None, bool]:
    """(preset, explicit). `--preset none` turns automatic matching off."""
    if settings.preset == "none":
        return None, True
    if settings.preset:
        return named(settings.preset), True
    return match(name, settings.model, config_name(settings.model)), False


def resolve(settings: Settings, tokenizer: Any, name: str, max_model_len: int) -> ServedModel:
    preset, explicit = pick_preset(settings, name)
    template_name: str | None = None
    source: str | None = None
    if settings.chat_template:
        template_name, source = chat_templates.load(settings.chat_template)
    elif preset and explicit and preset.template:
        template_name, source = chat_templates.load(preset.template)
    elif getattr(tokenizer, "chat_template", None):
        template_name = "tokenizer"  # source None: the tokenizer's own is used
    elif preset and preset.template:
        template_name, source = chat_templates.load(preset.template)
    in_use = source or getattr(tokenizer, "chat_template", None)
    markers = chat_templates.turn_markers(in_use) if isinstance(in_use, str) else ()
    folder = Path(settings.model)
    eos = EosSources.of(tokenizer, folder if folder.is_dir() else None,
                        in_use if isinstance(in_use, str) else None)
    if warning := eos.disagreement(tokenizer):
        log.warning("%s", warning)
    stops = StopPolicy.for_tokenizer(tokenizer, (*(preset.stop if preset else ()), *markers),
                                     eos_truncation=settings.eos_truncation, eos=eos)
    trim = settings.sentence_trim
    if trim is None:
        trim = bool(preset and preset.sentence_trim)
    return ServedModel(
        name=name, tokenizer=tokenizer, max_model_len=max_model_len, stops=stops,
        chat_template=source, template_name=template_name,
        preset=preset.name if preset else None,
        default_system=settings.default_system_prompt or (preset.system if preset else None),
        sentence_trim=trim, sampling_defaults=dict(preset.sampling) if preset else {},
        limits=Limits.of(settings), stream_interval_s=settings.stream_interval_ms / 1000,
    )
