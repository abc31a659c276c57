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

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    def for_tokenizer(cls, tokenizer: Any, turn_markers: Sequence[str] = (),
                      eos_truncation: bool = True, eos: EosSources | None = None) -> StopPolicy:
        eos = eos or EosSources.of(tokenizer)
        texts = [t for t in (tokenizer.convert_ids_to_tokens(i) for i in eos.ids)
                 if isinstance(t, str) and t]
        return cls(eos_texts=tuple(dict.fromkeys(texts)), eos_ids=eos.ids,
                   turn_markers=tuple(dict.fromkeys(turn_markers)), eos_truncation=eos_truncation)


@dataclass(frozen=True)
class EosSources:
    """Every token a model declares as its end: the tokenizer's `eos_token`, the `eos_token_id`
    of `generation_config.json` (an id or a list), and the token the chat template writes after
    an assistant turn. They disagree more often than not in real models: GGUF conversions (a
    SmolLM2 GGUF names `<|im_start|>` as EOS while its template ends turns with `<|im_end|>`),
    and merges that rewrite one file but not another, which is a known cause of runaway
    generation. moegi stops on all of them."""

    tokenizer: tuple[int, ...] = ()
    generation_config: tuple[int, ...] = ()
    template: tuple[int, ...] = ()

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys((*self.tokenizer, *self.generation_config, *self.template)))

    @classmethod
    def of(cls, tokenizer: Any, model_dir: Path | None = None,
           template: str | None = None) -> EosSources:
        tok = getattr(tokenizer, "eos_token_id", None)
        gen: tuple[int, ...] = ()
        if model_dir is not None and (model_dir / "generation_config.json").is_file():
            declared = json.loads((model_dir / "generation_config.json").read_text()).get(
                "eos_token_id")
            gen = tuple(declared) if isinstance(declared, list) else (
                (declared,) if isinstance(declared, int) else ())
        end = _end_of_turn(tokenizer, template) if template else None
        return cls((tok,) if isinstance(tok, int) else (), gen, (end,) if end is not None else ())

    def disagreement(self, tokenizer: Any) -> str | None:
        """A start-up warning when the sources name different tokens, else None."""
        named = {k: v for k, v in (("tokenizer eos_token", self.tokenizer),
                                   ("generation_config.json eos_token_id", self.generation_config),
                                   ("the chat template's end of turn", self.template)) if v}
        if len({v for v in named.values()}) <= 1:
            return None
        parts = [f"{k} {', '.join(f'{i} {tokenizer.convert_ids_to_tokens(i)!r}' for i in v)}"
                 for k, v in named.items()]
        return ("the model's EOS sources disagree (" + "; ".join(parts) + "): moegi stops on "
                "every one of them")


def _end_of_turn(tokenizer: Any, template: str) -> int | None:
    """The special token the template writes right after an assistant message, if any."""
    mark = "MOEGI-END-OF-TURN-PROBE"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "?"}, {"role": "assistant", "content": mark}],
            chat_template=template, tokenize=False)
    except Exception:  # a template that needs other roles or variables: no end-of-turn token
        return None
    after = str(text).split(mark, 1)[-1].lstrip()
    specials = sorted((t for t in getattr(tokenizer, "all_special_tokens", []) if t),
                      key=len, reverse=True)
    specials += sorted((t for t in getattr(tokenizer, "get_added_vocab", dict)() if t),
                       key=len, reverse=True)
    for token in specials:
        if after.startswith(token):
            ids = tokenizer.convert_tokens_to_ids([token])
            return int(ids[0]) if ids and ids[0] is not None else None
    return None
