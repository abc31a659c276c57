"""Hostile input, bounds, overload and liveness through the HTTP layer, on fake engines.

The same behaviours are fuzzed against the real engine in tests/integration/test_reliability.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from serve.admission import Admission
from serve.app import AppState, create_app
from serve.config import Limits
from serve.engine import EngineStep, SamplingSpec
from serve.lifecycle import Liveness
from tests.apptest import assert_envelope, chat, client, make_model
from tests.fakes import FakeEngine
from tests.schemas import sse_payloads, validate


def raw(c: TestClient, body: bytes, path: str = "/v1/chat/completions",
        headers: dict[str, str] | None = None) -> Any:
    return c.post(path, content=body, headers={"content-type": "application/json",
                                               **(headers or {})})


@pytest.mark.parametrize(("body", "param"), [
    ('{"seed": 18446744073709551616}', "seed"),
    ('{"seed": -9223372036854775809}', "seed"),
    ('{"seed": 1000000000000000000000000000000}', "seed"),
    ('{"stop_token_ids": [-1]}', "stop_token_ids"),
    ('{"stop_token_ids": [1000000000000]}', "stop_token_ids"),
    ('{"logit_bias": {"1": "x"}}', "logit_bias.1"),
    ('{"logit_bias": [1, 2]}', "logit_bias"),
    ('{"logit_bias": {"abc": 1}}', "logit_bias"),
    ('{"logit_bias": {"1": 101}}', "logit_bias"),
    ('{"logit_bias": {"99999": 1}}', "logit_bias"),
    ('{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages.0.content"),
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages.0.content.0.text"),
    ('{"stop": ["\\ud800"]}', "stop.0"),
    ('{"stop": "\\ud800"}', "stop"),
    ('{"user": "\\ud800"}', "user"),
])
def test_out_of_range_values_are_400_naming_the_field(tokenizer: Any, body: str, param: str
                                                      ) -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    merged = json.dumps(base)[:-1] + ", " + body[1:]  # the raw JSON keeps big ints and \ud800
    err = assert_envelope(raw(client(tokenizer), merged.encode()), 400)
    assert err["param"] == param, err


def test_surrogates_in_completions_prompt(tokenizer: Any) -> None:
    c = client(tokenizer)
    body = b'{"model": "m", "prompt": ["ok", "a\\ud800"]}'
    assert assert_envelope(raw(c, body, "/v1/completions"), 400)["param"] == "prompt.1"


@pytest.mark.parametrize(("body", "code"), [
    ({"stop": [f"s{i}" for i in range(17)]}, "too_many_stop_strings"),
    ({"stop": ["x" * 257]}, "stop_string_too_long"),
    ({"stop_token_ids": list(range(65))}, "too_many_stop_token_ids"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "too_many_logit_bias"),
    ({"n": 40, "temperature": 1, "prompt": ["a", "b"]}, "too_many_choices"),
    ({"prompt": ["a"] * 33}, "too_many_prompts"),
])
def test_bounds_on_work_are_400_naming_the_limit(tokenizer: Any, body: dict[str, Any],
                                                  code: str) -> None:
    c = client(tokenizer)
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    payload = {"model": "m", **({"messages": [{"role": "user", "content": "x"}]}
                                if "prompt" not in body else {}), **body}
    err = assert_envelope(c.post(path, json=payload), 400)
    assert err["code"] == code and "--max-" in err["message"]


def test_logprobs_past_the_server_limit(tokenizer: Any) -> None:
    c = client(tokenizer, limits=Limits(max_logprobs=5))
    err = assert_envelope(chat(c, logprobs=True, top_logprobs=6), 400)
    assert err["code"] == "too_many_logprobs"


def test_body_size_limit_is_a_413_before_reading_it(tokenizer: Any) -> None:
    state = AppState(engine=FakeEngine(), model=make_model(tokenizer), max_request_bytes=2048)
    c = TestClient(create_app(state), raise_server_exceptions=False)
    big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "あ" * 2000}]})
    err = assert_envelope(raw(c, big.encode()), 413)
    assert err["code"] == "request_too_large" and "2048" in err["message"]

    def chunks() -> Any:  # no Content-Length: counted as it arrives
        yield big.encode()[:1000]
        yield big.encode()[1000:]

    assert c.post("/v1/chat/completions", content=chunks(),
                  headers={"content-type": "application/json"}).status_code == 413
    assert chat(c).status_code == 200


class BrokenEngine(FakeEngine):
    """Fails with a bug (not a client error) before or after its first step."""

    def __init__(self, after_steps: int) -> None:
        super().__init__()
        self.after_steps = after_steps

    async def generate(self, prompt_token_ids: list[int], spec: SamplingSpec, request_id: str
                       ) -> AsyncIterator[EngineStep]:
        steps = 0
        async for step in super().generate(prompt_token_ids, spec, request_id):
            if steps == self.after_steps:
                raise RuntimeError("boom")
            steps += 1
            yield step


def test_a_server_bug_is_an_envelope_500_not_a_dropped_connection(tokenizer: Any) -> None:
    c = client(tokenizer, BrokenEngine(0))
    err = assert_envelope(chat(c), 500)
    assert err["type"] == "server_error" and "RuntimeError" in err["message"]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_a_bug_inside_a_stream_ends_it_with_an_error_chunk_and_done(tokenizer: Any, route: str
                                                                     ) -> None:
    c = client(tokenizer, BrokenEngine(2))
    body = {"model": "m", "stream": True, **(
        {"prompt": "x"} if route == "/v1/completions" else
        {"messages": [{"role": "user", "content": "x"}]})}
    r = c.post(route, json=body)
    payloads = sse_payloads(r.text)
    assert r.status_code == 200 and payloads[-1] == "[DONE]"
    err = json.loads(payloads[-2])
    validate("ErrorResponse", err)
    assert err["error"]["type"] == "server_error"


def test_bearer_token_must_be_exact(tokenizer: Any) -> None:
    c = client(tokenizer, api_key="s3cret")
    for header in ("Bearer  s3cret", "Bearer\ts3cret", "Bearer s3cret x", "s3cret",
                   "Basic s3cret", "Bearer "):
        assert_envelope(c.get("/v1/models", headers={"Authorization": header}), 401)
    assert c.get("/v1/models", headers={"Authorization": "bearer s3cret"}).status_code == 200
    # The path is the ASGI scope's, whatever the Host header says.
    assert_envelope(c.get("/v1/models", headers={"Host": "evil/health?x="}), 401)


def test_overload_is_429_or_503_with_retry_after(tokenizer: Any) -> None:
    async def scenario() -> list[httpx.Response]:
        state = AppState(engine=FakeEngine(delay=0.2), model=make_model(tokenizer),
                         admission=Admission(max_running=1, max_waiting=1, max_wait_s=0.3))
        app = create_app(state)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
            tasks = [asyncio.create_task(http.post("/v1/chat/completions", json=body))
                     for _ in range(3)]
            await asyncio.sleep(0.05)
            health = await http.get("/health")
            assert health.status_code == 200  # probes never wait in line
            return [*await asyncio.gather(*tasks)]

    statuses = sorted(r.status_code for r in asyncio.run(scenario()))
    assert statuses == [200, 429, 503], statuses
    for r in asyncio.run(scenario()):
        if r.status_code != 200:
            assert r.headers["retry-after"].isdigit()
            assert r.json()["error"]["code"] in ("too_many_requests", "engine_saturated")


class SilentEngine(FakeEngine):
    """Accepts requests and never produces anything: a hung engine."""

    async def generate(self, prompt_token_ids: list[int], spec: SamplingSpec, request_id: str
                       ) -> AsyncIterator[EngineStep]:
        await asyncio.sleep(3600)
        yield EngineStep([], 0)


def test_a_hung_engine_turns_health_to_503(tokenizer: Any) -> None:
    async def scenario() -> tuple[int, int, int]:
        state = AppState(model=make_model(tokenizer), liveness=Liveness(stall_s=0.2))
        state.set_engine(SilentEngine())
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            idle = (await http.get("/health")).status_code
            body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
            stuck = asyncio.create_task(http.post("/v1/chat/completions", json=body))
            await asyncio.sleep(0.05)
            early = (await http.get("/health")).status_code
            await asyncio.sleep(0.3)
            late = (await http.get("/health")).status_code
            stuck.cancel()
            return idle, early, late

    assert asyncio.run(scenario()) == (200, 200, 503)
