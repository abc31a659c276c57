"""The server's life around the engine: liveness, a watchdog, the drain on SIGTERM, reaping.

- `MonitoredEngine` wraps the engine: it counts requests in flight and reads the engine's
  progress counter (tokens, and CPU the engine spent: `Engine.progress`), so `Liveness` can tell
  a hung engine (requests in flight, no progress for `engine_stall_s`) from an idle one;
  `/health` answers 503 for a dead and a hung engine.
- `watchdog` asks the engine for its health every second, with or without traffic, so a dead
  engine core is noticed (and the server exits non-zero) within seconds.
- `Drain` holds the streams in progress. On SIGTERM new connections are refused, requests in
  flight get `shutdown_timeout_s` to finish, and then every stream still open ends with an
  error chunk and `data: [DONE]`, every waiting non-streamed request with a 503.
- `reap_children` ends what vLLM's own shutdown left (an engine still loading at SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from serve.config import default
from serve.engine import Engine, EngineDeadError, EngineStep, SamplingSpec

log = logging.getLogger(__name__)


@dataclass
class Liveness:
    """Requests in flight, and the last time the engine was seen computing tokens."""

    stall_s: float = field(default_factory=lambda: default("engine_stall_s"))
    in_flight: int = 0
    last_progress: float = field(default_factory=time.monotonic)
    _seen: float = -1.0

    def observe(self, progress: float) -> None:
        """Note the engine's progress counter; it moved, or nothing is owed: not stalled."""
        if progress != self._seen or self.in_flight == 0:
            self._seen, self.last_progress = progress, time.monotonic()

    def check(self) -> None:
        stalled = time.monotonic() - self.last_progress
        if self.in_flight and stalled > self.stall_s:
            raise EngineDeadError(f"the engine has made no progress (no step finished, next to "
                                  f"no CPU spent) for {stalled:.0f} s with {self.in_flight} "
                                  "request(s) in flight (hung)")


class MonitoredEngine:
    """An `Engine` that counts requests in flight and checks the engine's progress with them.

    Progress is the engine's own token counter, so a long non-streamed reply (which sends
    nothing until it is done) is not mistaken for a hang.
    """

    def __init__(self, engine: Engine, liveness: Liveness) -> None:
        self.inner, self.liveness = engine, liveness

    async def generate(self, prompt_token_ids: list[int], spec: SamplingSpec, request_id: str
                       ) -> AsyncIterator[EngineStep]:
        live = self.liveness
        if live.in_flight == 0:
            live.observe(self.inner.progress())  # idle until now: the clock starts here
        live.in_flight += 1
        try:
            async for step in self.inner.generate(prompt_token_ids, spec, request_id):
                yield step
        finally:
            live.in_flight -= 1

    async def abort(self, request_id: str) -> None:
        await self.inner.abort(request_id)

    async def check_health(self) -> None:
        await self.inner.check_health()
        self.liveness.observe(self.inner.progress())
        self.liveness.check()

    def progress(self) -> float:
        return self.inner.progress()


async def watchdog(engine: Engine, on_dead: Callable[[BaseException], None],
                   interval_s: float = 1.0) -> None:
    """Poll the engine's health until it dies (then call `on_dead` once) or we are cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await engine.check_health()
        except EngineDeadError as exc:
            on_dead(exc)
            return


@dataclass
class Drain:
    """Streams in progress, and the deadline after which their tasks are cancelled (each
    stream then ends with an error chunk)."""

    draining: bool = False
    expired: bool = False
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @contextlib.contextmanager
    def stream(self) -> Iterator[asyncio.Task[Any] | None]:
        """Register the running task as a stream the drain may end."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            yield task
        finally:
            if task is not None:
                self._tasks.discard(task)

    def start(self, timeout_s: float) -> asyncio.Task[None]:
        self.draining = True
        return asyncio.create_task(self._expire_after(timeout_s))

    async def _expire_after(self, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)
        self.expired = True
        if self._tasks:
            log.warning("shutdown deadline: ending %d stream(s) still open", len(self._tasks))
        for task in list(self._tasks):
            task.cancel(msg="moegi: shutdown deadline")


def reap_children(timeout: float = 3.0) -> None:
    """End the process tree's leftovers: SIGTERM, then SIGKILL after `timeout` seconds.

    multiprocessing's resource tracker ignores SIGTERM by design and exits when we do, so it is
    left alone (waiting for it cost 10 s per shutdown before).
    """
    import psutil

    children = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "resource_tracker" not in " ".join(child.cmdline()):
                children.append(child)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
