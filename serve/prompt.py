"""A conversation rendered into prompt token ids through the served model's chat template.

Chat completions, the Responses API and /tokenize all start from here.
"""

from __future__ import annotations

import asyncio

import chat_templates
from serve.errors import APIError
from serve.model import ServedModel
from serve.protocol import ChatMessage

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
