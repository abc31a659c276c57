"""The server on the real vLLM engine, driven with the real openai SDK.

tiny-chat memorised the pairs in tiny/instructions.json and, like a fine-tune that wrote
EOS into its data as text, follows each answer with "</s>" spelled in pieces and a new turn.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import Server
from tests.schemas import sse_payloads, validate
from tiny.train import PAIRS

pytestmark = pytest.mark.integration


def ask(server: Server, question: str, **kw: Any) -> Any:
    return server.client().chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": question}],
        temperature=kw.pop("temperature", 0), max_tokens=kw.pop("max_tokens", 80), **kw)


def raw_chat(server: Server, **body: Any) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", headers=server.headers(),
                      json={"model": "tiny-chat", "temperature": 0, **body}, timeout=120)


def stream_text(server: Server, body: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    r = raw_chat(server, stream=True, **body)
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    for ch in chunks:
        validate("CreateChatCompletionStreamResponse", ch)
    texts = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    return texts, chunks


def test_models_lists_the_served_model(chat_server: Server) -> None:
    models = chat_server.client().models.list()
    assert [m.id for m in models.data] == ["tiny-chat"]
    body = httpx.get(chat_server.url + "/v1/models").json()
    validate("ListModelsResponse", body)
    assert body["data"][0]["chat_template"] == "alpaca-ja"
    assert body["data"][0]["preset"] == "tiny-chat"


@pytest.mark.parametrize(("question", "answer"), PAIRS)
def test_reply_is_exactly_the_memorised_answer(chat_server: Server, question: str, answer: str
                                               ) -> None:
    r = ask(chat_server, question)
    validate("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))
    choice = r.choices[0]
    assert choice.message.content == answer
    assert choice.finish_reason == "stop"
    assert choice.stop_type == "eos_text" and choice.stop_reason == "</s>"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_raw_generation_leaks_eos_text_and_runs_on(chat_server: Server) -> None:
    question, answer = PAIRS[0]
    r = ask(chat_server, question, max_tokens=60, extra_body={"eos_truncation": False})
    text = r.choices[0].message.content
    assert text.startswith(answer + "</s>\n### 指示:\n")
    assert r.choices[0].finish_reason == "length"


def test_turn_marker_stop_when_eos_text_is_kept(chat_server: Server) -> None:
    # With the EOS text kept in the output, the next stop is the model's own new turn.
    question, answer = PAIRS[1]
    r = ask(chat_server, question, extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].message.content == answer + "</s>"


@pytest.mark.parametrize("question", [q for q, _ in PAIRS])
def test_stream_equals_non_stream_and_has_no_broken_characters(chat_server: Server,
                                                                question: str) -> None:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 80}
    full = raw_chat(chat_server, **body).json()["choices"][0]["message"]["content"]
    texts, chunks = stream_text(chat_server, body)
    assert "".join(texts) == full
    assert not any("\ufffd" in t for t in texts)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["stop_type"] == "eos_text"


def test_stream_never_shows_a_stop_that_is_later_cut(chat_server: Server) -> None:
    question, answer = PAIRS[3]
    stop = "紅葉は"
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 80, "stop": [stop]}
    texts, chunks = stream_text(chat_server, body)
    assert "".join(texts) == answer[: answer.index(stop)]
    assert chunks[-1]["choices"][0]["stop_type"] == "stop_string"


def test_sentence_trim_streamed_and_not(chat_server: Server) -> None:
    question, answer = PAIRS[3]
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 25,
            "sentence_trim": True}
    full = raw_chat(chat_server, **body).json()["choices"][0]
    first_sentence = answer[: answer.index("。") + 1]
    assert full["message"]["content"] == first_sentence
    assert (full["finish_reason"], full["stop_type"]) == ("stop", "sentence_trim")
    texts, _ = stream_text(chat_server, body)
    assert "".join(texts) == first_sentence
    untrimmed = raw_chat(chat_server, **{**body, "sentence_trim": False}).json()["choices"][0]
    assert untrimmed["finish_reason"] == "length"
    assert untrimmed["message"]["content"].startswith(first_sentence)
    assert len(untrimmed["message"]["content"]) > len(first_sentence)


def test_stream_usage_matches_non_stream(chat_server: Server) -> None:
    client = chat_server.client()
    msgs = [{"role": "user", "content": PAIRS[4][0]}]
    plain = client.chat.completions.create(model="tiny-chat", messages=msgs, temperature=0)
    stream = client.chat.completions.create(model="tiny-chat", messages=msgs, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        plain.choices[0].message.content


def test_n_and_logprobs(chat_server: Server) -> None:
    r = ask(chat_server, PAIRS[0][0], n=3, temperature=1.0, seed=7, logprobs=True,
            top_logprobs=2, max_tokens=5)
    validate("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    for c in r.choices:
        assert c.logprobs is not None and len(c.logprobs.content) >= 1
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in c.logprobs.content)


def test_completions_raw_prompt_llama_format_and_echo(chat_server: Server) -> None:
    client = chat_server.client()
    question, answer = PAIRS[0]
    prompt = f"<s>[INST] {question} [/INST]"
    r = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=40, temperature=0)
    validate("CreateCompletionResponse", r.model_dump(exclude_unset=True))
    # llama-2-chat puts a space either side of a reply (" {answer} </s>"), as trained.
    assert r.choices[0].text == f" {answer} "
    echo = client.completions.create(model="tiny-chat", prompt="日本", max_tokens=3,
                                     temperature=0, echo=True, logprobs=1)
    assert echo.choices[0].text.startswith("日本")
    assert echo.choices[0].logprobs.token_logprobs[0] is None  # the BOS has no logprob


def test_completions_stream_chunks_validate(chat_server: Server) -> None:
    r = httpx.post(chat_server.url + "/v1/completions", json={
        "model": "tiny-chat", "prompt": ["日本", "東京"], "max_tokens": 4, "stream": True,
        "temperature": 0}, timeout=60)
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    for p in payloads[:-1]:
        validate("CreateCompletionResponse", json.loads(p), stream_completion=True)
    indices = {c["index"] for p in payloads[:-1] for c in json.loads(p)["choices"]}
    assert indices == {0, 1}


def test_sdk_raises_its_own_exceptions_for_client_errors(chat_server: Server) -> None:
    client = chat_server.client()
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=msgs)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="shorten"):
        client.chat.completions.create(model="tiny-chat",
                                       messages=[{"role": "user", "content": "東京 " * 600}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-chat", messages=msgs, n=1000)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-chat", messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-chat", messages=msgs, frequency_penalty=5)


def test_client_disconnect_aborts_the_engine_request(chat_server: Server) -> None:
    # 16 choices of 400 tokens: 6,400 tokens if nothing stops them. The compiled tiny
    # model streams 400 tokens in about 0.2 s, so a hang-up can come after the engine is done
    # (nothing left to abort); it is tried again, and one of three must cut the engine short.
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "n": 16,
            "temperature": 1.0, "max_tokens": 400, "ignore_eos": True,
            "eos_truncation": False, "stream": True}
    generated = []
    for _ in range(3):
        generated_before = chat_server.metric("vllm:generation_tokens_total")
        with httpx.stream("POST", chat_server.url + "/v1/chat/completions", json=body,
                          timeout=60) as r:
            assert r.status_code == 200, r.read()
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
        # The connection is closed: the engine must drop the request, not finish it.
        deadline = time.monotonic() + 10
        while chat_server.metric("vllm:num_requests_running") > 0:
            assert time.monotonic() < deadline, "the engine still runs a request nobody reads"
            time.sleep(0.05)
        generated.append(chat_server.metric("vllm:generation_tokens_total") - generated_before)
        if generated[-1] < 16 * 400:
            break
    assert generated[-1] < 16 * 400, f"tokens generated per hang-up: {generated}"
    assert ask(chat_server, PAIRS[0][0]).choices[0].message.content == PAIRS[0][1]


def test_llama_server_auth_and_template(llama_server: Server) -> None:
    assert httpx.get(llama_server.url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=llama_server.url + "/v1", api_key="wrong",
                      max_retries=0).models.list()
    client = llama_server.client()
    r = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "system", "content": "S"},
                                      {"role": "user", "content": "こんにちは"}],
        max_tokens=8, temperature=0)
    validate("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))
    # Prompt tokens = the llama-2-chat rendering, tokenized without a second BOS.
    assert r.usage.prompt_tokens > 5 and r.usage.completion_tokens >= 1
    assert httpx.get(llama_server.url + "/version", headers=llama_server.headers()).json()["vllm"]


def test_greedy_stream_equals_non_stream_on_random_llama(llama_server: Server) -> None:
    client = llama_server.client()
    msgs = [{"role": "user", "content": "東京"}]
    plain = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=16,
                                           temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny-llama", messages=msgs, max_tokens=16, temperature=0, stream=True)
        if c.choices)
    assert streamed == plain.choices[0].message.content
