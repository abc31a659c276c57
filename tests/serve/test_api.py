"""The HTTP layer against the fake engine: envelopes, auth, health, streaming shape."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from serve.app import AppState, create_app
from tests.apptest import assert_envelope, chat, client, make_model
from tests.fakes import FakeEngine
from tests.schemas import sse_payloads, validate


def test_chat_response_validates_and_counts_usage(tokenizer: Any) -> None:
    r = chat(client(tokenizer), max_tokens=10)
    body = r.json()
    validate("CreateChatCompletionResponse", body)
    assert body["choices"][0]["message"]["content"] == "日本の首都は東京です。"
    assert body["choices"][0]["stop_type"] == "eos_token"
    assert body["usage"]["completion_tokens"] == 7  # six pieces and the EOS token
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 7


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"n": 0}, "n"),
    ({"n": 2, "temperature": 0}, None),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"tools": [{"type": "function"}]}, None),
    ({"messages": [{"role": "wizard", "content": "x"}]}, None),
    ({"stop": [""]}, None),
])
def test_bad_input_is_a_400_envelope(tokenizer: Any, body: dict[str, Any], param: str | None
                                     ) -> None:
    assert_envelope(chat(client(tokenizer), **body), 400, param)


def test_long_prompt_is_a_400_that_names_the_fix(tokenizer: Any) -> None:
    err = assert_envelope(chat(client(tokenizer), messages=[
        {"role": "user", "content": "東京" * 400}]), 400)
    assert err["code"] == "context_length_exceeded" and "shorten" in err["message"]


def test_malformed_json_and_unknown_model_and_route(tokenizer: Any) -> None:
    c = client(tokenizer)
    r = c.post("/v1/chat/completions", content=b"{bad", headers={"content-type": "application/json"})
    assert "JSON" in assert_envelope(r, 400)["message"]
    assert assert_envelope(chat(c, model="gpt-4"), 404, "model")["code"] == "model_not_found"
    assert_envelope(c.get("/v1/nothing"), 404)
    assert_envelope(c.get("/v1/chat/completions"), 405)


def test_api_key(tokenizer: Any) -> None:
    c = client(tokenizer, api_key="s3cret")
    assert c.get("/health").status_code == 200  # open for probes
    assert_envelope(c.get("/v1/models"), 401)
    assert_envelope(c.get("/v1/models", headers={"Authorization": "Bearer S3CRET"}), 401)
    assert_envelope(c.get("/metrics", headers={"Authorization": "Bearer nope"}), 401)
    ok = c.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    validate("ListModelsResponse", ok.json())


def test_health_503_while_loading_and_when_dead(tokenizer: Any) -> None:
    loading = TestClient(create_app(AppState()), raise_server_exceptions=False)
    assert loading.get("/health").status_code == 503
    assert_envelope(chat(loading), 503)
    dead_calls: list[int] = []
    state = AppState(engine=FakeEngine(dead=True), model=make_model(tokenizer),
                     on_dead=lambda: dead_calls.append(1))
    dead = TestClient(create_app(state), raise_server_exceptions=False)
    assert dead.get("/health").status_code == 503
    assert dead_calls == [1] and state.dead


def test_stream_shape_usage_and_schema(tokenizer: Any) -> None:
    r = chat(client(tokenizer), stream=True, stream_options={"include_usage": True})
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    for ch in chunks:
        validate("CreateChatCompletionStreamResponse", ch)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 7
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "日本の首都は東京です。"


def test_stream_error_after_200_is_a_data_chunk(tokenizer: Any) -> None:
    r = chat(client(tokenizer, FakeEngine(dead=True)), stream=True)
    payloads = sse_payloads(r.text)
    assert r.status_code == 200 and payloads[-1] == "[DONE]"
    err = json.loads(payloads[-2])
    validate("ErrorResponse", err)
    # The same mapper as non-streamed errors: code and param are kept.
    assert err["error"]["code"] == "engine_dead" and err["error"]["type"] == "service_unavailable"


def test_user_stop_cut_and_reported(tokenizer: Any) -> None:
    body = chat(client(tokenizer), stop="東京").json()["choices"][0]
    assert body["message"]["content"] == "日本の首都は"
    assert (body["stop_type"], body["stop_reason"]) == ("stop_string", "東京")


def test_eos_text_cut_and_opt_out(tokenizer: Any) -> None:
    engine = FakeEngine(["答え", "です。<", "/s", ">", "### 指示:"])
    c = client(tokenizer, engine)
    body = chat(c).json()["choices"][0]
    assert body["message"]["content"] == "答えです。"
    assert body["stop_type"] == "eos_text"
    raw = chat(c, eos_truncation=False).json()["choices"][0]
    assert raw["message"]["content"] == "答えです。</s>### 指示:"


def test_preset_sampling_defaults_fill_unset_fields_only(tokenizer: Any) -> None:
    engine = FakeEngine()
    c = client(tokenizer, engine, sampling_defaults={"temperature": 0.7, "top_p": 0.95})
    chat(c)
    chat(c, temperature=0.2)
    assert engine.requests[0][1].temperature == 0.7 and engine.requests[0][1].top_p == 0.95
    assert engine.requests[1][1].temperature == 0.2


def test_default_system_prompt_used_only_without_system(tokenizer: Any) -> None:
    engine = FakeEngine()
    c = client(tokenizer, engine, default_system="システム既定")
    chat(c)
    chat(c, messages=[{"role": "system", "content": "独自"}, {"role": "user", "content": "x"}])
    first = tokenizer.decode(engine.requests[0][0])
    second = tokenizer.decode(engine.requests[1][0])
    assert "システム既定" in first and "システム既定" not in second and "独自" in second


def test_completion_prompt_too_long_names_prompt(tokenizer: Any) -> None:
    r = client(tokenizer).post("/v1/completions", json={"model": "m", "prompt": "東京" * 400})
    assert assert_envelope(r, 400, "prompt")["code"] == "context_length_exceeded"


def test_completions_batch_indices_and_schema(tokenizer: Any) -> None:
    r = client(tokenizer).post("/v1/completions", json={
        "model": "m", "prompt": ["a", "b"], "n": 2, "temperature": 1.0, "max_tokens": 3,
        "echo": True})
    body = r.json()
    validate("CreateCompletionResponse", body)
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2, 3]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    assert body["choices"][0]["text"].startswith("a")


def test_streams_are_paced_only_when_several_are_open(tokenizer: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Pacing holds a stream's next chunk for the rest of the interval; a stream alone is not
    held (its last chunk would only come later), two or more open streams are."""
    import asyncio

    from serve.engine import SamplingSpec
    from serve.run import Gating, Run

    interval = 0.05
    model = make_model(tokenizer, stream_interval_s=interval)
    real_sleep, waits = asyncio.sleep, []

    async def sleep(delay: float, *args: Any) -> Any:
        if delay > 0.01:  # not the fake engine's own step delay
            waits.append(delay)
        return await real_sleep(delay, *args)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    gating = Gating((), False, False, (), False)

    async def streams(k: int) -> list[str]:
        engine = FakeEngine(delay=0.001)
        runs = [Run(engine, model, [1, 2], SamplingSpec(max_tokens=6), f"r{i}", gating)
                for i in range(k)]

        async def text(run: Run) -> str:
            return "".join(e.text for events in [x async for x in run] for e in events)

        return await asyncio.gather(*(text(r) for r in runs))

    assert asyncio.run(streams(1)) == ["日本の首都は東京です。"] and waits == []
    assert asyncio.run(streams(2)) == ["日本の首都は東京です。"] * 2
    assert waits and all(w <= interval for w in waits)
    assert Run.streams == 0
