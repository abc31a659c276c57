"""/v1/responses, /tokenize, /detokenize, logprobs aligned with the reply, structured-output
requests, on a fake engine whose token ids are the tokenizer's real encoding of its text."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.apptest import assert_envelope, chat, client
from tests.fakes import FakeEngine
from tests.schemas import sse_payloads, validate

PIECES = ["日本", "の首都は", "東京", "です。", "<", "/s", ">", "\n### 指示:"]


def test_chat_logprobs_spell_exactly_the_reply(tokenizer: Any) -> None:
    c = client(tokenizer, FakeEngine(PIECES, tokenizer=tokenizer))
    body = chat(c, logprobs=True, top_logprobs=1, return_token_ids=True).json()
    validate("CreateChatCompletionResponse", body)
    choice = body["choices"][0]
    content = choice["message"]["content"]
    assert content == "日本の首都は東京です。" and choice["stop_type"] == "eos_text"
    entries = choice["logprobs"]["content"]
    assert bytes(b for e in entries for b in e["bytes"]) == content.encode()
    assert tokenizer.decode(choice["token_ids"]) == content  # the cut tokens went too


def test_streamed_logprobs_spell_exactly_the_streamed_reply(tokenizer: Any) -> None:
    c = client(tokenizer, FakeEngine(PIECES, tokenizer=tokenizer))
    r = chat(c, logprobs=True, stream=True)
    chunks = [json.loads(p) for p in sse_payloads(r.text)[:-1]]
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
    raw = bytes(b for ch in chunks if ch["choices"][0]["logprobs"]
                for e in ch["choices"][0]["logprobs"]["content"] for b in e["bytes"])
    assert text == "日本の首都は東京です。" and raw == text.encode()


def test_completion_logprobs_and_text_offsets(tokenizer: Any) -> None:
    c = client(tokenizer, FakeEngine(PIECES, tokenizer=tokenizer))
    body = c.post("/v1/completions", json={"model": "m", "prompt": "x", "logprobs": 1,
                                           "max_tokens": 20}).json()
    validate("CreateCompletionResponse", body)
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] == "日本の首都は東京です。"
    assert lp["text_offset"][0] == 0 and lp["text_offset"][-1] == len(choice["text"]) - len(
        lp["tokens"][-1])


def test_a_length_limit_drops_a_partial_eos(tokenizer: Any) -> None:
    c = client(tokenizer, FakeEngine(["春には", "桜も咲きます。", "<", "/s"], tokenizer=tokenizer))
    body = chat(c, max_completion_tokens=3, logprobs=True).json()["choices"][0]
    assert body["message"]["content"] == "春には桜も咲きます。"
    assert body["finish_reason"] == "length"
    assert bytes(b for e in body["logprobs"]["content"] for b in e["bytes"]).decode() == \
        "春には桜も咲きます。"
    streamed = chat(c, max_completion_tokens=3, stream=True)
    text = "".join(json.loads(p)["choices"][0]["delta"].get("content", "")
                   for p in sse_payloads(streamed.text)[:-1] if json.loads(p)["choices"])
    assert text == "春には桜も咲きます。"


def test_a_response_header_written_by_the_model_is_a_turn_marker(tokenizer: Any) -> None:
    c = client(tokenizer, FakeEngine(["京都について", "教えて。\n", "### 応", "答:\n", "京都には"]))
    body = chat(c).json()["choices"][0]
    assert body["message"]["content"] == "京都について教えて。\n"
    assert (body["finish_reason"], body["stop_type"], body["stop_reason"]) == (
        "stop", "turn_marker", "### 応答:")


def test_structured_output_turns_eos_truncation_off(tokenizer: Any) -> None:
    engine = FakeEngine(['{"a": "</s>"}'])
    c = client(tokenizer, engine)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body = chat(c, response_format={"type": "json_schema",
                                    "json_schema": {"name": "x", "schema": schema,
                                                    "strict": True}}).json()
    assert json.loads(body["choices"][0]["message"]["content"]) == {"a": "</s>"}
    spec = engine.requests[-1][1]
    assert spec.json_schema == schema and "</s>" not in spec.stop
    chat(c, response_format={"type": "json_object"}, stop=["STOP"])
    spec = engine.requests[-1][1]
    assert spec.json_object and spec.stop == ("STOP",)  # the user's own stops still apply
    assert_envelope(chat(c, response_format={"type": "json_schema"}), 400, "response_format")
    assert_envelope(chat(c, response_format={"type": "yaml"}), 400)


def test_responses_create(tokenizer: Any) -> None:
    c = client(tokenizer)
    r = c.post("/v1/responses", json={"model": "m", "input": "首都は？", "instructions": "S",
                                      "metadata": {"k": "v"}})
    body = r.json()
    validate("Response", body)
    assert body["status"] == "completed" and body["metadata"] == {"k": "v"}
    assert body["output"][0]["content"][0]["text"] == "日本の首都は東京です。"
    assert body["usage"]["output_tokens"] == 7
    messages = c.post("/v1/responses", json={"model": "m", "max_output_tokens": 2, "input": [
        {"role": "user", "content": "首都は？"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "東京"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "?"}]},
    ]}).json()
    validate("Response", messages)
    assert messages["status"] == "incomplete"
    assert messages["incomplete_details"] == {"reason": "max_output_tokens"}


def test_responses_stream_events(tokenizer: Any) -> None:
    c = client(tokenizer)
    r = c.post("/v1/responses", json={"model": "m", "input": "首都は？", "stream": True})
    events = [json.loads(p) for p in sse_payloads(r.text)]
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for e in events:
        validate("ResponseStreamEvent", e)
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == events[-1]["response"]["output"][0]["content"][0]["text"]
    assert "event: response.completed" in r.text


def test_responses_stream_error_is_an_error_event(tokenizer: Any) -> None:
    c = client(tokenizer, FakeEngine(dead=True))
    r = c.post("/v1/responses", json={"model": "m", "input": "x", "stream": True})
    last = json.loads(sse_payloads(r.text)[-1])
    validate("ResponseStreamEvent", last)
    assert last["type"] == "error" and last["code"] == "engine_dead"


@pytest.mark.parametrize(("body", "needle"), [
    ({"store": True}, "stateless"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"tools": [{"type": "function", "name": "f"}]}, "tools"),
    ({"input": []}, "empty"),
])
def test_responses_refusals(tokenizer: Any, body: dict[str, Any], needle: str) -> None:
    err = assert_envelope(client(tokenizer).post(
        "/v1/responses", json={"model": "m", "input": "x", **body}), 400)
    assert needle in err["message"]


def test_tokenize_and_detokenize(tokenizer: Any) -> None:
    c = client(tokenizer)
    ids = tokenizer.encode("日本の首都は")
    body = c.post("/tokenize", json={"model": "m", "prompt": "日本の首都は"}).json()
    assert body == {"count": len(ids), "max_model_len": 256, "tokens": ids}
    chat_body = c.post("/tokenize", json={"messages": [{"role": "user", "content": "首都は？"}],
                                          "return_token_strs": True}).json()
    assert chat_body["tokens"][0] == tokenizer.bos_token_id  # the template writes BOS once
    assert chat_body["token_strs"][0] == "<s>" and chat_body["count"] > 10
    text = c.post("/detokenize", json={"tokens": ids[1:]}).json()["prompt"]
    assert text == "日本の首都は"
    assert_envelope(c.post("/detokenize", json={"tokens": [10**9]}), 400, "tokens")
    assert_envelope(c.post("/tokenize", json={"prompt": "a", "messages": []}), 400)
    assert_envelope(c.post("/tokenize", json={"model": "x", "prompt": "a"}), 404, "model")


def test_scoring_request_keeps_the_engines_tokens(tokenizer: Any) -> None:
    """lm-eval's loglikelihood: echo + logprobs, summing token_logprobs[ctxlen:-1] and taking
    the last entries to be the generated ones. When the generated tokens spell EOS text, EOS
    truncation would cut them and shift every entry; a scoring request gets them as the engine
    made them. A reply (no echo) is still cut, and a scoring request may ask for truncation."""
    def score(**extra: Any) -> dict[str, Any]:
        c = client(tokenizer, FakeEngine(["<", "/s", ">", "x"], tokenizer=tokenizer))
        r = c.post("/v1/completions", json={"model": "m", "prompt": "首都は", "max_tokens": 3,
                                            "temperature": 0, **extra})
        assert r.status_code == 200, r.text
        choice: dict[str, Any] = r.json()["choices"][0]
        return choice

    scored = score(echo=True, logprobs=1)
    assert scored["text"] == "首都は</s>" and scored["finish_reason"] == "length"
    lps = scored["logprobs"]
    generated = sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in ("<", "/s", ">"))
    assert "".join(lps["tokens"]) == "</s>" and len(lps["token_logprobs"]) == generated
    assert score()["text"] == "" and score()["stop_type"] == "eos_text"
    assert score(echo=True, logprobs=1, eos_truncation=True)["text"] == "首都は"
    # ignore_eos (load testers' "exactly max_tokens") gets the engine's tokens too.
    assert score(ignore_eos=True)["text"] == "</s>"
    assert score(ignore_eos=True, eos_truncation=True)["text"] == ""


def test_tokenizer_info_as_vllm_serves_it(tokenizer: Any) -> None:
    """lm-eval's default tokenizer backend reads GET /tokenizer_info (eos_token at least)."""
    info = client(tokenizer).get("/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>"
    assert info["tokenizer_class"] == type(tokenizer).__name__
    assert "### 指示:" in info["chat_template"]  # the template in use (alpaca-ja)
    assert not any(k.endswith("_file") for k in info)
    json.dumps(info)  # JSON-safe
