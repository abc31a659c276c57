"""The preset registry: every seed model has an entry, matching, precedence."""

from __future__ import annotations

from typing import Any

import pytest

import chat_templates
from serve.config import parse
from serve.presets import PRESETS, match, resolve


@pytest.mark.parametrize(("model", "preset", "template"), [
    ("Aratako/Swallow-MoE-4x7B-lisa", "swallow-moe-4x7b-lisa", "alpaca-ja"),
    ("/models/Swallow-MoE-2x13B-v0.1-AWQ", "swallow-moe-2x13b", "alpaca-ja-bare"),
    ("tokyotech-llm/Swallow-13b-instruct-hf", "swallow-instruct", "alpaca-ja"),
    ("nitky/Superswallow-13b-v0.2", "swallow-instruct", "alpaca-ja"),
    ("tokyotech-llm/Swallow-MS-7b-v0.1", "swallow-ms-7b", None),
    ("tokyotech-llm/Swallow-MX-8x7b-NVE-v0.1", "swallow-mx-8x7b", None),
    ("TheBloke/shisa-7B-v1-AWQ", "shisa-7b-v1", "llama-2-chat"),
    ("augmxnt/shisa-gamma-7b-v1", "shisa-gamma-7b-v1", "llama-2-chat"),
    ("elyza/ELYZA-japanese-Llama-2-7b-instruct", "elyza-japanese-llama-2-7b-instruct",
     "llama-2-chat"),
    ("stabilityai/japanese-stablelm-instruct-beta-7b", "japanese-stablelm-instruct-beta-7b",
     "llama-2-chat"),
    ("stabilityai/japanese-stablelm-instruct-gamma-7b", "japanese-stablelm-instruct-gamma-7b",
     "alpaca-ja"),
])
def test_seed_models_match(model: str, preset: str, template: str | None) -> None:
    found = match(model)
    assert found is not None and found.name == preset
    assert found.template == template and found.source


def test_registry_is_consistent() -> None:
    for p in PRESETS.values():
        if p.template:
            chat_templates.load(p.template)  # raises if missing
    assert match("some/other-model") is None


@pytest.mark.parametrize(("template", "markers"), [
    ("alpaca-ja", ("### 指示:", "### 入力:", "### 応答:")),
    ("alpaca-ja-bare", ("### 指示:", "### 入力:", "### 応答:")),
    ("alpaca", ("### Instruction:", "### Input:", "### Response:")),
    ("llama-2-chat", ("[INST]", "[/INST]", "<<SYS>>")),
])
def test_every_section_header_is_a_turn_marker(template: str, markers: tuple[str, ...]) -> None:
    """Declared in each template's header, as data: instruction, input and response."""
    assert chat_templates.turn_markers(chat_templates.load(template)[1]) == markers


def test_a_custom_template_declares_its_own_markers(tokenizer: Any, tmp_path: Any) -> None:
    custom = tmp_path / "mine.jinja"
    custom.write_text('{#- mine: User/Bot format.\n    turn markers: ["User:", "Bot:"] -#}\n'
                      "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Bot:")
    m = resolve(parse(["--model", "x", "--chat-template", str(custom)]), tokenizer, "n", 512)
    assert m.stops.turn_markers == ("User:", "Bot:")
    assert m.stops.strings([]) == ("</s>", "User:", "Bot:")
    bad = tmp_path / "bad.jinja"
    bad.write_text('{#- turn markers: ["unterminated -#}x')
    with pytest.raises(ValueError, match="JSON list"):
        chat_templates.turn_markers(bad.read_text())


def test_shisa_preset_values(tokenizer: Any) -> None:
    m = resolve(parse(["--model", "x/shisa-7b-v1"]), tokenizer, "shisa-7b-v1", 512)
    assert m.preset == "shisa-7b-v1" and m.template_name == "llama-2-chat"
    assert m.default_system == "あなたは役立つアシスタントです。"
    assert m.sampling_defaults == {"temperature": 0.7, "top_p": 0.95, "repetition_penalty": 1.05}
    assert m.stops.strings([]) == ("</s>", "[INST]", "[/INST]", "<<SYS>>")


def test_flags_override_preset(tokenizer: Any) -> None:
    m = resolve(parse(["--model", "x/shisa-7b-v1", "--chat-template", "alpaca",
                       "--default-system-prompt", "S", "--no-eos-truncation", "--sentence-trim"]),
                tokenizer, "n", 512)
    assert (m.template_name, m.default_system, m.sentence_trim) == ("alpaca", "S", True)
    assert m.stops.strings(["x"]) == ("x",)


def test_preset_none_and_unknown(tokenizer: Any) -> None:
    assert resolve(parse(["--model", "x/shisa-7b-v1", "--preset", "none"]), tokenizer, "n",
                   512).preset is None
    with pytest.raises(ValueError, match="shisa-7b-v1"):
        resolve(parse(["--model", "x", "--preset", "nope"]), tokenizer, "n", 512)
