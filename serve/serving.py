"""What chat and text completions share: the served model, prompt checks, and the run loop.

`ServedModel` is one model behind the API: its tokenizer, context length, chat template and stop
policy. `run` drives one engine request and turns engine deltas into per-choice events that have
passed the `TextGate` (stop strings cut, partial stops held back, optional sentence trim);
`serving_chat.py` and `serving_completion.py` only format those events for the wire.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from serve import metrics
from serve.engine import Engine, EngineStep, SamplingSpec, TokenLogprobs
from serve.errors import APIError
from serve.stops import StopPolicy
from serve.textgate import TextGate


@dataclass
class ServedModel:
    """A model as the API serves it."""

    name: str
    tokenizer: Any  # a transformers tokenizer
    max_model_len: int
    stops: StopPolicy
    chat_template: str | None = None  # Jinja source
    template_name: str | None = None
    preset: str | None = None
    default_system: str | None = None  # used when a conversation has no system message
    sentence_trim: bool = False  # server default for the sentence-safe length limit
    sampling_defaults: dict[str, Any] = field(default_factory=dict)  # the preset's
    created: int = field(default_factory=lambda: int(time.time()))
    _token_strs: dict[int, tuple[str, list[int]]] = field(default_factory=dict, repr=False)

    def token_str(self, token_id: int) -> tuple[str, list[int]]:
        """A token as OpenAI logprobs show it: text and UTF-8 bytes (cached per id).

        A byte-fallback piece such as <0xE6> is half a character: its text is written
        "bytes:\\xe6" (as OpenAI does) and its bytes are the raw byte.
        """
        hit = self._token_strs.get(token_id)
        if hit is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                b = bytes([int(piece[3:5], 16)])
                hit = (f"bytes:\\x{b[0]:02x}", list(b))
            else:
                text = piece.replace("▁", " ")
                hit = (text, list(text.encode("utf-8")))
            self._token_strs[token_id] = hit
        return hit

    def apply_defaults(self, req: Any) -> None:
        """Fill the preset's sampling defaults into fields the request did not set."""
        for key, value in self.sampling_defaults.items():
            if key not in req.model_fields_set:
                setattr(req, key, value)

    def check_length(self, num_prompt: int, requested: int | None, param: str = "messages") -> int:
        """Validate prompt and completion length against the context; return max_tokens."""
        room = self.max_model_len - num_prompt
        if room <= 0:
            raise APIError(
                f"the prompt is {num_prompt} tokens but the context is {self.max_model_len} "
                "tokens: shorten the prompt (or start the server with a larger --max-model-len)",
                400, param, "context_length_exceeded")
        if requested is None:
            return room
        if requested > room:
            raise APIError(
                f"max_tokens is {requested} but only {room} tokens fit after the "
                f"{num_prompt}-token prompt in the {self.max_model_len}-token context: ask for "
                f"at most {room}", 400, "max_tokens", "context_length_exceeded")
        return requested


def check_model(served: ServedModel, req: Any) -> None:
    """404 for an unknown model id; then apply the model's preset defaults to the request."""
    requested = req.model
    if requested != served.name:
        raise APIError(f"model {requested!r} does not exist; this server serves {served.name!r} "
                       "(see GET /v1/models)", 404, "model", "model_not_found")
    served.apply_defaults(req)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass(slots=True)
class ChoiceEvent:
    """Gated output of one choice for one step."""

    index: int
    text: str
    logprobs: list[TokenLogprobs] | None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # OpenAI's: "stop" | "length"
    stop_type: str | None = None  # which stop fired, see StopPolicy.classify
    stop_reason: int | str | None = None  # the matched stop string or token id (vLLM's field)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def total(cls, parts: Sequence[Usage]) -> Usage:
        """The usage of a batch: the sum of its requests'."""
        return cls(sum(u.prompt_tokens for u in parts), sum(u.completion_tokens for u in parts))

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


async def run(
    engine: Engine,
    model: ServedModel,
    prompt_ids: list[int],
    spec: SamplingSpec,
    request_id: str,
    usage: Usage,
    *,
    keep_stop: bool = False,
    trim: bool = False,
) -> AsyncIterator[tuple[list[ChoiceEvent], EngineStep]]:
    """Drive one engine request; yield gated events per step. Aborts the request if abandoned."""
    gates = [TextGate(spec.stop, keep_stop=keep_stop, trim=trim) for _ in range(spec.n)]
    finished = False
    start = time.perf_counter()
    first_token = True
    try:
        async for step in engine.generate(prompt_ids, spec, request_id):
            usage.prompt_tokens = step.num_prompt_tokens
            events = []
            for c in step.choices:
                usage.completion_tokens += len(c.token_ids)
                if first_token and c.token_ids:
                    metrics.TIME_TO_FIRST_TOKEN.labels(model.name).observe(
                        time.perf_counter() - start)
                    first_token = False
                gate = gates[c.index]
                if c.finish_reason is None:
                    events.append(ChoiceEvent(c.index, gate.push(c.text), c.logprobs, c.token_ids))
                    continue
                length = c.finish_reason == "length"
                stop = c.stop_reason if isinstance(c.stop_reason, str) else None
                text, trimmed = gate.finish(c.text, stop, length)
                stop_type = model.stops.classify(c.finish_reason, c.stop_reason, trimmed)
                reason = "length" if length and not trimmed else "stop"
                metrics.observe_finish(model.name, reason, stop_type)
                events.append(ChoiceEvent(c.index, text, c.logprobs, c.token_ids, reason,
                                          stop_type, c.stop_reason))
            yield events, step
        finished = True
    finally:
        if usage.prompt_tokens:
            metrics.observe_usage(model.name, usage.prompt_tokens, usage.completion_tokens)
        if not finished:
            # Client gone or task cancelled: free the engine's slot at once.
            await asyncio.shield(engine.abort(request_id))


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def collect(events: AsyncIterator[tuple[list[ChoiceEvent], EngineStep]], n: int
                  ) -> tuple[list[ChoiceEvent], list[TokenLogprobs | None] | None]:
    """Fold a run into one final event per choice (text and logprobs concatenated)."""
    out = [ChoiceEvent(i, "", None) for i in range(n)]
    prompt_lps = None
    async for step_events, step in events:
        if step.prompt_logprobs is not None:
            prompt_lps = step.prompt_logprobs
        for e in step_events:
            acc = out[e.index]
            acc.text += e.text
            acc.token_ids += e.token_ids
            if e.logprobs is not None:
                acc.logprobs = (acc.logprobs or []) + e.logprobs
            if e.finish_reason is not None:
                acc.finish_reason, acc.stop_type = e.finish_reason, e.stop_type
                acc.stop_reason = e.stop_reason
    return out, prompt_lps


def stop_fields(e: ChoiceEvent) -> dict[str, Any]:
    """moegi's extension fields on a finished choice."""
    return {"stop_reason": e.stop_reason, "stop_type": e.stop_type}


def merge_stops(*groups: Sequence[str]) -> tuple[str, ...]:
    """Stop strings in priority order, without duplicates."""
    return tuple(dict.fromkeys(s for g in groups for s in g if s))
