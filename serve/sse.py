"""Server-sent events framing: `data:` frames, and the closing `[DONE]`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from serve.run import Usage

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
