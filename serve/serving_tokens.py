"""POST /tokenize and POST /detokenize, as vLLM's server has them.

`/tokenize` takes a `prompt` (BOS added, as /v1/completions does) or `messages` (rendered by
the served chat template, exactly the prompt /v1/chat/completions would run) and answers
`{count, max_model_len, tokens[, token_strs]}`; `/detokenize` turns `tokens` back into text.
`GET /tokenizer_info` describes the tokenizer as vLLM's server does (its `init_kwargs` without
file paths, `tokenizer_class`, the chat template in use): lm-evaluation-harness's default
tokenizer backend asks for it, and without it loads a tokenizer from the hub by model name.
"""

from __future__ import annotations

import asyncio
from typing import Any

from serve.model import ServedModel
from serve.prompt import render_prompt
from serve.protocol import DetokenizeRequest, TokenizeRequest


async def tokenize(model: ServedModel, req: TokenizeRequest) -> dict[str, Any]:
    model.check_name(req.model)
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
    model.check_name(req.model)
    model.check_ids(req.tokens, "tokens", "'tokens'")
    text = await asyncio.to_thread(model.tokenizer.decode, req.tokens)
    return {"prompt": text}


def _plain(value: Any) -> Any:
    """JSON-safe: AddedToken -> its text; containers recursively; anything else as a string."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


def tokenizer_info(model: ServedModel) -> dict[str, Any]:
    tok = model.tokenizer
    info: dict[str, Any] = {k: _plain(v) for k, v in (getattr(tok, "init_kwargs", None) or {}
                                                     ).items()
                            if k not in ("vocab_file", "merges_file", "tokenizer_file",
                                         "name_or_path")}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        info.setdefault(key, getattr(tok, key, None))
    info["tokenizer_class"] = type(tok).__name__
    template = model.chat_template or getattr(tok, "chat_template", None)
    if template:
        info["chat_template"] = template
    return info
