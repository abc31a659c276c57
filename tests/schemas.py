"""Validation of response bodies and stream chunks against OpenAI's own schemas.

The schemas are shared/reference/openai-schemas.json (from the openai-openapi spec), copied into
tests/ so the suite runs from a clone. OpenAI's CreateCompletionResponse is also its stream
chunk schema, but a streamed chunk's finish_reason is null until the last chunk (as OpenAI itself
sends it): for text-completion chunks only, null is added to that enum.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SCHEMAS = Path(__file__).with_name("openai-schemas.json")
# The Responses API's types, extracted from the same openai-openapi spec (see its "source").
RESPONSES_SCHEMAS = Path(__file__).with_name("openai-responses-schemas.json")


@cache
def _components() -> dict[str, Any]:
    components = json.loads(SCHEMAS.read_text())["components"]
    responses = json.loads(RESPONSES_SCHEMAS.read_text())["components"]["schemas"]
    components["schemas"] = {**responses, **components["schemas"]}
    return components  # type: ignore[no-any-return]


@cache
def _validator(name: str, stream_completion: bool = False) -> jsonschema.Draft202012Validator:
    components = _components()
    if stream_completion:
        components = copy.deepcopy(components)
        choice = components["schemas"]["CreateCompletionResponse"]["properties"]["choices"]
        fr = choice["items"]["properties"]["finish_reason"]
        fr["type"] = ["string", "null"]
        fr["enum"] = [*fr["enum"], None]
    return jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": components})


def validate(name: str, body: Any, *, stream_completion: bool = False) -> None:
    """Raise jsonschema.ValidationError if `body` does not match OpenAI's schema `name`."""
    _validator(name, stream_completion).validate(body)


def sse_payloads(raw: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    return [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]
