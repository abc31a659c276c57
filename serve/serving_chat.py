"""POST /v1/chat/completions: render the conversation, run it, format OpenAI chat objects.

Stream chunks are written with a pre-serialised prefix and `json.dumps` of the new text only:
no pydantic object per token on the hot path.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from serve.engine import Engine, TokenLogprobs
from serve.errors import APIError
from serve.protocol import ChatCompletionRequest
from serve.serving import (
    SSE_DONE,
    ChoiceEvent,
    ServedModel,
    Usage,
    check_model,
    collect,
    new_id,
    run,
    sse,
    stop_fields,
)


def render_prompt(model: ServedModel, req: ChatCompletionRequest) -> list[int]:
    """Messages -> prompt token ids through the model's chat template."""
    import jinja2

    template = model.chat_template or getattr(model.tokenizer, "chat_template", None)
    if not template:
        raise APIError(
            f"model {model.name!r} has no chat template: start the server with --chat-template "
            "(llama-2-chat, alpaca, alpaca-ja, alpaca-ja-bare, or a .jinja path) or --preset, "
            "or send a formatted prompt to /v1/completions", 400, "messages", "no_chat_template")
    messages: list[dict[str, str]] = []
    if model.default_system and not any(m.role in ("system", "developer") for m in req.messages):
        messages.append({"role": "system", "content": model.default_system})
    for m in req.messages:
        msg = {"role": m.role, "content": m.text()}
        if m.name:
            msg["name"] = m.name
        messages.append(msg)
    try:
        text = model.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message)
    except jinja2.TemplateError as e:
        raise APIError(f"the chat template rejected the messages: {e}", 400, "messages") from e
    # Templates write BOS themselves (as transformers' tokenize=True path assumes).
    ids: list[int] = model.tokenizer.encode(text, add_special_tokens=False)
    return ids


def _lp_entry(model: ServedModel, token_id: int, logprob: float) -> dict[str, Any]:
    tok, raw = model.token_str(token_id)
    return {"token": tok, "logprob": max(logprob, -9999.0), "bytes": raw}


def chat_logprobs(model: ServedModel, lps: list[TokenLogprobs] | None) -> dict[str, Any] | None:
    if lps is None:
        return None
    content = []
    for lp in lps:
        entry = _lp_entry(model, lp.token_id, lp.logprob)
        entry["top_logprobs"] = [_lp_entry(model, t, v) for t, v in lp.top]
        content.append(entry)
    return {"content": content, "refusal": None}


async def chat_completion(
    engine: Engine, model: ServedModel, req: ChatCompletionRequest
) -> dict[str, Any] | AsyncIterator[str]:
    """Return the response body, or an async iterator of SSE lines when streaming."""
    check_model(model, req)
    prompt_ids = render_prompt(model, req)
    max_tokens = model.check_length(len(prompt_ids), req.requested_max_tokens())
    stops = model.stops.strings(req.stop_list(), req.eos_truncation)
    spec = req.to_spec(max_tokens, stops, req.logprobs_k())
    request_id = new_id("chatcmpl")
    usage = Usage()
    trim = model.sentence_trim if req.sentence_trim is None else req.sentence_trim
    events = run(engine, model, prompt_ids, spec, request_id, usage,
                 keep_stop=req.include_stop_str_in_output, trim=trim)
    if req.stream:
        return _stream(model, req, request_id, events, usage, prompt_ids)
    final, _ = await collect(events, spec.n)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model.name,
        "choices": [
            {
                "index": e.index,
                "message": {"role": "assistant", "content": e.text, "refusal": None},
                "logprobs": chat_logprobs(model, e.logprobs),
                "finish_reason": e.finish_reason,
                **stop_fields(e),
                **({"token_ids": e.token_ids, "prompt_token_ids": prompt_ids}
                   if req.return_token_ids else {}),
            }
            for e in final
        ],
        "usage": usage.as_dict(),
    }


async def _stream(model: ServedModel, req: ChatCompletionRequest, request_id: str,
                  events: AsyncIterator[tuple[list[ChoiceEvent], Any]], usage: Usage,
                  prompt_ids: list[int]) -> AsyncIterator[str]:
    include_usage = req.include_usage()
    head = (f'{{"id":"{request_id}","object":"chat.completion.chunk","created":{int(time.time())},'
            f'"model":{json.dumps(model.name)},"choices":[')
    tail = ',"usage":null}' if include_usage else "}"
    ids = req.return_token_ids
    first = f',"prompt_token_ids":{json.dumps(prompt_ids)}' if ids else ""
    for i in range(req.n):
        yield sse(head + f'{{"index":{i},"delta":{{"role":"assistant","content":""}},'
                  f'"logprobs":null,"finish_reason":null{first}}}]' + tail)
    async for step_events, _ in events:
        for e in step_events:
            if not e.text and e.logprobs is None and e.finish_reason is None and not (
                    ids and e.token_ids):
                continue
            lps = "null" if e.logprobs is None else json.dumps(chat_logprobs(model, e.logprobs))
            if e.finish_reason is None:
                token_ids = f',"token_ids":{json.dumps(e.token_ids)}' if ids else ""
                yield sse(head + f'{{"index":{e.index},"delta":{{"content":'
                          f'{json.dumps(e.text, ensure_ascii=False)}}},"logprobs":{lps},'
                          f'"finish_reason":null{token_ids}}}]' + tail)
            else:  # the last chunk of a choice: built once, so a dict is fine here
                choice = {"index": e.index, "delta": {"content": e.text} if e.text else {},
                          "logprobs": chat_logprobs(model, e.logprobs),
                          "finish_reason": e.finish_reason, **stop_fields(e),
                          **({"token_ids": e.token_ids} if ids else {})}
                yield sse(head + json.dumps(choice, ensure_ascii=False) + "]" + tail)
    if include_usage:
        yield sse(head + "]" + f',"usage":{json.dumps(usage.as_dict())}}}')
    yield SSE_DONE
