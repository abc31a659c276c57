"""The model as the API serves it (`ServedModel`), and the request checks that need it.

`ServedModel` is one model behind the API: its tokenizer with the bytes each token adds to the
text, its context length, chat template, stop policy and per-request limits. Its `check_*`
methods and `check_request` are the one place each check lives (unknown model, token ids,
context length, the per-request bounds); every endpoint calls them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from serve.config import Limits
from serve.errors import APIError
from serve.protocol import SamplingRequest
from serve.stops import StopPolicy

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
