"""Per-choice output gate: which generated text, and which tokens, may go to the client now.

The engine reports text as soon as it is whole UTF-8 (vLLM's incremental detokenizer holds back
incomplete byte-fallback sequences) and keeps a matched stop string at the end of its output.
This gate:

- holds back only the longest tail that is still a prefix of some stop string (vLLM holds back
  len(longest stop) - 1 characters on every chunk; here "日本" after "### 指示:" costs nothing);
- cuts the stop string that ended the choice, so no reply, streamed or not, ever contains it,
  and no stream shows a partial stop string that is later cut;
- at a length finish, drops a trailing partial *policy* stop (a prefix of the EOS text or of a
  turn marker: "…咲きます。<" ends as "…咲きます。"); a partial user stop is kept, as OpenAI does;
- optionally trims a reply that hit the length limit back to its last sentence end, holding back
  the unfinished sentence while streaming (gamma-7b fine-tunes cut mid-sentence at 64 tokens);
- releases each token with the text it spells, so logprobs and token ids are the reply's: a
  token wholly inside cut text goes with it, and a token that straddles the cut stays with only
  the bytes that lie in the reply (its logprob is the whole token's).

Every character is looked at a bounded number of times: partial stops are tracked with one
Knuth-Morris-Pratt automaton per stop string, sentence ends with a small scanner, so the work is
linear in the reply length (tests/unit/test_textgate.py counts it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# Sentence ends, and the closing quotes/brackets that may follow them.
SENTENCE_ENDS = frozenset("。！？!?.．")
CLOSERS = frozenset("」』）)】〕］]〉》\"'”’")


def sentence_end(text: str, final: bool = True) -> int:
    """Length of the longest prefix of `text` that ends a sentence (0 if none).

    An ASCII period ends a sentence only before white space, or at the very end when the text
    is `final` ("3.14" and "e.g." are no sentence ends while more text may follow).
    """
    scanner = _SentenceScanner()
    scanner.feed(text)
    return scanner.end(final)


class _SentenceScanner:
    """The last sentence end of a growing text, one look at each character."""

    __slots__ = ("_candidate", "_dot", "_last", "_pos")

    def __init__(self) -> None:
        self._pos = 0  # characters seen
        self._last = 0  # end of the last confirmed sentence
        self._candidate = -1  # end after a terminator (and its closers), -1: none
        self._dot = False  # the candidate's terminator is an ASCII period (needs a space after)

    def feed(self, text: str) -> None:
        for ch in text:
            j = self._pos
            if ch in SENTENCE_ENDS:
                self._candidate, self._dot = j + 1, ch == "."
                if not self._dot:
                    self._last = j + 1
            elif ch in CLOSERS and self._candidate == j:
                self._candidate = j + 1
                if not self._dot:
                    self._last = j + 1
            else:
                if self._dot and self._candidate == j and ch.isspace():
                    self._last = j
                self._candidate = -1
            self._pos = j + 1

    def end(self, final: bool) -> int:
        if final and self._dot and self._candidate == self._pos:
            return self._pos
        return self._last


class _PartialMatch:
    """Knuth-Morris-Pratt state: the longest prefix of `stop` that the text seen ends with."""

    __slots__ = ("_fail", "state", "stop")

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.state = 0
        fail = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            fail[i] = k
        self._fail = fail

    def feed(self, text: str) -> None:
        stop, fail, k = self.stop, self._fail, self.state
        for ch in text:
            if k == len(stop):
                k = fail[k - 1]
            while k and ch != stop[k]:
                k = fail[k - 1]
            if ch == stop[k]:
                k += 1
        self.state = k


@dataclass(slots=True)
class GatedToken:
    """A released token: its id, its logprobs entry (if asked for), and the bytes it spells in
    the reply (fewer than the token's own where the reply was cut inside it)."""

    token_id: int
    logprobs: Any  # engine.TokenLogprobs | None
    text_bytes: bytes


@dataclass(slots=True)
class Released:
    text: str
    tokens: list[GatedToken]
    trimmed: bool = False


class TextGate:
    """Hold-back and cut for one choice's text and tokens (one gate per choice)."""

    def __init__(self, stops: Sequence[str], *, keep_stop: bool = False, trim: bool = False,
                 droppable: Sequence[str] = (),
                 token_bytes: Callable[[int], bytes] | None = None) -> None:
        self._matches = [_PartialMatch(s) for s in dict.fromkeys(stops) if s]
        self._droppable = frozenset(droppable)
        self._keep_stop = keep_stop
        self._sentences = _SentenceScanner() if trim else None
        self._buf = ""
        self._emitted_chars = 0
        self.emitted = ""  # everything released so far (the non-streamed reply is the same)
        # Tokens not yet released: (start, end) byte offsets in the engine's text, id, logprobs.
        self._token_bytes = token_bytes
        self._pending: list[tuple[int, int, int, Any, bytes]] = []
        self._token_end = 0
        self._released_bytes = 0
        self.scanned = 0  # characters fed to the automata (the linear-time check in the tests)

    def _feed(self, text: str, token_ids: Sequence[int], logprobs: Sequence[Any] | None) -> None:
        self.scanned += len(text) * (len(self._matches) + (self._sentences is not None))
        for m in self._matches:
            m.feed(text)
        if self._sentences is not None:
            self._sentences.feed(text)
        self._buf += text
        if self._token_bytes is None:
            return
        for i, tid in enumerate(token_ids):
            raw = self._token_bytes(tid)
            start, self._token_end = self._token_end, self._token_end + len(raw)
            self._pending.append((start, self._token_end, tid, logprobs[i] if logprobs else None,
                                  raw))

    def _release(self, text: str) -> Released:
        """Release `text` (what goes out after everything before) and the tokens it completes."""
        self.emitted += text
        self._emitted_chars += len(text)
        self._released_bytes += len(text.encode("utf-8"))
        n = 0
        while n < len(self._pending) and self._pending[n][1] <= self._released_bytes:
            n += 1
        ready, self._pending = self._pending[:n], self._pending[n:]
        return Released(text, [GatedToken(tid, lp, raw) for _, _, tid, lp, raw in ready])

    def push(self, text: str, token_ids: Sequence[int] = (), logprobs: Sequence[Any] | None = None
             ) -> Released:
        """Add engine output for a step that did not finish the choice; return what may go out."""
        self._feed(text, token_ids, logprobs)
        held = 0 if self._keep_stop else max((m.state for m in self._matches), default=0)
        cut = len(self._buf) - min(held, len(self._buf))
        if self._sentences is not None:
            cut = min(cut, max(0, self._sentences.end(final=False) - self._emitted_chars))
        out, self._buf = self._buf[:cut], self._buf[cut:]
        return self._release(out)

    def finish(self, text: str, token_ids: Sequence[int] = (),
               logprobs: Sequence[Any] | None = None, *, stop: str | None = None,
               length: bool = False, stopped_on_token: bool = False) -> Released:
        """Add the final output and cut what does not belong to the reply.

        `stop`: the stop string that ended the choice (cut unless keep_stop); `length`: the
        length limit ended it; `stopped_on_token`: the EOS token or a stop token id ended it
        (that token is not part of the reply). `trimmed` says whether a sentence trim cut text.
        """
        self._feed(text, token_ids, logprobs)
        if stopped_on_token and self._pending and not self._pending[-1][4]:
            self._pending.pop()  # the EOS / stop token itself: it spells nothing of the reply
        engine_chars = self._emitted_chars + len(self._buf)
        if stop and not self._keep_stop and self._buf.endswith(stop):
            self._buf = self._buf[: -len(stop)]
        elif length and not self._keep_stop:
            partial = max((m.state for m in self._matches
                           if m.stop in self._droppable and m.state < len(m.stop)), default=0)
            self._buf = self._buf[: len(self._buf) - min(partial, len(self._buf))]
        trimmed = False
        if self._sentences is not None and length:
            end = self._sentences.end(final=True)
            # Keep the text when no sentence ended at all: an empty reply helps nobody.
            if end and end < self._emitted_chars + len(self._buf):
                trimmed = True
                self._buf = self._buf[: max(0, end - self._emitted_chars)]
        cut = self._emitted_chars + len(self._buf) < engine_chars
        out, self._buf = self._buf, ""
        released = self._release(out)
        rest, self._pending = self._pending, []
        reply_bytes = self._released_bytes
        for start, _, tid, lp, raw in rest:
            if not cut:  # nothing was cut: every token is the reply's, whatever it spells
                released.tokens.append(GatedToken(tid, lp, raw))
            elif start < reply_bytes:  # straddles the cut: keep the part inside the reply
                released.tokens.append(GatedToken(tid, lp, raw[: reply_bytes - start]))
        released.trimmed = trimmed
        return released
