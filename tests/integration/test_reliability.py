"""The server under hostile input, disconnects, overload, engine death and shutdown: real
servers on the tiny models, real vLLM. Bounded in time; every loop stops by itself.

- a seeded fuzz of bad and odd requests across every route: no 5xx, every error in the
  envelope, every stream ends properly;
- 200 concurrent streams, 30% of which hang up early: the engine and the stream gauges settle
  back to 0;
- overload: a burst past the bounds gets 429/503 and /health stays fast;
- SIGTERM during streams (one client stops reading): they drain or end with an error chunk,
  and the process exits 0 within the deadline, leaving no vLLM process;
- SIGKILL of the engine core on an idle server: /health 503 and a non-zero exit in seconds;
- SIGKILL of the server itself: its engine processes end too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from tests.integration.conftest import Server, _start, _stop
from tests.schemas import sse_payloads, validate
from tiny.build import ensure_model

pytestmark = pytest.mark.integration

SHUTDOWN_S = 4.0
LIFECYCLE_ARGS = {
    # Small bounds so a burst of 24 is past them; a short drain for the SIGTERM test.
    "bounded": ["--max-running-requests", "2", "--max-waiting-requests", "2",
                "--max-wait-s", "3", "--shutdown-timeout-s", str(SHUTDOWN_S)],
    "engine-kill": [],
    "main-kill": [],
}


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    tmp = tmp_path_factory.mktemp("lifecycle")
    model = ensure_model("tiny-llama")
    servers = {name: _start(name, ["--model", str(model), "--served-model-name", "tiny-llama",
                                   "--chat-template", "llama-2-chat", *args], tmp)
               for name, args in LIFECYCLE_ARGS.items()}
    try:
        yield servers
    finally:
        _stop(list(servers.values()))


def engine_procs(server: Server) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return list(psutil.Process(server.proc.pid).children(recursive=True))
    return []


# ---------------------------------------------------------------------------------------------
# Fuzz


def _odd_value(rng: random.Random) -> Any:
    return rng.choice([
        None, True, -1, 0, 2**63, -(2**63) - 1, 10**30, 1e308, -1e308, 0.5, "", "x" * 3000,
        "\ud800", "a\udfffb", "</s>", "\x00", [], [1], [-1], [10**12], {}, {"1": "x"},
        {"1": 1e9}, [[1, 2]], "🙂" * 50, "日本" * 100, [None], {"type": "nope"},
    ])


CHAT_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature",
               "top_p", "top_k", "min_p", "n", "seed", "stop", "stop_token_ids", "logit_bias",
               "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
               "repetition_penalty", "stream", "stream_options", "response_format",
               "eos_truncation", "sentence_trim", "ignore_eos", "user", "tools",
               "add_generation_prompt", "continue_final_message", "return_token_ids"]


def _fuzz_requests(rng: random.Random, count: int) -> list[tuple[str, str, bytes, bool]]:
    """(method, path, body, streamed) requests: mostly bad or odd, some valid."""
    out: list[tuple[str, str, bytes, bool]] = []
    valid_chat = {"model": "tiny-chat", "max_tokens": 4, "temperature": 0,
                  "messages": [{"role": "user", "content": "日本の首都はどこですか？"}]}
    for _ in range(count):
        kind = rng.random()
        stream = rng.random() < 0.3
        if kind < 0.12:  # valid, with one odd-but-legal twist
            body: dict[str, Any] = dict(valid_chat, stream=stream)
            body[rng.choice(["sentence_trim", "eos_truncation", "logprobs"])] = True
            out.append(("POST", "/v1/chat/completions", json.dumps(body).encode(), stream))
        elif kind < 0.45:  # chat with random odd fields
            body = dict(valid_chat, stream=stream)
            for _ in range(rng.randint(1, 3)):
                body[rng.choice(CHAT_FIELDS)] = _odd_value(rng)
            out.append(("POST", "/v1/chat/completions",
                        json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass"),
                        stream))
        elif kind < 0.65:  # completions
            body = {"model": "tiny-chat", "max_tokens": 3, "prompt": rng.choice(
                ["東京", ["a", "b"], [1, 2, 3], [[1], [2]], "", [], [10**9], "\ud800", 5,
                 ["x"] * 40]), "stream": stream, rng.choice(CHAT_FIELDS): _odd_value(rng)}
            out.append(("POST", "/v1/completions",
                        json.dumps(body).encode("utf-8", "surrogatepass"), stream))
        elif kind < 0.75:  # responses
            body = {"model": "tiny-chat", "max_output_tokens": 3, "stream": stream,
                    "input": rng.choice(["首都は？", [], [{"role": "user", "content": "x"}],
                                         [{"role": "tool", "content": "x"}], 7, "\ud800"]),
                    rng.choice(["store", "previous_response_id", "tools", "text",
                                "instructions", "temperature"]): _odd_value(rng)}
            out.append(("POST", "/v1/responses",
                        json.dumps(body).encode("utf-8", "surrogatepass"), stream))
        elif kind < 0.82:  # tokenize / detokenize
            path = rng.choice(["/tokenize", "/detokenize"])
            body = rng.choice([{"prompt": _odd_value(rng)}, {"tokens": _odd_value(rng)},
                               {"messages": _odd_value(rng)}, {"prompt": "a", "messages": []},
                               {"tokens": [1, 2, 3]}, {"prompt": "東京"}])
            out.append(("POST", path, json.dumps(body).encode("utf-8", "surrogatepass"), False))
        elif kind < 0.92:  # broken bodies
            raw = rng.choice([b"{bad", b"", b"null", b"[]", b'"x"', b"{" * 500 + b"}" * 500,
                              b'{"model": "tiny-chat", "messages": [', "\xff\xfe".encode(),
                              b'{"messages": [{"role": "user", "content": "\\ud800"}]}'])
            out.append(("POST", rng.choice(["/v1/chat/completions", "/v1/completions",
                                            "/v1/responses", "/tokenize"]), raw, False))
        else:  # routes and methods
            out.append((rng.choice(["GET", "DELETE", "PUT", "OPTIONS", "HEAD"]),
                        rng.choice(["/v1/chat/completions", "/v1/nothing", "/%2e%2e/etc",
                                    "/v1/models", "/version", "/docs", "/v1//models"]),
                        b"", False))
    return out


async def _fuzz(server: Server, requests: list[tuple[str, str, bytes, bool]]
                ) -> dict[str, int]:
    tally = {"requests": 0, "5xx": 0, "ok": 0, "errors": 0, "streams": 0}
    codes: dict[int, int] = {}
    sem = asyncio.Semaphore(16)
    failures: list[str] = []

    async def one(client: httpx.AsyncClient, method: str, path: str, body: bytes,
                  stream: bool) -> None:
        async with sem:
            r = await client.request(method, path, content=body,
                                     headers={"content-type": "application/json"})
        tally["requests"] += 1
        codes[r.status_code] = codes.get(r.status_code, 0) + 1
        if r.status_code >= 500:
            tally["5xx"] += 1
            failures.append(f"{r.status_code} {method} {path} {body[:200]!r}: {r.text[:300]}")
            return
        ctype = r.headers.get("content-type", "")
        if r.status_code >= 400:
            tally["errors"] += 1
            if method != "HEAD":
                validate("ErrorResponse", r.json())
            return
        tally["ok"] += 1
        if ctype.startswith("text/event-stream"):
            tally["streams"] += 1
            payloads = sse_payloads(r.text)
            if path == "/v1/responses":
                last = json.loads(payloads[-1])["type"]
                assert last in ("response.completed", "response.incomplete", "error"), r.text
            else:
                assert payloads and payloads[-1] == "[DONE]", r.text[-500:]
                for p in payloads[:-1]:
                    if '"error"' in p[:10]:
                        validate("ErrorResponse", json.loads(p))

    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        await asyncio.gather(*(one(client, *req) for req in requests))
    assert not failures, "\n".join(failures[:10])
    print(f"\nfuzz status codes: {dict(sorted(codes.items()))}")
    return tally


def test_fuzz_never_gets_a_5xx(chat_server: Server) -> None:
    rng = random.Random(20261121)
    requests = _fuzz_requests(rng, 2200)
    start = time.monotonic()
    tally = asyncio.run(_fuzz(chat_server, requests))
    health = httpx.get(chat_server.url + "/health", timeout=5)
    print(f"\nfuzz: {tally} in {time.monotonic() - start:.0f} s")
    assert tally["requests"] == len(requests) >= 2000 and tally["5xx"] == 0
    assert tally["ok"] > 100 and tally["errors"] > 1000 and tally["streams"] > 20
    assert health.status_code == 200
    ok = chat_server.client().chat.completions.create(
        model="tiny-chat", temperature=0, messages=[{"role": "user", "content": "日本の首都はどこですか？"}])
    assert ok.choices[0].message.content == "日本の首都は東京です。"


# ---------------------------------------------------------------------------------------------
# Disconnects


async def _many_streams(server: Server, n: int, hang_up: float) -> tuple[int, int]:
    rng = random.Random(7)
    body = {"model": "tiny-chat", "max_tokens": 24, "ignore_eos": True, "eos_truncation": False,
            "stream": True, "messages": [{"role": "user", "content": "x"}]}
    finished = dropped = 0

    async def one(client: httpx.AsyncClient, leave: bool) -> None:
        nonlocal finished, dropped
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if leave and seen >= 2:
                        dropped += 1
                        return  # closes the connection mid-stream
                    if line == "data: [DONE]":
                        finished += 1

    limits = httpx.Limits(max_connections=n + 8)
    async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
        await asyncio.gather(*(one(client, rng.random() < hang_up) for _ in range(n)))
    return finished, dropped


def test_200_streams_with_30_percent_hang_ups_leave_nothing_behind(chat_server: Server) -> None:
    finished, dropped = asyncio.run(_many_streams(chat_server, 200, 0.3))
    assert finished + dropped == 200 and 40 <= dropped <= 80
    gauges = ("vllm:num_requests_running", "vllm:num_requests_waiting", "moegi_active_streams")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(chat_server.metric(g) for g in gauges):
        time.sleep(0.2)
    values = {g: chat_server.metric(g) for g in gauges}
    print(f"\n200 streams: {finished} finished, {dropped} hung up; afterwards {values}")
    assert values == dict.fromkeys(gauges, 0.0)


# ---------------------------------------------------------------------------------------------
# Overload, then SIGTERM on the same server


def test_a_burst_past_the_bounds_gets_429_or_503_and_health_stays_fast(
        lifecycle: dict[str, Server]) -> None:
    server = lifecycle["bounded"].wait()
    body = {"model": "tiny-llama", "max_tokens": 48, "ignore_eos": True, "temperature": 0,
            "messages": [{"role": "user", "content": "x"}]}

    async def burst() -> tuple[list[int], float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            tasks = [asyncio.create_task(client.post("/v1/chat/completions", json=body))
                     for _ in range(24)]
            await asyncio.sleep(0.3)
            t = time.perf_counter()
            health = await client.get("/health")
            health_s = time.perf_counter() - t
            assert health.status_code == 200
            replies = await asyncio.gather(*tasks)
        for r in replies:
            if r.status_code != 200:
                validate("ErrorResponse", r.json())
                assert r.headers["retry-after"].isdigit()
        return [r.status_code for r in replies], health_s

    statuses, health_s = asyncio.run(burst())
    print(f"\nburst of 24 at 2 running + 2 waiting: {sorted(statuses)}; /health {health_s:.3f} s")
    assert statuses.count(200) >= 2 and set(statuses) <= {200, 429, 503}
    assert statuses.count(429) + statuses.count(503) >= 10
    assert health_s < 1.0
    assert server.metric("moegi_rejected_requests_total") >= 10


def _non_reading_stream(server: Server) -> socket.socket:
    """A client that asks for a long stream and never reads it."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    body = json.dumps({"model": "tiny-llama", "max_tokens": 400, "ignore_eos": True,
                       "stream": True, "messages": [{"role": "user", "content": "x"}]}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
                 b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    return sock


def test_sigterm_drains_streams_and_exits_0_within_the_deadline(
        lifecycle: dict[str, Server]) -> None:
    server = lifecycle["bounded"].wait()
    procs = engine_procs(server)
    assert procs
    stuck = _non_reading_stream(server)
    results: list[str] = []

    async def streams() -> None:
        body = {"model": "tiny-llama", "max_tokens": 400, "ignore_eos": True, "stream": True,
                "messages": [{"role": "user", "content": "x"}]}
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            async def one() -> None:
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                results.append(lines[-2] if len(lines) > 1 else "")
                assert lines[-1] == "data: [DONE]", lines[-3:]

            task = asyncio.gather(one())
            await asyncio.sleep(1.5)
            os.kill(server.proc.pid, signal.SIGTERM)
            await task

    start = time.monotonic()
    asyncio.run(streams())
    code = server.proc.wait(timeout=SHUTDOWN_S + 15)
    took = time.monotonic() - start
    stuck.close()
    time.sleep(0.5)
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    print(f"\nSIGTERM with 1 reading and 1 non-reading stream: exit {code} after {took:.1f} s "
          f"(deadline {SHUTDOWN_S} s); last chunk: {results[0][:120]}")
    assert code == 0 and took <= 1.5 + SHUTDOWN_S + 10 and not alive
    last = json.loads(results[0][len("data: "):])
    # Either the stream finished in time, or the deadline ended it with an error chunk.
    assert last.get("error", {}).get("code") == "server_shutdown" or \
        last["choices"][0]["finish_reason"] == "length"


def test_an_idle_server_exits_within_seconds_of_sigterm(tmp_path: Any) -> None:
    server = _start("idle", ["--model", str(ensure_model("tiny-llama")), "--chat-template",
                             "llama-2-chat"], tmp_path).wait()
    try:
        procs = engine_procs(server)
        start = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        code = server.proc.wait(timeout=30)
        took = time.monotonic() - start
        time.sleep(0.5)
        print(f"\nidle SIGTERM: exit {code} after {took:.1f} s")
        assert code == 0 and took < 8
        assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        _stop([server])


# ---------------------------------------------------------------------------------------------
# Death


def test_engine_death_on_an_idle_server_is_noticed_in_seconds(
        lifecycle: dict[str, Server]) -> None:
    server = lifecycle["engine-kill"].wait()
    core = next(p for p in engine_procs(server) if "EngineCore" in " ".join(p.cmdline()) or
                "EngineCore" in p.name())
    start = time.monotonic()
    core.kill()
    status = 200
    while status == 200 and time.monotonic() - start < 30:
        with contextlib.suppress(httpx.HTTPError):
            status = httpx.get(server.url + "/health", timeout=2).status_code
        time.sleep(0.1)
    to_503 = time.monotonic() - start
    code = server.proc.wait(timeout=30)
    to_exit = time.monotonic() - start
    print(f"\nengine core SIGKILLed: /health {status} after {to_503:.1f} s, "
          f"exit {code} after {to_exit:.1f} s")
    assert status == 503 and to_503 < 5
    assert code != 0 and to_exit < 15


def test_killing_the_server_ends_its_engine_processes(lifecycle: dict[str, Server]) -> None:
    server = lifecycle["main-kill"].wait()
    procs = engine_procs(server)
    assert len(procs) >= 2  # the engine core and its worker
    start = time.monotonic()
    server.proc.kill()
    server.proc.wait()
    while time.monotonic() - start < 15 and any(
            p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs):
        time.sleep(0.2)
    left = [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    print(f"\nserver SIGKILLed: its {len(procs)} engine processes gone after "
          f"{time.monotonic() - start:.1f} s")
    assert not left
