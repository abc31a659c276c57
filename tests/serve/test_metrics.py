"""moegi_* metrics through the app with a fake engine: names, labels, exclusions."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY

from tests.apptest import chat, client
from tests.fakes import FakeEngine


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_requests_errors_and_exclusions(tokenizer: Any) -> None:
    c = client(tokenizer, api_key="k")
    ok = {"Authorization": "Bearer k"}
    before = value("moegi_requests_total", route="/v1/chat/completions", model="m", status="200")
    errors = value("moegi_errors_total", route="/v1/chat/completions", model="m",
                   type="not_found_error")
    auth = value("moegi_errors_total", route="/v1/models", model="m", type="authentication_error")
    r = c.post("/v1/chat/completions", headers=ok,
               json={"model": "m", "messages": [{"role": "user", "content": "首都は？"}]})
    assert r.status_code == 200
    assert c.post("/v1/chat/completions", headers=ok,
                  json={"model": "x", "messages": [{"role": "user", "content": "a"}]}
                  ).status_code == 404
    assert c.get("/v1/models").status_code == 401
    for path in ("/metrics", "/health"):
        c.get(path, headers=ok)
    assert value("moegi_requests_total", route="/v1/chat/completions", model="m",
                 status="200") == before + 1
    assert value("moegi_errors_total", route="/v1/chat/completions", model="m",
                 type="not_found_error") == errors + 1
    assert value("moegi_errors_total", route="/v1/models", model="m",
                 type="authentication_error") == auth + 1
    text = c.get("/metrics", headers=ok).text
    assert 'route="/metrics"' not in text and 'route="/health"' not in text
    assert c.get("/metrics").status_code == 401  # behind --api-key, as documented
    info = 'moegi_model_info{eos_truncation="true",max_model_len="256",model="m"'
    assert info in text


def test_stop_types_tokens_and_streams(tokenizer: Any) -> None:
    c = client(tokenizer, FakeEngine(["東京", "です。", "</s>", "\n### 指示:"]))
    eos_text = value("moegi_choices_finished_total", model="m", finish_reason="stop",
                     stop_type="eos_text")
    length = value("moegi_choices_finished_total", model="m", finish_reason="length",
                   stop_type="length")
    gen = value("moegi_generation_tokens_total", model="m")
    ttft = value("moegi_time_to_first_token_seconds_count", model="m")
    assert chat(c).json()["choices"][0]["stop_type"] == "eos_text"
    assert chat(c, max_tokens=1, stream=True).status_code == 200
    assert value("moegi_choices_finished_total", model="m", finish_reason="stop",
                 stop_type="eos_text") == eos_text + 1
    assert value("moegi_choices_finished_total", model="m", finish_reason="length",
                 stop_type="length") == length + 1
    assert value("moegi_generation_tokens_total", model="m") == gen + 3 + 1
    # Only the stream has a first-token time: a non-streamed reply arrives whole at its end.
    assert value("moegi_time_to_first_token_seconds_count", model="m") == ttft + 1
    assert value("moegi_active_streams", route="/v1/chat/completions", model="m") == 0


def test_route_labels_are_read_from_the_app(tokenizer: Any) -> None:
    """One route table, the app's: every API route is a label value, an unknown path is
    "other", and the generation routes (tagged so) are the ones whose rejections start at 0."""
    from serve.app import AppState, create_app
    from tests.apptest import make_model

    state = AppState(engine=FakeEngine(), model=make_model(tokenizer))
    create_app(state)
    assert {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models",
            "/tokenize", "/detokenize", "/tokenizer_info", "/version"} <= state.metered_routes
    assert not {"/metrics", "/health"} & state.metered_routes
    assert set(state.generation_routes) == {"/v1/chat/completions", "/v1/completions",
                                            "/v1/responses"}
    for route in state.generation_routes:
        assert REGISTRY.get_sample_value("moegi_rejected_requests_total", {
            "route": route, "model": "m", "reason": "engine_saturated"}) is not None
    c = client(tokenizer)
    before = value("moegi_requests_total", route="other", model="m", status="404")
    assert c.get("/no/such/path").status_code == 404
    assert value("moegi_requests_total", route="other", model="m", status="404") == before + 1
