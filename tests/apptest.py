"""Shared helpers for the HTTP-layer unit tests: the app on the fake engine, and checks of the
OpenAI error envelope."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

import chat_templates
from serve.app import AppState, create_app
from serve.model import ServedModel
from serve.stops import StopPolicy
from tests.fakes import FakeEngine
from tests.schemas import validate


def make_model(tokenizer: Any, **kw: Any) -> ServedModel:
    _, src = chat_templates.load("alpaca-ja")
    stops = StopPolicy.for_tokenizer(tokenizer, chat_templates.turn_markers(src))
    return ServedModel(name="m", tokenizer=tokenizer, max_model_len=256, stops=stops,
                       chat_template=src, template_name="alpaca-ja", **kw)


def client(tokenizer: Any, engine: FakeEngine | None = None, api_key: str | None = None,
           **kw: Any) -> TestClient:
    state = AppState(engine=engine or FakeEngine(), model=make_model(tokenizer, **kw),
                     api_key=api_key)
    return TestClient(create_app(state), raise_server_exceptions=False)


def chat(c: TestClient, **body: Any) -> Any:
    payload = {"model": "m", "messages": [{"role": "user", "content": "首都は？"}], **body}
    return c.post("/v1/chat/completions", json=payload)


def assert_envelope(r: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    validate("ErrorResponse", r.json())
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param
    return err  # type: ignore[no-any-return]
