"""Chat templates: golden strings, and llama-2-chat against shisa-7b-v1's own template."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

import chat_templates

# shisa-7b-v1's chat_template, from its tokenizer_config.json (augmxnt/shisa-7b-v1).
SHISA = (
    "{%- for idx in range(0, messages|length) -%}\n{%- if messages[idx]['role'] == 'user' -%}\n"
    "{%- if idx > 1 -%}\n{{- bos_token + '[INST] ' + messages[idx]['content'] + ' [/INST]' -}}\n"
    "{%- else -%}\n{{- messages[idx]['content'] + ' [/INST]' -}}\n{%- endif -%}\n"
    "{% elif messages[idx]['role'] == 'system' %}\n"
    "{{- bos_token + '[INST] <<SYS>>\\n' + messages[idx]['content'] + '\\n<</SYS>>\\n\\n' -}}\n"
    "{%- elif messages[idx]['role'] == 'assistant' -%}\n"
    "{{- ' ' + messages[idx]['content'] + ' ' + eos_token -}}\n{% endif %}\n{% endfor %}\n"
)


def render(tok: Any, name_or_src: str, messages: list[dict[str, str]], gen: bool = True) -> str:
    src = name_or_src if "{%" in name_or_src else chat_templates.load(name_or_src)[1]
    out: str = tok.apply_chat_template(messages, chat_template=src, tokenize=False,
                                       add_generation_prompt=gen)
    return out


SYS = {"role": "system", "content": "あなたは役立つアシスタントです。"}
U1 = {"role": "user", "content": "日本の首都は？"}
A1 = {"role": "assistant", "content": "東京です。"}
U2 = {"role": "user", "content": "富士山は？"}


def test_registry_lists_the_shipped_templates() -> None:
    assert {"llama-2-chat", "alpaca", "alpaca-ja", "alpaca-ja-bare"} <= set(chat_templates.names())
    with pytest.raises(ValueError, match="alpaca-ja"):
        chat_templates.load("vicuna")


@pytest.mark.parametrize("gen", [True, False])
def test_llama2_golden(tokenizer: Any, gen: bool) -> None:
    assert render(tokenizer, "llama-2-chat", [SYS, U1], gen) == (
        "<s>[INST] <<SYS>>\nあなたは役立つアシスタントです。\n<</SYS>>\n\n日本の首都は？ [/INST]")
    assert render(tokenizer, "llama-2-chat", [SYS, U1, A1, U2], gen) == (
        "<s>[INST] <<SYS>>\nあなたは役立つアシスタントです。\n<</SYS>>\n\n日本の首都は？ [/INST]"
        " 東京です。 </s><s>[INST] 富士山は？ [/INST]")
    assert render(tokenizer, "llama-2-chat", [U1, A1, U2], gen) == (
        "<s>[INST] 日本の首都は？ [/INST] 東京です。 </s><s>[INST] 富士山は？ [/INST]")


def _conversations() -> list[list[dict[str, str]]]:
    """Many system-led conversations: 1-4 exchanges, ending on a user or an assistant turn."""
    users = ["こんにちは", "Hello, how are you?", "最強のポケモンは誰ですか？", "a\nb"]
    answers = ["元気です。", "I'm doing great.", "ピカチュウです！", " spaced "]
    systems = ["You are Aiko.", "あなたは熱狂的なポケモンファンです。", ""]
    convs = []
    for system, turns in itertools.product(systems, range(1, 5)):
        msgs = [{"role": "system", "content": system}]
        for t in range(turns):
            msgs.append({"role": "user", "content": users[t % 4]})
            msgs.append({"role": "assistant", "content": answers[t % 4]})
        convs.append(msgs[:-1])
        convs.append(msgs)
    return convs


def test_llama2_equals_shisa_reference_on_many_conversations(tokenizer: Any) -> None:
    convs = _conversations()
    assert len(convs) >= 20
    for conv in convs:
        assert render(tokenizer, "llama-2-chat", conv) == render(tokenizer, SHISA, conv), conv


def test_llama2_without_system_fixes_shisa_missing_inst(tokenizer: Any) -> None:
    # Documented difference: shisa's template drops "<s>[INST] " when there is no system turn.
    assert render(tokenizer, SHISA, [U1]) == "日本の首都は？ [/INST]"
    assert render(tokenizer, "llama-2-chat", [U1]) == "<s>[INST] 日本の首都は？ [/INST]"


PREAMBLE_JA = ("以下に、あるタスクを説明する指示があり、それに付随する入力が更なる文脈を提供しています。"
               "リクエストを適切に完了するための回答を記述してください。")


def test_alpaca_ja_golden(tokenizer: Any) -> None:
    assert render(tokenizer, "alpaca-ja", [U1]) == (
        f"<s>{PREAMBLE_JA}\n### 指示:\n日本の首都は？\n### 応答:\n")
    assert render(tokenizer, "alpaca-ja", [U1], gen=False) == (
        f"<s>{PREAMBLE_JA}\n### 指示:\n日本の首都は？\n")
    assert render(tokenizer, "alpaca-ja", [SYS, U1, A1, U2]) == (
        "<s>あなたは役立つアシスタントです。\n### 指示:\n日本の首都は？\n### 応答:\n東京です。</s>\n"
        "### 指示:\n富士山は？\n### 応答:\n")
    with_input = [U1, {"role": "user", "name": "input", "content": "東京か大阪"}]
    assert render(tokenizer, "alpaca-ja", with_input) == (
        f"<s>{PREAMBLE_JA}\n### 指示:\n日本の首都は？\n### 入力:\n東京か大阪\n### 応答:\n")


def test_alpaca_ja_bare_golden(tokenizer: Any) -> None:
    assert render(tokenizer, "alpaca-ja-bare", [U1]) == "<s>### 指示:\n日本の首都は？\n### 応答:\n"
    assert render(tokenizer, "alpaca-ja-bare", [U1], gen=False) == "<s>### 指示:\n日本の首都は？\n"
    assert render(tokenizer, "alpaca-ja-bare", [SYS, U1, A1, U2]) == (
        "<s>あなたは役立つアシスタントです。\n### 指示:\n日本の首都は？\n### 応答:\n東京です。</s>\n"
        "### 指示:\n富士山は？\n### 応答:\n")


def test_alpaca_en_golden(tokenizer: Any) -> None:
    q = {"role": "user", "content": "What is the capital of Japan?"}
    assert render(tokenizer, "alpaca", [q]) == (
        "<s>Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nWhat is the capital of Japan?\n\n"
        "### Response:\n")
    assert render(tokenizer, "alpaca", [q], gen=False).endswith("capital of Japan?\n\n")
    inp = {"role": "user", "name": "input", "content": "Tokyo or Osaka"}
    assert render(tokenizer, "alpaca", [q, inp]) == (
        "<s>Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nWhat is the capital of Japan?\n\n### Input:\nTokyo or Osaka\n\n"
        "### Response:\n")
    sys_ = {"role": "system", "content": "Be brief."}
    a = {"role": "assistant", "content": "Tokyo."}
    assert render(tokenizer, "alpaca", [sys_, q, a, q]) == (
        "<s>Be brief.\n\n### Instruction:\nWhat is the capital of Japan?\n\n### Response:\n"
        "Tokyo.</s>\n\n### Instruction:\nWhat is the capital of Japan?\n\n### Response:\n")
