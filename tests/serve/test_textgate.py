"""The output gate: minimal hold-back, stop cutting, sentence trim."""

from __future__ import annotations

from typing import Any

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


def _brute_holdback(text: str, stops: list[str]) -> int:
    """The longest tail of `text` that is a proper prefix of some stop (the definition)."""
    best = 0
    for s in stops:
        for k in range(1, min(len(s) - 1, len(text)) + 1):
            if text.endswith(s[:k]):
                best = max(best, k)
    return best


def test_holdback_matches_its_definition_on_random_text() -> None:
    import random

    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choice("ab<") for _ in range(rng.randint(1, 5))) for _ in range(3)]
        gate = TextGate(stops)
        text = ""
        for _ in range(30):
            piece = "".join(rng.choice("ab<") for _ in range(rng.randint(0, 2)))
            if any(s in text + piece for s in stops):
                break  # the engine would have stopped here
            text += piece
            gate.push(piece)
            assert len(text) - len(gate.emitted) == _brute_holdback(text, stops), (stops, text)


@pytest.mark.parametrize("pieces", [
    ["あ"] * 8000,  # no sentence end ever: the old gate rescanned everything per token
    ["」"] * 2000,  # closing brackets: the old scanner was cubic here
])
def test_work_is_linear_in_the_reply(pieces: list[str]) -> None:
    """Characters looked at, not seconds: at most a constant per character and stop."""
    stops = ["</s>", "### 指示:", "### 入力:", "### 応答:"]
    gate = TextGate(stops, trim=True)
    for p in pieces[:-1]:
        gate.push(p)
    gate.finish(pieces[-1], length=True)
    n = sum(map(len, pieces))
    assert gate.scanned <= n * (len(stops) + 1)
    assert gate.scanned >= n  # and it did look at every character


# A tiny "tokenizer": each token is its text's UTF-8, "S" is a special token (no text).
VOCAB = {1: "東京".encode(), 2: "です".encode(), 3: "。".encode(), 4: b"<", 5: b"/s",
         6: b">", 7: "。<".encode(), 8: b"\xe6", 9: b"\x97", 10: b"\xa5", 0: b""}


def _run_tokens(gate: TextGate, steps: list[tuple[str, list[int]]], **finish: Any
                ) -> tuple[str, list[Any]]:
    text, tokens = "", []
    for piece, ids in steps[:-1]:
        out = gate.push(piece, ids, [f"lp{t}" for t in ids])
        text += out.text
        tokens += out.tokens
    piece, ids = steps[-1]
    out = gate.finish(piece, ids, [f"lp{t}" for t in ids], **finish)
    return text + out.text, tokens + out.tokens


def test_tokens_spell_exactly_the_reply_after_a_stop_cut() -> None:
    gate = TextGate(["</s>"], token_bytes=VOCAB.__getitem__)
    steps = [("東京", [1]), ("です", [2]), ("。", [3]), ("<", [4]), ("/s", [5]), (">", [6])]
    text, tokens = _run_tokens(gate, steps, stop="</s>")
    assert text == "東京です。"
    assert b"".join(t.text_bytes for t in tokens) == text.encode()
    assert [t.token_id for t in tokens] == [1, 2, 3]  # the cut tokens went with the text
    assert [t.logprobs for t in tokens] == ["lp1", "lp2", "lp3"]


def test_a_token_that_straddles_the_cut_keeps_only_its_reply_bytes() -> None:
    gate = TextGate(["</s>"], token_bytes=VOCAB.__getitem__)
    steps = [("東京", [1]), ("です", [2]), ("。<", [7]), ("/s", [5]), (">", [6])]
    text, tokens = _run_tokens(gate, steps, stop="</s>")
    assert text == "東京です。"
    assert [t.token_id for t in tokens] == [1, 2, 7]
    assert tokens[-1].text_bytes == "。".encode() and tokens[-1].logprobs == "lp7"


def test_the_eos_token_is_not_a_reply_token_and_bytes_wait_for_whole_characters() -> None:
    gate = TextGate(["</s>"], token_bytes=VOCAB.__getitem__)
    # "日" spelled over three byte tokens: the engine sends its text with the third.
    steps = [("", [8]), ("", [9]), ("日", [10]), ("", [0])]
    out = [gate.push(p, ids, [None] * len(ids)).tokens for p, ids in steps[:2]]
    assert out == [[], []]  # no token before its character is whole
    text, tokens = _run_tokens(TextGate(["</s>"], token_bytes=VOCAB.__getitem__), steps,
                               stopped_on_token=True)
    assert text == "日" and [t.token_id for t in tokens] == [8, 9, 10]
    assert b"".join(t.text_bytes for t in tokens) == "日".encode()


def test_a_length_finish_drops_a_partial_eos_but_keeps_a_partial_user_stop() -> None:
    gate = TextGate(["</s>", "STOP"], droppable=["</s>"], token_bytes=VOCAB.__getitem__)
    text, tokens = _run_tokens(gate, [("東京", [1]), ("。<", [7])], length=True)
    assert text == "東京。"  # "<" could only have begun "</s>": the reply is cut anyway
    assert tokens[-1].text_bytes == "。".encode()
    gate = TextGate(["</s>", "STOP"], droppable=["</s>"])
    _, text_user, _ = run(gate, ["東京", "ST"], length=True)
    assert text_user == "東京ST"  # OpenAI returns a partial user stop at max_tokens
