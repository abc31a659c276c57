"""What the benchmarks share: servers in their own session, a real-time load client, statistics.

- `ServerProcess` starts a server command in a new session (so its engine processes end with
  it), waits for `/health`, measures the resident memory of its process tree, and stops it.
- `realtime()` puts the benchmark (the load client) under SCHED_FIFO with reset-on-fork, so
  the servers it starts stay at normal priority. On 2 cores a normal-priority client starves
  and sees whole replies in one burst; `Stream.bursts` counts chunks that arrived under 1 ms
  after the previous one, so a run can show that it was not distorted.
- `stream()` sends one streamed completion and records when each chunk arrived.

Benchmarks print figures; they assert nothing and are not tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BURST_GAP_S = 0.001


def realtime() -> bool:
    """SCHED_FIFO (priority 10) for this process only; False where that is not permitted."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(10))
    except (PermissionError, AttributeError, OSError):
        print("note: could not run the client under SCHED_FIFO (needs CAP_SYS_NICE); "
              "watch the burst column", file=sys.stderr)
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    name: str
    cmd: list[str]
    log: Path
    port: int
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    startup_s: float = 0.0
    peak_rss: int = 0  # the process tree's largest resident size seen while starting

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 900) -> ServerProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **self.env}
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log.open("wb"), cwd=self.cwd,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while time.monotonic() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-3000:]}")
            with contextlib.suppress(Exception):  # a child may end between listing and reading
                self.peak_rss = max(self.peak_rss, self.tree_rss())
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.startup_s = time.monotonic() - self.started
                    return self
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} did not become healthy in {timeout} s")

    def tree_rss(self, children_only: bool = False) -> int:
        """Resident bytes of the server's process tree (or of its children: the engine)."""
        import psutil

        assert self.proc is not None
        root = psutil.Process(self.proc.pid)
        procs = root.children(recursive=True) + ([] if children_only else [root])
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total

    def tree_cpu_s(self, root_only: bool = True) -> float:
        """CPU seconds (user + system) used so far by the server process (the front end)."""
        import psutil

        assert self.proc is not None
        procs = [psutil.Process(self.proc.pid)]
        if not root_only:
            procs += procs[0].children(recursive=True)
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@dataclass
class Stream:
    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival times of chunks with text
    tokens: int = 0
    text: str = ""

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.sent

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:], strict=False)]

    @property
    def bursts(self) -> int:
        return sum(g < BURST_GAP_S for g in self.gaps)


async def stream(client: httpx.AsyncClient, url: str, body: dict[str, object]) -> Stream:
    """One streamed request (chat or completions); records each content chunk's arrival."""
    s = Stream(time.perf_counter())
    async with client.stream("POST", url, json={**body, "stream": True,
                                                "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{url}: {chunk['error']}")
            if chunk.get("usage"):
                s.tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                piece = c.get("text") or (c.get("delta") or {}).get("content") or ""
                # Token ids count too: a random model's bytes may spell no whole character.
                if piece or c.get("token_ids"):
                    s.chunks.append(time.perf_counter())
                    s.text += piece
    return s


async def concurrent(url: str, body: dict[str, object], n: int) -> list[Stream]:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        return list(await asyncio.gather(*(stream(client, url, body) for _ in range(n))))


async def post(url: str, body: dict[str, object], n: int) -> tuple[float, int]:
    """n concurrent non-streamed requests: (wall seconds, completion tokens)."""
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        replies = await asyncio.gather(*(client.post(url, json=body) for _ in range(n)))
        wall = time.perf_counter() - start
    for r in replies:
        r.raise_for_status()
    return wall, sum(r.json()["usage"]["completion_tokens"] for r in replies)


def decode_rate(streams: Sequence[Stream]) -> float:
    """Tokens per second after the first token, over the window all streams were decoding."""
    first = min(s.chunks[0] for s in streams)
    last = max(s.chunks[-1] for s in streams)
    return sum(s.tokens - 1 for s in streams) / (last - first)


def spread(values: Sequence[float]) -> str:
    """median (min..max)"""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}..{max(values):.2f})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
