"""Per-choice output gate: decides which generated text may go to the client now.

The engine reports text as soon as it is whole UTF-8 (vLLM's incremental detokenizer holds back
incomplete byte-fallback sequences) and keeps a matched stop string at the end of its output.
This gate:

- holds back only the longest tail that is still a prefix of some stop string (vLLM holds back
  len(longest stop) - 1 characters on every chunk; here "日本" after "### 指示:" costs nothing);
- cuts the stop string that ended the choice, so no reply, streamed or not, ever contains it,
  and no stream shows a partial stop string that is later cut;
- optionally trims a reply that hit the length limit back to its last sentence end, holding back
  the unfinished sentence while streaming (the seed progress report: replies cut mid-sentence).
"""

from __future__ import annotations

from collections.abc import Sequence

# Sentence ends, and the closing quotes/brackets that may follow them.
SENTENCE_ENDS = frozenset("。！？!?.．")
CLOSERS = frozenset("」』）)】〕］]〉》\"'”’")


def sentence_end(text: str, final: bool = True) -> int:
    """Length of the longest prefix of `text` that ends a sentence (0 if none).

    An ASCII period ends a sentence only before white space, or at the very end when the text
    is `final` ("3.14" and "e.g." are no sentence ends while more text may follow).
    """
    i = len(text)
    while i > 0:
        j = i
        while j > 0 and text[j - 1] in CLOSERS:
            j -= 1
        ends = j > 0 and text[j - 1] in SENTENCE_ENDS
        if ends and (text[j - 1] != "." or (final if i == len(text) else text[i].isspace())):
            return i
        i -= 1
    return 0


class TextGate:
    """Hold-back and cut for one choice's text (one gate per choice, not thread-safe)."""

    __slots__ = ("_buf", "_keep_stop", "_stops", "_trim", "emitted")

    def __init__(self, stops: Sequence[str], *, keep_stop: bool = False, trim: bool = False):
        self._stops = tuple(stops)
        self._keep_stop = keep_stop
        self._trim = trim
        self._buf = ""
        self.emitted = ""  # everything released so far (the non-streamed reply is the same)

    def _holdback(self) -> int:
        """Characters at the end of the buffer that could still begin a stop string."""
        buf, best = self._buf, 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best

    def push(self, text: str) -> str:
        """Add engine text for a step that did not finish the choice; return what may go out."""
        self._buf += text
        cut = len(self._buf) - (0 if self._keep_stop else self._holdback())
        if self._trim:
            cut = min(cut, sentence_end(self._buf[:cut], final=False))
        out, self._buf = self._buf[:cut], self._buf[cut:]
        self.emitted += out
        return out

    def finish(self, text: str, stop: str | None, length: bool) -> tuple[str, bool]:
        """Add the final text; cut the stop string `stop` if it ended the choice.

        Returns what goes out now and whether a sentence trim removed text.
        """
        self._buf += text
        if stop and not self._keep_stop and self._buf.endswith(stop):
            self._buf = self._buf[: -len(stop)]
        trimmed = False
        if self._trim and length:
            whole = self.emitted + self._buf
            end = sentence_end(whole)
            # Keep the text when no sentence ended at all: an empty reply helps nobody.
            if end:
                trimmed = end < len(whole)
                self._buf = whole[len(self.emitted) : end] if end >= len(self.emitted) else ""
        out, self._buf = self._buf, ""
        self.emitted += out
        return out, trimmed
