"""EOS truncation policy: which stop strings a request gets, and which stop fired.

Fine-tuned models that learned their EOS token as text print `</s>` and go on (a fine-tuned
japanese-stablelm-instruct-beta-7b did; vLLM #2686, transformers #23175). vLLM, TGI and
llama.cpp stop on the EOS *id* only. By default moegi also stops on the EOS *text* (however the
model spells it across tokens: the engine matches stop strings on detokenized text) and on the
template's turn markers: every section header it declares (instruction, input, response;
`[INST]`, `<<SYS>>`), when the model starts one by itself.
A request can opt out with `eos_truncation: false`.

A cut at any turn marker, a response header included, reports finish_reason `stop`,
stop_type `turn_marker` and the marker as stop_reason.
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


@dataclass(frozen=True)
class StopPolicy:
    eos_texts: tuple[str, ...] = ()
    eos_ids: tuple[int, ...] = ()
    turn_markers: tuple[str, ...] = ()
    eos_truncation: bool = True  # the server default; a request may override it

    @property
    def policy_strings(self) -> tuple[str, ...]:
        """The stops EOS truncation adds: EOS texts, then turn markers."""
        return (*self.eos_texts, *self.turn_markers)

    def strings(self, user: Sequence[str], eos_truncation: bool | None = None) -> tuple[str, ...]:
        """The stop strings for a request: the user's, then EOS texts and turn markers."""
        on = self.eos_truncation if eos_truncation is None else eos_truncation
        extra = self.policy_strings if on else ()
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
                      eos_truncation: bool = True) -> StopPolicy:
        eos = getattr(tokenizer, "eos_token", None)
        eos_id = getattr(tokenizer, "eos_token_id", None)
        return cls(eos_texts=(eos,) if eos else (), eos_ids=(eos_id,) if eos_id is not None else (),
                   turn_markers=tuple(dict.fromkeys(turn_markers)), eos_truncation=eos_truncation)
