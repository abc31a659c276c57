"""POST /v1/chat/completions: render the conversation, run it, format OpenAI chat objects.

Stream chunks are written from pre-serialised frames (`SSEFrames`) and `json.dumps` of the new
text only: no pydantic object per token on the hot path.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import chat_templates
from serve.engine import Engine
from serve.errors import APIError
from serve.protocol import ChatCompletionRequest, ChatMessage
from serve.serving import (
    SSE_DONE,
    ChoiceEvent,
    Gating,
    Run,
    ServedModel,
    SSEFrames,
    Usage,
    bytes_text,
    check_request,
    collect,
    new_id,
)
from serve.textgate import GatedToken

_INLINE_RENDER_CHARS = 4096  # longer conversations are rendered and tokenized in a thread


def _render_sync(model: ServedModel, messages: list[ChatMessage], add_generation_prompt: bool,
                 continue_final_message: bool) -> list[int]:
    import jinja2

    template = model.chat_template or getattr(model.tokenizer, "chat_template", None)
    if not template:
        raise APIError(
            f"model {model.name!r} has no chat template: start the server with --chat-template "
            f"({', '.join(chat_templates.names())}, or a .jinja path) or --preset, "
            "or send a formatted prompt to /v1/completions", 400, "messages", "no_chat_template")
    rendered: list[dict[str, str]] = []
    if model.default_system and not any(m.role in ("system", "developer") for m in messages):
        rendered.append({"role": "system", "content": model.default_system})
    for m in messages:
        msg = {"role": m.role, "content": m.text()}
        if m.name:
            msg["name"] = m.name
        rendered.append(msg)
    try:
        text = model.tokenizer.apply_chat_template(
            rendered, chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message)
    except (jinja2.TemplateError, ValueError, TypeError) as e:  # the template's own checks
        raise APIError(f"the chat template rejected the messages: {e}", 400, "messages") from e
    # Templates write BOS themselves (as transformers' tokenize=True path assumes).
    ids: list[int] = model.tokenizer.encode(text, add_special_tokens=False)
    return ids


async def render_prompt(model: ServedModel, messages: list[ChatMessage],
                        add_generation_prompt: bool = True,
                        continue_final_message: bool = False) -> list[int]:
    """Messages -> prompt token ids through the model's chat template (off the event loop when
    the conversation is long, so /health never waits on Jinja or the tokenizer)."""
    size = sum(len(m.text()) for m in messages)
    if size <= _INLINE_RENDER_CHARS:
        return _render_sync(model, messages, add_generation_prompt, continue_final_message)
    return await asyncio.to_thread(_render_sync, model, messages, add_generation_prompt,
                                   continue_final_message)


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
) -> dict[str, Any] | AsyncIterator[str]:
    """Return the response body, or an async iterator of SSE lines when streaming."""
    check_request(model, req, logprobs=req.logprobs_k())
    prompt_ids = await render_prompt(model, req.messages, req.add_generation_prompt,
                                     req.continue_final_message)
    max_tokens = model.check_length(len(prompt_ids), req.requested_max_tokens())
    gating = Gating.of(model, req, tokens=req.logprobs or req.return_token_ids)
    spec = req.to_spec(max_tokens, gating.stops, req.logprobs_k(), eos_ids=gating.eos_ids)
    run = Run(engine, model, prompt_ids, spec, new_id("chatcmpl"), gating)
    if req.stream:
        return _stream(model, req, run)
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
