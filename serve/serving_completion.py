"""POST /v1/completions: raw prompts (text or token ids, single or batched), OpenAI text objects.

A batch of P prompts with n choices each yields choices indexed `prompt * n + choice`, as
OpenAI numbers them; the prompts run as concurrent engine requests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from serve.engine import Engine, TokenLogprobs
from serve.errors import APIError
from serve.model import ServedModel, bytes_text, check_request
from serve.protocol import CompletionRequest
from serve.run import ChoiceEvent, Gating, Run, Usage, collect, new_id
from serve.sse import SSE_DONE, ChunkStream, SSEFrames
from serve.textgate import GatedToken


@dataclass
class Prompt:
    """One prompt of a batch: its ids, its run, and the echo that precedes its choices."""

    index: int
    ids: list[int]
    run: Run
    echo: str


async def _encode(model: ServedModel, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise APIError("'prompt' is empty: send some text", 400, "prompt")
        return await model.encode(prompt, add_special_tokens=True)
    if not prompt:
        raise APIError("'prompt' is an empty list of token ids", 400, "prompt")
    model.check_ids(prompt, "prompt", "'prompt' token ids")
    return prompt


def completion_logprobs(model: ServedModel, prompt: list[TokenLogprobs | None] | None,
                        tokens: list[GatedToken] | None, offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's legacy logprobs object: the echoed prompt's positions (null for the first), then
    the reply's tokens, whose texts concatenate to the reply."""
    if tokens is None and prompt is None:
        return None
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                 "text_offset": []}

    def add(text: str, logprob: float | None, top: list[tuple[int, float]] | None) -> None:
        nonlocal offset
        out["text_offset"].append(offset)
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append({model.token_str(t): v for t, v in top}
                                   if top is not None else None)
        offset += len(text)

    for lp in prompt or []:
        if lp is None:
            add(model.tokenizer.bos_token or "", None, None)
        else:
            add(model.token_str(lp.token_id), lp.logprob, lp.top)
    for t in tokens or []:
        add(bytes_text(t.text_bytes), t.logprobs.logprob, t.logprobs.top)
    return out


async def merge(prompts: list[Prompt]) -> AsyncIterator[tuple[Prompt, list[ChoiceEvent]]]:
    """Interleave the prompts' runs as their steps arrive; an error in one ends them all."""
    if len(prompts) == 1:
        async for events in prompts[0].run:
            yield prompts[0], events
        return
    queue: asyncio.Queue[tuple[Prompt, list[ChoiceEvent]] | None] = asyncio.Queue()

    async def pump(p: Prompt) -> None:
        async for events in p.run:
            await queue.put((p, events))

    async def pumps() -> None:
        try:
            async with asyncio.TaskGroup() as group:  # cancels the rest when one fails
                for p in prompts:
                    group.create_task(pump(p))
        finally:
            await queue.put(None)

    task = asyncio.create_task(pumps())
    try:
        while (item := await queue.get()) is not None:
            yield item
        try:
            await task
        except BaseExceptionGroup as group:  # the first error of the group, as it was raised
            raise group.exceptions[0] from None
    finally:
        task.cancel()


async def completion(
    engine: Engine, model: ServedModel, req: CompletionRequest
) -> dict[str, Any] | ChunkStream:
    req = req.with_defaults(model.sampling_defaults)
    texts = req.prompts()
    check_request(model, req, prompts=len(texts), logprobs=req.logprobs)
    gating = Gating.of(model, req, tokens=req.logprobs is not None or req.return_token_ids)
    request_id = new_id("cmpl")
    prompts = []
    for i, text in enumerate(texts):
        ids = await _encode(model, text)
        max_tokens = model.check_length(len(ids), req.requested_max_tokens(), "prompt")
        echo_lps = req.logprobs if req.echo and req.logprobs is not None else None
        spec = req.to_spec(max_tokens, gating.stops, req.logprobs, echo_lps,
                           gating.eos_ids)
        echo = model.tokenizer.decode(ids, skip_special_tokens=True) if req.echo else ""
        prompts.append(Prompt(i, ids, Run(engine, model, ids, spec, f"{request_id}-{i}", gating),
                              echo))
    if req.stream:
        return ChunkStream(_stream(model, req, request_id, prompts))
    results = await asyncio.gather(*(collect(p.run) for p in prompts))
    choices = [_choice(model, req, p, e) for p, final in zip(prompts, results, strict=True)
               for e in final]
    return {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": model.name, "choices": choices,
            "usage": Usage.total([p.run.usage for p in prompts]).as_dict()}


def _choice(model: ServedModel, req: CompletionRequest, p: Prompt, e: ChoiceEvent
            ) -> dict[str, Any]:
    echo_lps = p.run.prompt_logprobs if req.echo else None
    choice = {"index": p.index * req.n + e.index, "text": p.echo + e.text,
              "logprobs": completion_logprobs(model, echo_lps, e.logprobs())
              if req.logprobs is not None else None,
              "finish_reason": e.finish_reason, **e.extension_fields()}
    if req.return_token_ids:
        choice.update(token_ids=e.token_ids(), prompt_token_ids=p.ids)
    return choice


async def _stream(model: ServedModel, req: CompletionRequest, request_id: str,
                  prompts: list[Prompt]) -> AsyncIterator[str]:
    running = ((lambda: Usage(sum(len(p.ids) for p in prompts),
                              sum(p.run.usage.completion_tokens for p in prompts)))
               if req.continuous_usage() else None)
    frames = SSEFrames(request_id, "text_completion", model.name, req.include_usage(), running)
    first = {(p.index, i) for p in prompts for i in range(req.n)}  # (prompt, choice) not yet sent
    async for p, events in merge(prompts):
        for e in events:
            opening = (p.index, e.index) in first
            text = (p.echo if opening else "") + e.text
            if not text and not e.tokens and e.finish_reason is None and not opening:
                continue
            first.discard((p.index, e.index))
            echo_lps = p.run.prompt_logprobs if opening and req.echo else None
            choice: dict[str, Any] = {
                "index": p.index * req.n + e.index, "text": text,
                "logprobs": completion_logprobs(model, echo_lps, e.logprobs())
                if req.logprobs is not None else None,
                "finish_reason": e.finish_reason}
            if e.finish_reason is not None:
                choice.update(e.extension_fields())
            if req.return_token_ids:
                choice["token_ids"] = e.token_ids()
                if opening:
                    choice["prompt_token_ids"] = p.ids
            yield frames.chunk(json.dumps(choice, ensure_ascii=False))
    if frames.include_usage:
        yield frames.usage(Usage.total([p.run.usage for p in prompts]))
    yield SSE_DONE
