"""POST /v1/completions: raw prompts (text or token ids, single or batched), OpenAI text objects.

A batch of P prompts with n choices each yields choices indexed `prompt * n + choice`, as
OpenAI numbers them; the prompts run as concurrent engine requests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from serve.engine import Engine, SamplingSpec, TokenLogprobs
from serve.errors import APIError
from serve.protocol import CompletionRequest
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


def _encode(model: ServedModel, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise APIError("'prompt' is empty: send some text", 400, "prompt")
        ids: list[int] = model.tokenizer.encode(prompt, add_special_tokens=True)
        return ids
    vocab = len(model.tokenizer)
    if not prompt or any(t < 0 or t >= vocab for t in prompt):
        raise APIError(f"'prompt' token ids must be non-empty and within [0, {vocab})", 400,
                       "prompt")
    return prompt


def completion_logprobs(model: ServedModel, lps: list[TokenLogprobs | None] | None,
                        offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's legacy logprobs object; None entries (the first prompt token) give null."""
    if lps is None:
        return None
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for lp in lps:
        offsets.append(offset)
        if lp is None:
            tokens.append(model.tokenizer.bos_token or "")
            values.append(None)
            tops.append(None)
            continue
        tok = model.token_str(lp.token_id)[0]
        tokens.append(tok)
        values.append(lp.logprob)
        tops.append({model.token_str(t)[0]: v for t, v in lp.top})
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


async def _merge(streams: list[AsyncIterator[tuple[list[ChoiceEvent], Any]]], n: int
                 ) -> AsyncIterator[tuple[int, list[ChoiceEvent], Any]]:
    """Interleave several runs; tag each step with its prompt index."""
    if len(streams) == 1:
        async for ev, step in streams[0]:
            yield 0, ev, step
        return
    queue: asyncio.Queue[tuple[int, Any, Any] | BaseException | None] = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[tuple[list[ChoiceEvent], Any]]) -> None:
        try:
            async for ev, step in s:
                await queue.put((i, ev, step))
        except BaseException as e:  # surfaced to the consumer below
            await queue.put(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


async def completion(
    engine: Engine, model: ServedModel, req: CompletionRequest
) -> dict[str, Any] | AsyncIterator[str]:
    check_model(model, req)
    prompts = [_encode(model, p) for p in req.prompts()]
    specs: list[SamplingSpec] = []
    stops = model.stops.strings(req.stop_list(), req.eos_truncation)
    for ids in prompts:
        max_tokens = model.check_length(len(ids), req.requested_max_tokens(), "prompt")
        specs.append(req.to_spec(max_tokens, stops, req.logprobs,
                                 req.logprobs if req.echo and req.logprobs is not None else None))
    request_id = new_id("cmpl")
    usages = [Usage() for _ in prompts]
    trim = model.sentence_trim if req.sentence_trim is None else req.sentence_trim
    runs = [run(engine, model, ids, spec, f"{request_id}-{i}", usages[i],
                keep_stop=req.include_stop_str_in_output, trim=trim)
            for i, (ids, spec) in enumerate(zip(prompts, specs, strict=True))]
    echoes = [model.tokenizer.decode(ids, skip_special_tokens=True) if req.echo else ""
              for ids in prompts]
    if req.stream:
        return _stream(model, req, request_id, _merge(runs, req.n), usages, echoes, prompts)
    results = await asyncio.gather(*(collect(r, req.n) for r in runs))
    choices = []
    for p, (final, prompt_lps) in enumerate(results):
        for e in final:
            lps: list[TokenLogprobs | None] | None = None
            if e.logprobs is not None:
                lps = [*(prompt_lps or []), *e.logprobs] if req.echo else list(e.logprobs)
            choice = {"index": p * req.n + e.index, "text": echoes[p] + e.text,
                      "logprobs": completion_logprobs(model, lps),
                      "finish_reason": e.finish_reason, **stop_fields(e)}
            if req.return_token_ids:
                choice.update(token_ids=e.token_ids, prompt_token_ids=prompts[p])
            choices.append(choice)
    usage = Usage.total(usages)
    return {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": model.name, "choices": choices, "usage": usage.as_dict()}


async def _stream(model: ServedModel, req: CompletionRequest, request_id: str,
                  merged: AsyncIterator[tuple[int, list[ChoiceEvent], Any]],
                  usages: list[Usage], echoes: list[str], prompts: list[list[int]]
                  ) -> AsyncIterator[str]:
    include_usage = req.include_usage()
    head = (f'{{"id":"{request_id}","object":"text_completion","created":{int(time.time())},'
            f'"model":{json.dumps(model.name)},"choices":[')
    tail = ',"usage":null}' if include_usage else "}"
    pending_echo = {(p, i): echoes[p] for p in range(len(echoes)) for i in range(req.n)
                    if echoes[p]}
    unsent_prompt = {(p, i) for p in range(len(prompts)) for i in range(req.n)}
    async for p, step_events, step in merged:
        for e in step_events:
            text = pending_echo.pop((p, e.index), "") + e.text
            lp_src: list[TokenLogprobs | None] | None = e.logprobs  # type: ignore[assignment]
            if req.echo and step.prompt_logprobs is not None and e.logprobs is not None:
                lp_src = [*step.prompt_logprobs, *e.logprobs]
            if not text and lp_src is None and e.finish_reason is None and not (
                    req.return_token_ids and e.token_ids):
                continue
            choice: dict[str, Any] = {"index": p * req.n + e.index, "text": text,
                                      "logprobs": completion_logprobs(model, lp_src),
                                      "finish_reason": e.finish_reason}
            if req.return_token_ids:
                choice["token_ids"] = e.token_ids
                if (p, e.index) in unsent_prompt:
                    unsent_prompt.discard((p, e.index))
                    choice["prompt_token_ids"] = prompts[p]
            if e.finish_reason is not None:
                choice.update(stop_fields(e))
            yield sse(head + json.dumps(choice, ensure_ascii=False) + "]" + tail)
    if include_usage:
        usage = Usage.total(usages)
        yield sse(head + "]" + f',"usage":{json.dumps(usage.as_dict())}}}')
    yield SSE_DONE
