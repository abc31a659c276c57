"""POST /v1/responses: OpenAI's Responses API over the same engine run, stateless.

Text or message input, `instructions` (a system message first), `max_output_tokens`,
`text.format` (json_object / json_schema through vLLM's structured outputs), usage, and
streaming with the Responses event types: response.created, response.in_progress,
response.output_item.added, response.content_part.added, response.output_text.delta (one per
released piece of text), response.output_text.done, response.content_part.done,
response.output_item.done, response.completed; an error after the stream started is an `error`
event. Nothing is stored: `store: true` and `previous_response_id` are refused with a 400.
A reply cut by the length limit has status `incomplete` (reason `max_output_tokens`).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from serve.engine import Engine
from serve.errors import to_api_error
from serve.model import ServedModel, check_request
from serve.prompt import render_prompt
from serve.protocol import ResponsesRequest
from serve.run import Gating, Run, collect, new_id


def _response(req: ResponsesRequest, rid: str, model: ServedModel, status: str,
              output: list[dict[str, Any]], run: Run | None = None,
              incomplete: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": rid, "object": "response", "created_at": int(time.time()), "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": req.instructions, "model": model.name, "output": output,
        "parallel_tool_calls": False, "metadata": req.metadata or {},
        "temperature": req.temperature, "top_p": req.top_p, "tool_choice": "none", "tools": [],
        "max_output_tokens": req.max_output_tokens,
        "text": {"format": {"type": "text"}} if req.text is None
        else {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)},
    }
    if run is not None:
        u = run.usage
        body["usage"] = {"input_tokens": u.prompt_tokens,
                         "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                         "output_tokens": u.completion_tokens,
                         "output_tokens_details": {"reasoning_tokens": 0},
                         "total_tokens": u.prompt_tokens + u.completion_tokens}
    return body


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message(mid: str, status: str, text: str | None, extra: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    return {"type": "message", "id": mid, "status": status, "role": "assistant",
            "content": [] if text is None else [_part(text)], **(extra or {})}


async def _run(engine: Engine, model: ServedModel, req: ResponsesRequest) -> Run:
    check_request(model, req)
    prompt_ids = await render_prompt(model, req.messages())
    max_tokens = model.check_length(len(prompt_ids), req.requested_max_tokens(), "input")
    gating = Gating.of(model, req, tokens=False)
    spec = req.to_spec(max_tokens, gating.stops, None, eos_ids=gating.eos_ids)
    return Run(engine, model, prompt_ids, spec, new_id("resp"), gating)


async def create_response(engine: Engine, model: ServedModel, req: ResponsesRequest
                          ) -> dict[str, Any] | ResponseStream:
    req = req.with_defaults(model.sampling_defaults)
    run = await _run(engine, model, req)
    if req.stream:
        return ResponseStream(model, req, run)
    (final,) = await collect(run)
    incomplete = final.finish_reason == "length"
    status = "incomplete" if incomplete else "completed"
    msg = _message(new_id("msg"), status, final.text, final.extension_fields())
    return _response(req, run.request_id, model, status, [msg], run, incomplete)


class ResponseStream:
    """The Responses event stream of one run; `error_frame` ends it after a failure."""

    def __init__(self, model: ServedModel, req: ResponsesRequest, run: Run) -> None:
        self.model, self.req, self.run = model, req, run
        self.seq = 0
        self.mid = new_id("msg")

    def _event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def error_frame(self, exc: BaseException) -> str:
        err = to_api_error(exc)
        return self._event("error", code=err.code, message=err.message, param=err.param)

    async def __aiter__(self) -> AsyncIterator[str]:
        req, model, run, mid = self.req, self.model, self.run, self.mid
        where = {"item_id": mid, "output_index": 0, "content_index": 0}
        started = _response(req, run.request_id, model, "in_progress", [])
        yield self._event("response.created", response=started)
        yield self._event("response.in_progress", response=started)
        yield self._event("response.output_item.added", output_index=0,
                          item=_message(mid, "in_progress", None))
        yield self._event("response.content_part.added", **where, part=_part(""))
        text, finish, extra = "", None, {}
        async for events in run:
            for e in events:
                if e.text:
                    text += e.text
                    yield self._event("response.output_text.delta", **where, delta=e.text,
                                      logprobs=[])
                if e.finish_reason is not None:
                    finish, extra = e.finish_reason, e.extension_fields()
        incomplete = finish == "length"
        status = "incomplete" if incomplete else "completed"
        yield self._event("response.output_text.done", **where, text=text, logprobs=[])
        yield self._event("response.content_part.done", **where, part=_part(text))
        message = _message(mid, status, text, extra)
        yield self._event("response.output_item.done", output_index=0, item=message)
        done = _response(req, run.request_id, model, status, [message], run, incomplete)
        yield self._event("response.incomplete" if incomplete else "response.completed",
                          response=done)
