"""EOS truncation policy: which stop strings a request gets, and which stop fired.

Fine-tuned models that learned their EOS token as text print `</s>` and go on (seed progress
report; vLLM #2686, transformers #23175). vLLM, TGI and llama.cpp stop on the EOS *id* only. By
default moegi also stops on the EOS *text* (however the model spells it across tokens: the
engine matches stop strings on detokenized text) and on the template's turn markers (a model
that starts a new `### 指示:` turn by itself). A request can opt out with `eos_truncation: false`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Stop types reported in responses (`stop_type`) and counted in metrics.
EOS_TOKEN = "eos_token"
EOS_TEXT = "eos_text"
TURN_MARKER = "turn_marker"
STOP_STRING = "stop_string"
STOP_TOKEN = "stop_token"
SENTENCE_TRIM = "sentence_trim"
LENGTH = "length"
ABORT = "abort"
STOP_TYPES = (EOS_TOKEN, EOS_TEXT, TURN_MARKER, STOP_STRING, STOP_TOKEN, SENTENCE_TRIM, LENGTH)


@dataclass(frozen=True)
class StopPolicy:
    eos_texts: tuple[str, ...] = ()
    eos_ids: tuple[int, ...] = ()
    turn_markers: tuple[str, ...] = ()
    enforce: bool = True  # the server default; a request may override it

    def strings(self, user: Sequence[str], enforce: bool | None = None) -> tuple[str, ...]:
        """The stop strings for a request: the user's, then EOS texts and turn markers."""
        on = self.enforce if enforce is None else enforce
        extra = (*self.eos_texts, *self.turn_markers) if on else ()
        return tuple(dict.fromkeys(s for s in (*user, *extra) if s))

    def classify(self, finish_reason: str, stop_reason: int | str | None, trimmed: bool) -> str:
        """Name the stop that ended a choice."""
        if trimmed:
            return SENTENCE_TRIM
        if finish_reason == "length":
            return LENGTH
        if finish_reason == "abort":
            return ABORT
        if stop_reason is None or (isinstance(stop_reason, int) and stop_reason in self.eos_ids):
            return EOS_TOKEN
        if isinstance(stop_reason, int):
            return STOP_TOKEN
        if stop_reason in self.eos_texts:
            return EOS_TEXT
        if stop_reason in self.turn_markers:
            return TURN_MARKER
        return STOP_STRING

    @classmethod
    def for_tokenizer(cls, tokenizer: object, turn_markers: Sequence[str] = (),
                      enforce: bool = True) -> StopPolicy:
        eos = getattr(tokenizer, "eos_token", None)
        eos_id = getattr(tokenizer, "eos_token_id", None)
        return cls(eos_texts=(eos,) if eos else (), eos_ids=(eos_id,) if eos_id is not None else (),
                   turn_markers=tuple(turn_markers), enforce=enforce)
