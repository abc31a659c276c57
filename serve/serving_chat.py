"""POST /v1/chat/completions: render the conversation, run it, format OpenAI chat objects.

Stream chunks are written from pre-serialised frames (`SSEFrames`) and `json.dumps` of the new
text only: no pydantic object per token on the hot path.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from serve.engine import Engine
from serve.model import ServedModel, bytes_text, check_request
from serve.prompt import render_prompt
from serve.protocol import ChatCompletionRequest
from serve.run import ChoiceEvent, Gating, Run, Usage, collect, new_id
from serve.sse import SSE_DONE, ChunkStream, SSEFrames
from serve.textgate import GatedToken


def _lp_entry(model: ServedModel, token_id: int, logprob: float, raw: bytes | None = None
              ) -> dict[str, Any]:
    if raw is None:
        return {"token": model.token_str(token_id), "logprob": max(logprob, -9999.0),
                "bytes": list(model.token_bytes(token_id))}
    return {"token": bytes_text(raw), "logprob": max(logprob, -9999.0), "bytes": list(raw)}


def chat_logprobs(model: ServedModel, tokens: list[GatedToken] | None) -> dict[str, Any] | None:
    """OpenAI's chat logprobs: one entry per reply token, its bytes exactly the reply's."""
    if tokens is None:
        return None
    content = []
    for t in tokens:
        lp = t.logprobs
        entry = _lp_entry(model, t.token_id, lp.logprob, t.text_bytes)
        entry["top_logprobs"] = [_lp_entry(model, tid, v) for tid, v in lp.top]
        content.append(entry)
    return {"content": content, "refusal": None}


async def chat_completion(
    engine: Engine, model: ServedModel, req: ChatCompletionRequest
) -> dict[str, Any] | ChunkStream:
    """Return the response body, or the stream of its SSE frames."""
    req = req.with_defaults(model.sampling_defaults)
    check_request(model, req, logprobs=req.logprobs_k())
    prompt_ids = await render_prompt(model, req.messages, req.add_generation_prompt,
                                     req.continue_final_message)
    max_tokens = model.check_length(len(prompt_ids), req.requested_max_tokens())
    gating = Gating.of(model, req, tokens=req.logprobs or req.return_token_ids)
    spec = req.to_spec(max_tokens, gating.stops, req.logprobs_k(), eos_ids=gating.eos_ids)
    run = Run(engine, model, prompt_ids, spec, new_id("chatcmpl"), gating)
    if req.stream:
        return ChunkStream(_stream(model, req, run))
    final = await collect(run)
    return {
        "id": run.request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model.name,
        "choices": [_choice(model, req, e, prompt_ids) for e in final],
        "usage": run.usage.as_dict(),
    }


def _choice(model: ServedModel, req: ChatCompletionRequest, e: ChoiceEvent,
            prompt_ids: list[int]) -> dict[str, Any]:
    choice = {"index": e.index,
              "message": {"role": "assistant", "content": e.text, "refusal": None},
              "logprobs": chat_logprobs(model, e.logprobs()) if req.logprobs else None,
              "finish_reason": e.finish_reason, **e.extension_fields()}
    if req.return_token_ids:
        choice.update(token_ids=e.token_ids(), prompt_token_ids=prompt_ids)
    return choice


async def _stream(model: ServedModel, req: ChatCompletionRequest, run: Run) -> AsyncIterator[str]:
    running = ((lambda: Usage(len(run.prompt_ids), run.usage.completion_tokens))
               if req.continuous_usage() else None)
    frames = SSEFrames(run.request_id, "chat.completion.chunk", model.name, req.include_usage(),
                       running)
    ids = req.return_token_ids
    first = f',"prompt_token_ids":{json.dumps(run.prompt_ids)}' if ids else ""
    for i in range(req.n):
        yield frames.chunk(f'{{"index":{i},"delta":{{"role":"assistant","content":""}},'
                           f'"logprobs":null,"finish_reason":null{first}}}')
    async for step_events in run:
        for e in step_events:
            if not e.text and not e.tokens and e.finish_reason is None:
                continue
            if e.finish_reason is None:
                lps = json.dumps(chat_logprobs(model, e.logprobs())) if req.logprobs else "null"
                token_ids = f',"token_ids":{json.dumps(e.token_ids())}' if ids else ""
                yield frames.chunk(f'{{"index":{e.index},"delta":{{"content":'
                                   f'{json.dumps(e.text, ensure_ascii=False)}}},"logprobs":{lps},'
                                   f'"finish_reason":null{token_ids}}}')
            else:  # the last chunk of a choice: built once, so a dict is fine here
                choice = {"index": e.index, "delta": {"content": e.text} if e.text else {},
                          "logprobs": chat_logprobs(model, e.logprobs()) if req.logprobs else None,
                          "finish_reason": e.finish_reason, **e.extension_fields()}
                if ids:
                    choice["token_ids"] = e.token_ids()
                yield frames.chunk(json.dumps(choice, ensure_ascii=False))
    if frames.include_usage:
        yield frames.usage(run.usage)
    yield SSE_DONE
