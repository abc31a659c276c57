"""Server-sent events framing: `data:` frames, the closing `[DONE]`, and what a stream is.

A route's stream is an `EventStream`: its frames, and the frame that ends it after a failure
past its 200. Chat and completions streams are `ChunkStream`s (an OpenAI error chunk, then
`[DONE]`); the Responses stream frames its own `error` event (serving_responses.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from serve.errors import sse_error
from serve.run import Usage

SSE_DONE = "data: [DONE]\n\n"


class EventStream(Protocol):
    def __aiter__(self) -> AsyncIterator[str]: ...

    def error_frame(self, exc: BaseException) -> str: ...


@dataclass
class ChunkStream:
    """An OpenAI chunk stream (chat, completions); a failure ends it with an error chunk."""

    chunks: AsyncIterator[str]

    def __aiter__(self) -> AsyncIterator[str]:
        return self.chunks

    def error_frame(self, exc: BaseException) -> str:
        return sse_error(exc) + SSE_DONE


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
