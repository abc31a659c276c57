"""What chat, text completions and responses share: the served model, request checks, one
engine run, and SSE framing.

`ServedModel` is one model behind the API: its tokenizer, context length, chat template, stop
policy and limits. `check_request` applies the checks that need them (token ids in the
vocabulary, the per-request bounds). `Run` drives one engine request and turns engine deltas
into per-choice events that have passed the `TextGate` (stop strings cut, partial stops held
back, optional sentence trim, tokens aligned with the text); the `serving_*` modules only
format those events for the wire.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from serve import metrics
from serve.config import Limits
from serve.engine import Engine, SamplingSpec, TokenLogprobs
from serve.errors import APIError
from serve.protocol import SamplingRequest
from serve.stops import StopPolicy
from serve.textgate import GatedToken, TextGate

# Inputs longer than this are tokenized off the event loop, so /health never waits on them.
_INLINE_TOKENIZE_CHARS = 4096


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
    limits: Limits = field(default_factory=Limits)
    stream_interval_s: float = 0.0  # least time between a stream's chunks (config.py)
    created: int = field(default_factory=lambda: int(time.time()))
    _bytes: dict[int, bytes] = field(default_factory=dict, repr=False)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def check_name(self, name: str | None) -> None:
        """404 unless `name` is the served model's (None: the request named none)."""
        if name is not None and name != self.name:
            raise APIError(f"model {name!r} does not exist; this server serves {self.name!r} "
                           "(see GET /v1/models)", 404, "model", "model_not_found")

    def check_ids(self, ids: Iterable[int | str], param: str, what: str) -> None:
        """400 unless every id is in the vocabulary (`what` names them in the message)."""
        vocab = self.vocab_size
        if any(not 0 <= int(t) < vocab for t in ids):
            raise APIError(f"{what} must be token ids in [0, {vocab})", 400, param,
                           "invalid_value")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token adds to the detokenized text (cached per id).

        A byte-fallback piece such as <0xE6> is that one byte (half a character); a special
        token (BOS, EOS) adds nothing, as the text skips it; SentencePiece's "▁" is a space.
        """
        hit = self._bytes.get(token_id)
        if hit is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                hit = bytes([int(piece[3:5], 16)])
            elif token_id in self.tokenizer.all_special_ids:
                hit = b""
            else:
                hit = piece.replace("▁", " ").encode("utf-8")
            self._bytes[token_id] = hit
        return hit

    def token_str(self, token_id: int) -> str:
        """A token as OpenAI logprobs show it (special tokens by their own text)."""
        raw = self.token_bytes(token_id)
        if not raw and token_id in self.tokenizer.all_special_ids:
            return str(self.tokenizer.convert_ids_to_tokens(token_id))
        return bytes_text(raw)

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`; long texts are tokenized in a thread, off the event loop."""
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        return list(await asyncio.to_thread(self.tokenizer.encode, text,
                                            add_special_tokens=add_special_tokens))

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


def bytes_text(raw: bytes) -> str:
    """Bytes as a logprobs `token`: the text, or `bytes:\\xe6\\x97` for part of a character."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def check_request(model: ServedModel, req: SamplingRequest, prompts: int = 1,
                  logprobs: int | None = None) -> None:
    """404 for an unknown model; 400 for what the server's limits or the vocabulary refuse."""
    model.check_name(req.model)
    lim = model.limits
    stops = req.stop_list()
    if len(stops) > lim.max_stop:
        raise APIError(f"{len(stops)} stop strings; the limit is {lim.max_stop} (--max-stop)",
                       400, "stop", "too_many_stop_strings")
    if any(len(s) > lim.max_stop_length for s in stops):
        raise APIError(f"a stop string is longer than {lim.max_stop_length} characters "
                       "(--max-stop-length)", 400, "stop", "stop_string_too_long")
    ids = req.stop_token_ids or []
    if len(ids) > lim.max_stop_token_ids:
        raise APIError(f"{len(ids)} stop_token_ids; the limit is {lim.max_stop_token_ids} "
                       "(--max-stop-token-ids)", 400, "stop_token_ids", "too_many_stop_token_ids")
    model.check_ids(ids, "stop_token_ids", "stop_token_ids")
    bias = req.logit_bias or {}
    if len(bias) > lim.max_logit_bias:
        raise APIError(f"{len(bias)} logit_bias entries; the limit is {lim.max_logit_bias} "
                       "(--max-logit-bias)", 400, "logit_bias", "too_many_logit_bias")
    model.check_ids(bias, "logit_bias", "logit_bias keys")
    if prompts > lim.max_prompts:
        raise APIError(f"{prompts} prompts in one request; the limit is {lim.max_prompts} "
                       "(--max-prompts): send several requests", 400, "prompt", "too_many_prompts")
    if prompts * req.n > lim.max_choices:
        raise APIError(f"n x prompts is {prompts * req.n}; the limit is {lim.max_choices} "
                       "(--max-choices)", 400, "n", "too_many_choices")
    if logprobs is not None and logprobs > lim.max_logprobs:
        raise APIError(f"{logprobs} logprobs asked for; the limit is {lim.max_logprobs} "
                       "(--max-logprobs)", 400, "top_logprobs", "too_many_logprobs")


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


SSE_DONE = "data: [DONE]\n\n"


class SSEFrames:
    """The fixed parts of a stream's chunks, serialised once per stream.

    A chunk is `data: <head><choices><tail>`; only the choices part is built per chunk, so no
    pydantic object or dict is made per token on the hot path.
    """

    def __init__(self, request_id: str, obj: str, model: str, include_usage: bool,
                 running: Callable[[], Usage] | None = None) -> None:
        self.head = (f'data: {{"id":"{request_id}","object":"{obj}","created":{int(time.time())},'
                     f'"model":{json.dumps(model)},"choices":[')
        self.tail = "],\"usage\":null}\n\n" if include_usage else "]}\n\n"
        self.include_usage = include_usage
        self.running = running  # continuous_usage_stats: the usage so far, in every chunk

    def chunk(self, choice_json: str) -> str:
        if self.running is not None:
            return (self.head + choice_json + '],"usage":'
                    + json.dumps(self.running().as_dict()) + "}\n\n")
        return self.head + choice_json + self.tail

    def usage(self, usage: Usage) -> str:
        """The usage trailer (empty choices), when the client asked for it."""
        if not self.include_usage:
            return ""
        return self.head + f'],"usage":{json.dumps(usage.as_dict())}}}\n\n'
