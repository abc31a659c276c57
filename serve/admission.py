"""Overload control: a bound on requests running in the engine and on requests waiting for it.

A request takes a slot before it reaches the engine and gives it back when its response (or
stream) is over. With every slot taken it waits in line; past `max_waiting` it is refused at
once with 429, and one that waited `max_wait_s` without a slot gets 503 (the engine is
saturated). Both carry `Retry-After` and the OpenAI envelope. `/health`, `/metrics` and
`/v1/models` never wait here, so probes stay fast under any load.
"""

from __future__ import annotations

import asyncio
import math

from serve import metrics
from serve.errors import APIError


class Admission:
    def __init__(self, max_running: int, max_waiting: int, max_wait_s: float) -> None:
        self.max_running, self.max_waiting, self.max_wait_s = max_running, max_waiting, max_wait_s
        self._slots = asyncio.Semaphore(max_running)
        self.running = 0
        self.waiting = 0

    def _refuse(self, status: int, message: str, code: str, route: str, model: str) -> APIError:
        metrics.REJECTED.labels(route, model, code).inc()
        retry = str(max(1, math.ceil(self.max_wait_s / 10)))
        return APIError(message, status, code=code, headers={"Retry-After": retry})

    async def acquire(self, route: str, model: str) -> None:
        """Take a slot (waiting in line if need be) or raise the 429/503 APIError."""
        if self._slots.locked():
            if self.waiting >= self.max_waiting:
                raise self._refuse(
                    429, f"the server is at capacity ({self.running} requests running, "
                    f"{self.waiting} waiting): retry after the Retry-After delay",
                    "too_many_requests", route, model)
            self.waiting += 1
            metrics.WAITING.labels(model).set(self.waiting)
            try:
                await asyncio.wait_for(self._slots.acquire(), self.max_wait_s)
            except TimeoutError:
                raise self._refuse(
                    503, f"no engine slot came free within {self.max_wait_s:g} s (the engine is "
                    "saturated): retry after the Retry-After delay", "engine_saturated",
                    route, model) from None
            finally:
                self.waiting -= 1
                metrics.WAITING.labels(model).set(self.waiting)
        else:
            await self._slots.acquire()
        self.running += 1
        metrics.RUNNING.labels(model).set(self.running)

    def release(self, model: str) -> None:
        self.running -= 1
        metrics.RUNNING.labels(model).set(self.running)
        self._slots.release()
