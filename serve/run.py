"""One engine request (`Run`): engine deltas in, per-choice events out, metrics and abort kept.

`Run` drives one request on the engine, passes each choice's text through its `TextGate` (stop
strings cut, partial stops held back, optional sentence trim, tokens aligned with the text),
paces a stream's chunks, records usage and finish metrics, and aborts the engine request when
its consumer goes away. The `serving_*` modules only format its events for the wire.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from serve import metrics
from serve.engine import Engine, SamplingSpec, TokenLogprobs
from serve.model import ServedModel
from serve.protocol import SamplingRequest
from serve.textgate import GatedToken, TextGate


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass(slots=True)
class ChoiceEvent:
    """Gated output of one choice for one step (or, folded by `collect`, the whole choice)."""

    index: int
    text: str
    tokens: list[GatedToken] | None = None  # the reply's tokens, when asked for
    finish_reason: str | None = None  # OpenAI's: "stop" | "length"
    stop_type: str | None = None  # which stop fired, see StopPolicy.classify
    stop_reason: int | str | None = None  # the matched stop string or token id (vLLM's field)

    def extension_fields(self) -> dict[str, Any]:
        """moegi's fields on a finished choice."""
        return {"stop_reason": self.stop_reason, "stop_type": self.stop_type}

    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.tokens or ()]

    def logprobs(self) -> list[GatedToken] | None:
        """The tokens with logprobs (None when the request asked for none)."""
        if self.tokens is None or any(t.logprobs is None for t in self.tokens):
            return None
        return self.tokens


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


@dataclass(frozen=True)
class Gating:
    """How a request's output is gated: its stops, trim, and whether tokens are tracked."""

    stops: tuple[str, ...]
    keep_stop: bool
    trim: bool
    droppable: tuple[str, ...]
    tokens: bool
    eos_ids: tuple[int, ...] = ()  # every EOS the model declares (stops.EosSources)

    @classmethod
    def of(cls, model: ServedModel, req: SamplingRequest, tokens: bool) -> Gating:
        schema, json_object = req.structured()
        # Under a JSON constraint the grammar ends the reply; a stop string such as "</s>"
        # inside a JSON string would cut it into invalid JSON, so EOS truncation's stops and
        # sentence trim are off. The user's own stop strings still apply.
        constrained = schema is not None or json_object
        # A scoring request (echo + logprobs) reads one logprob per prompt token and then the
        # generated ones: cutting a generated token that begins "</s>" would shift them
        # (lm-eval sums token_logprobs[ctxlen:-1]). A request with ignore_eos (load testers:
        # vLLM's bench, guidellm) asks for exactly max_tokens. Both get the engine's tokens
        # unless they ask for truncation themselves.
        raw = req.scoring() or req.ignore_eos
        eos = False if constrained else (
            False if raw and req.eos_truncation is None else req.eos_truncation)
        trim = (model.sentence_trim and not raw) if req.sentence_trim is None \
            else req.sentence_trim
        return cls(model.stops.strings(req.stop_list(), eos), req.include_stop_str_in_output,
                   trim and not constrained, model.stops.policy_strings, tokens,
                   () if req.ignore_eos else model.stops.eos_ids)


class Run:
    """One engine request: its gated events, step by step, then its usage.

    Abandoning the iteration (client gone, task cancelled) aborts the engine request.
    """

    streams = 0  # streamed runs in progress in this process (pacing applies to two or more)

    def __init__(self, engine: Engine, model: ServedModel, prompt_ids: list[int],
                 spec: SamplingSpec, request_id: str, gating: Gating) -> None:
        self.engine, self.model, self.prompt_ids, self.spec = engine, model, prompt_ids, spec
        self.request_id = request_id
        self.usage = Usage()
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None
        self._tracking = gating.tokens
        token_bytes = model.token_bytes if gating.tokens else None
        self._gates = [TextGate(gating.stops, keep_stop=gating.keep_stop, trim=gating.trim,
                                droppable=gating.droppable, token_bytes=token_bytes)
                       for _ in range(spec.n)]

    async def __aiter__(self) -> AsyncIterator[list[ChoiceEvent]]:
        model, usage = self.model, self.usage
        finished = False
        start = time.perf_counter()
        # A non-streamed run arrives in one piece at its end: it has no first-token time.
        first_token = self.spec.incremental
        # Pacing: after each step, wait out the stream interval before asking for the next;
        # vLLM merges the deltas that arrive meanwhile, so they leave in one chunk. It saves
        # socket writes when there are many streams to write; a stream alone is not paced, as
        # the wait can hold its last chunk back by up to one interval.
        pace = model.stream_interval_s if self.spec.incremental else 0.0
        loop = asyncio.get_running_loop()
        Run.streams += self.spec.incremental
        try:
            async for step in self.engine.generate(self.prompt_ids, self.spec, self.request_id):
                stepped = loop.time()
                usage.prompt_tokens = step.num_prompt_tokens
                if step.prompt_logprobs is not None:
                    self.prompt_logprobs = step.prompt_logprobs
                events = []
                for c in step.choices:
                    usage.completion_tokens += len(c.token_ids)
                    if first_token and c.token_ids:
                        metrics.TIME_TO_FIRST_TOKEN.labels(model.name).observe(
                            time.perf_counter() - start)
                        first_token = False
                    gate = self._gates[c.index]
                    if c.finish_reason is None:
                        out = gate.push(c.text, c.token_ids, c.logprobs)
                        events.append(ChoiceEvent(c.index, out.text, out.tokens if
                                                  self._tracking else None))
                        continue
                    length = c.finish_reason == "length"
                    stop = c.stop_reason if isinstance(c.stop_reason, str) else None
                    out = gate.finish(c.text, c.token_ids, c.logprobs, stop=stop, length=length,
                                      stopped_on_token=c.finish_reason == "stop" and stop is None)
                    stop_type = model.stops.classify(c.finish_reason, c.stop_reason, out.trimmed)
                    reason = "length" if length and not out.trimmed else "stop"
                    metrics.observe_finish(model.name, reason, stop_type)
                    events.append(ChoiceEvent(c.index, out.text, out.tokens if self._tracking
                                              else None, reason, stop_type, c.stop_reason))
                yield events
                if pace and Run.streams > 1 and (wait := stepped + pace - loop.time()) > 0:
                    await asyncio.sleep(wait)
            finished = True
        finally:
            Run.streams -= self.spec.incremental
            if usage.prompt_tokens:
                metrics.observe_usage(model.name, usage.prompt_tokens, usage.completion_tokens)
            if not finished:
                # Client gone or task cancelled: free the engine's slot at once.
                await asyncio.shield(self.engine.abort(self.request_id))


async def collect(run: Run) -> list[ChoiceEvent]:
    """Fold a run into one final event per choice (text and tokens concatenated)."""
    out = [ChoiceEvent(i, "", None) for i in range(run.spec.n)]
    async for step_events in run:
        for e in step_events:
            acc = out[e.index]
            acc.text += e.text
            if e.tokens is not None:
                acc.tokens = (acc.tokens or []) + e.tokens
            if e.finish_reason is not None:
                acc.finish_reason, acc.stop_type = e.finish_reason, e.stop_type
                acc.stop_reason = e.stop_reason
    return out
