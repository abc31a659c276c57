"""Replies that end where they should on prompts the model never saw, logprobs that are the
reply's tokens, structured outputs, /tokenize, /detokenize and the Responses API, on the real
engine (the default 4-bit MoE) with the openai SDK."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import Server
from tests.schemas import sse_payloads, validate
from tiny.train import PAIRS

pytestmark = pytest.mark.integration

# Questions outside the memorised set (tiny/instructions.json), in both languages.
UNSEEN = [
    "東京の天気はどうですか？", "北海道について教えてください。", "日本で一番長い川は？",
    "好きな食べ物は何ですか？", "おすすめの本を教えて。", "大阪城はいつ建てられましたか？",
    "京都の秋はどうですか？", "富士山に登るには？", "日本の人口は？", "寿司の作り方を教えて。",
    "新幹線はどれくらい速いですか？", "桜はいつ咲きますか？", "沖縄の海はきれいですか？",
    "量子化とは何ですか？", "Tell me about Kyoto.", "What is the tallest mountain in Japan?",
    "How do I cook rice?", "What is your name?", "Where is Osaka?", "Why is the sky blue?",
    "What is a Mixture of Experts?", "Recommend a book.", "How far is the moon?",
    "What language is spoken in Japan?",
]
MARKERS = ("</s>", "### 指示:", "### 入力:", "### 応答:", "[INST]", "[/INST]", "<<SYS>>")


def _stream_chat(server: Server, body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    r = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": True},
                   timeout=120)
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    for ch in chunks:
        validate("CreateChatCompletionStreamResponse", ch)
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks
                   if ch["choices"])
    return text, chunks


@pytest.mark.parametrize("question", UNSEEN)
def test_unseen_prompts_never_show_a_marker_or_eos(chat_server: Server, question: str) -> None:
    body = {"model": "tiny-chat", "temperature": 0, "max_tokens": 80,
            "messages": [{"role": "user", "content": question}]}
    r = chat_server.client().chat.completions.create(**body)
    validate("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))
    reply = r.choices[0].message.content or ""
    assert not any(m in reply for m in MARKERS), reply
    if r.choices[0].finish_reason == "stop":
        assert r.choices[0].stop_type in ("eos_text", "turn_marker", "eos_token")
    streamed, _ = _stream_chat(chat_server, body)
    assert streamed == reply


def _lp_bytes(entries: list[dict[str, Any]]) -> bytes:
    return bytes(b for e in entries for b in e["bytes"])


@pytest.mark.parametrize("stop", [None, ["紅葉は"]])
def test_chat_logprobs_are_the_replys_tokens(chat_server: Server, stop: list[str] | None) -> None:
    question = PAIRS[3][0]
    body = {"model": "tiny-chat", "temperature": 0, "max_tokens": 80, "logprobs": True,
            "top_logprobs": 2, "stop": stop, "messages": [{"role": "user", "content": question}]}
    r = chat_server.client().chat.completions.create(**body)
    choice = r.choices[0]
    assert choice.logprobs is not None
    content = choice.message.content or ""
    assert _lp_bytes([t.model_dump() for t in choice.logprobs.content]) == content.encode()
    assert content == (PAIRS[3][1] if stop is None else PAIRS[3][1].split("紅葉は")[0])
    text, chunks = _stream_chat(chat_server, body)
    streamed = _lp_bytes([e for ch in chunks if ch["choices"] and ch["choices"][0]["logprobs"]
                          for e in ch["choices"][0]["logprobs"]["content"]])
    assert text == content and streamed == content.encode()


def test_completion_logprobs_are_the_replys_tokens(chat_server: Server) -> None:
    # The prompt exactly as the model was tuned on it (alpaca-ja, with its preamble): a bare
    # "### 指示:" prompt is off its training distribution, and the 4-bit model may answer
    # another memorised question there.
    prompt = httpx.post(chat_server.url + "/tokenize", json={
        "model": "tiny-chat", "messages": [{"role": "user", "content": PAIRS[0][0]}]},
        timeout=30).json()["tokens"]
    r = chat_server.client().completions.create(model="tiny-chat", prompt=prompt, max_tokens=40,
                                                temperature=0, logprobs=1)
    choice = r.choices[0]
    assert choice.text == PAIRS[0][1] and choice.model_extra["stop_type"] == "eos_text"
    assert "".join(choice.logprobs.tokens) == choice.text


def test_a_length_finish_drops_a_partial_eos(chat_server: Server) -> None:
    """Find where the model starts "</s>", then stop the reply on that very token."""
    question, answer = PAIRS[0]
    messages = [{"role": "user", "content": question}]
    raw = httpx.post(chat_server.url + "/v1/chat/completions", json={
        "model": "tiny-chat", "temperature": 0, "max_tokens": 30, "eos_truncation": False,
        "logprobs": True, "messages": messages}, timeout=60).json()["choices"][0]
    tokens = [e["token"] for e in raw["logprobs"]["content"]]
    spelled, cut = "", 0
    for i, tok in enumerate(tokens):
        spelled += tok
        if spelled.endswith("<") or "<" in tok:
            cut = i + 1
            break
    assert cut and raw["message"]["content"].startswith(answer + "</s>")
    r = chat_server.client().chat.completions.create(
        model="tiny-chat", temperature=0, max_completion_tokens=cut, messages=messages)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == answer  # not answer + "<"


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": ["東京", "大阪"]}},
          "required": ["city"], "additionalProperties": False}


def test_structured_outputs_both_endpoints_streamed_and_not(chat_server: Server) -> None:
    client = chat_server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA,
                                                  "strict": True}}
    messages = [{"role": "user", "content": "日本の首都はどこですか？"}]
    r = client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0,
                                       max_tokens=40, response_format=fmt)
    assert json.loads(r.choices[0].message.content)["city"] in ("東京", "大阪")
    streamed, _ = _stream_chat(chat_server, {"model": "tiny-chat", "messages": messages,
                                             "temperature": 0, "max_tokens": 40,
                                             "response_format": fmt})
    assert streamed == r.choices[0].message.content
    done = client.completions.create(model="tiny-chat", prompt="首都:", max_tokens=40,
                                     temperature=0, extra_body={"response_format": fmt})
    assert json.loads(done.choices[0].text)["city"] in ("東京", "大阪")
    obj = client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0,
                                         max_tokens=60, response_format={"type": "json_object"})
    assert obj.choices[0].message.content.startswith("{")


def test_a_schema_the_engine_cannot_compile_is_a_400(chat_server: Server) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "no-such-type"}}}}}
    with pytest.raises(openai.BadRequestError, match="no-such-type"):
        chat_server.client().chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "x"}], response_format=bad)


def test_tokenize_and_detokenize(chat_server: Server) -> None:
    prompt = httpx.post(chat_server.url + "/tokenize", json={
        "model": "tiny-chat", "messages": [{"role": "user", "content": PAIRS[0][0]}]}).json()
    chat = chat_server.client().chat.completions.create(
        model="tiny-chat", temperature=0, messages=[{"role": "user", "content": PAIRS[0][0]}])
    assert prompt["count"] == chat.usage.prompt_tokens == len(prompt["tokens"])
    assert prompt["max_model_len"] == 512
    text = httpx.post(chat_server.url + "/detokenize",
                      json={"tokens": prompt["tokens"][1:]}).json()["prompt"]
    assert text.endswith(PAIRS[0][0] + "\n### 応答:\n")


def test_responses_api_with_the_sdk(chat_server: Server) -> None:
    client = chat_server.client()
    question, answer = PAIRS[0]
    r = client.responses.create(model="tiny-chat", input=question, temperature=0)
    validate("Response", r.model_dump(exclude_unset=True, mode="json"))
    assert r.output_text == answer and r.status == "completed"
    assert r.usage is not None and r.usage.output_tokens > 0
    with client.responses.stream(model="tiny-chat", temperature=0,
                                 input=[{"role": "user", "content": PAIRS[1][0]}],
                                 instructions="あなたは役立つアシスタントです。") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == PAIRS[1][1]
    raw = httpx.post(chat_server.url + "/v1/responses", json={
        "model": "tiny-chat", "input": question, "stream": True, "temperature": 0}, timeout=60)
    for payload in sse_payloads(raw.text):
        validate("ResponseStreamEvent", json.loads(payload))
    with pytest.raises(openai.BadRequestError, match="stateless"):
        client.responses.create(model="tiny-chat", input="x", store=True)
