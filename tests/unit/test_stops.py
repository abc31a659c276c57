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
