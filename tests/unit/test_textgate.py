"""The output gate: minimal hold-back, stop cutting, sentence trim."""

from __future__ import annotations

import pytest

from serve.textgate import TextGate, sentence_end


def run(gate: TextGate, pieces: list[str], stop: str | None = None, length: bool = False
        ) -> tuple[list[str], str, bool]:
    out = [gate.push(p).text for p in pieces[:-1]]
    last = gate.finish(pieces[-1], stop=stop, length=length)
    return [*out, last.text], "".join([*out, last.text]), last.trimmed


def test_holds_back_only_a_possible_stop_prefix() -> None:
    gate = TextGate(["</s>", "### 指示:"])
    assert gate.push("答え").text == "答え"  # no stop starts with any tail: nothing held
    assert gate.push("です<").text == "です"  # "<" may begin "</s>"
    assert gate.push("/").text == ""
    assert gate.push("x").text == "</x"  # no longer a prefix: released at once


def test_stop_string_split_over_pieces_is_cut_and_never_shown() -> None:
    chunks, text, _ = run(TextGate(["</s>"]), ["東京", "です。<", "/s", ">"], stop="</s>")
    assert text == "東京です。"
    assert not any("<" in c for c in chunks)


def test_turn_marker_cut() -> None:
    _, text, _ = run(TextGate(["### 指示:"]), ["答え。\n", "###", " 指", "示:"], stop="### 指示:")
    assert text == "答え。\n"


def test_keep_stop() -> None:
    _, text, _ = run(TextGate(["</s>"], keep_stop=True), ["a", "</s>"], stop="</s>")
    assert text == "a</s>"


def test_sentence_trim_holds_unfinished_sentence_and_trims_at_length() -> None:
    chunks, text, trimmed = run(TextGate([], trim=True), ["今日は", "晴れ。明", "日は雨"],
                                length=True)
    assert chunks == ["", "今日は晴れ。", ""]
    assert text == "今日は晴れ。" and trimmed


def test_sentence_trim_releases_everything_on_a_natural_stop() -> None:
    _, text, trimmed = run(TextGate(["</s>"], trim=True), ["今日は", "晴れ。明日", "</s>"],
                           stop="</s>")
    assert text == "今日は晴れ。明日" and not trimmed


def test_sentence_trim_keeps_text_without_any_sentence_end() -> None:
    _, text, trimmed = run(TextGate([], trim=True), ["とても", "長い"], length=True)
    assert text == "とても長い" and not trimmed


@pytest.mark.parametrize(("text", "end"), [
    ("今日は晴れ。明日は", 6),
    ("「はい。」と言", 5),
    ("本当？信じ", 3),
    ("Hi. The", 3),
    ("pi is 3.14 now", 0),
    ("Done.", 5),
    ("no end", 0),
])
def test_sentence_end(text: str, end: int) -> None:
    assert sentence_end(text) == end


def test_ascii_period_at_the_end_waits_for_more_text() -> None:
    assert sentence_end("pi is 3.", final=False) == 0
    assert sentence_end("pi is 3.", final=True) == 8
