"""POST /tokenize and POST /detokenize, as vLLM's server has them.

`/tokenize` takes a `prompt` (BOS added, as /v1/completions does) or `messages` (rendered by
the served chat template, exactly the prompt /v1/chat/completions would run) and answers
`{count, max_model_len, tokens[, token_strs]}`; `/detokenize` turns `tokens` back into text.
"""

from __future__ import annotations

import asyncio
from typing import Any

from serve.errors import APIError
from serve.protocol import DetokenizeRequest, TokenizeRequest
from serve.serving import ServedModel
from serve.serving_chat import render_prompt


def _check_model(model: ServedModel, name: str | None) -> None:
    if name is not None and name != model.name:
        raise APIError(f"model {name!r} does not exist; this server serves {model.name!r}", 404,
                       "model", "model_not_found")


async def tokenize(model: ServedModel, req: TokenizeRequest) -> dict[str, Any]:
    _check_model(model, req.model)
    if req.messages is not None:
        ids = await render_prompt(model, req.messages, req.add_generation_prompt,
                                  req.continue_final_message)
        if req.add_special_tokens:
            ids = [*([model.tokenizer.bos_token_id] if model.tokenizer.bos_token_id is not None
                     else []), *ids]
    else:
        assert req.prompt is not None
        add = True if req.add_special_tokens is None else req.add_special_tokens
        ids = await model.encode(req.prompt, add_special_tokens=add)
    body: dict[str, Any] = {"count": len(ids), "max_model_len": model.max_model_len,
                            "tokens": ids}
    if req.return_token_strs:
        body["token_strs"] = model.tokenizer.convert_ids_to_tokens(ids)
    return body


async def detokenize(model: ServedModel, req: DetokenizeRequest) -> dict[str, Any]:
    _check_model(model, req.model)
    vocab = model.vocab_size
    if any(not 0 <= t < vocab for t in req.tokens):
        raise APIError(f"'tokens' must be token ids in [0, {vocab})", 400, "tokens")
    text = await asyncio.to_thread(model.tokenizer.decode, req.tokens)
    return {"prompt": text}
