"""The server's shared state (`AppState`): the engine and the served model once they are ready,
admission, liveness, drain, and what happens when the engine dies.

The server answers `/health` with 503 while the model loads, tests pass a fake engine, and a
dead engine shuts the server down (exit code 1, for the orchestrator). Its defaults are the
Settings' (serve/config.py), the one place defaults live.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from serve.admission import Admission
from serve.config import default
from serve.engine import Engine
from serve.errors import APIError
from serve.lifecycle import Drain, Liveness, MonitoredEngine
from serve.model import ServedModel

log = logging.getLogger("serve.app")


def _admission() -> Admission:
    return Admission(default("max_running_requests"), default("max_waiting_requests"),
                     default("max_wait_s"))


@dataclass
class AppState:
    engine: Engine | None = None
    model: ServedModel | None = None
    api_key: str | None = None
    max_request_bytes: int = field(default_factory=lambda: default("max_request_bytes"))
    admission: Admission = field(default_factory=_admission)
    liveness: Liveness = field(default_factory=Liveness)
    drain: Drain = field(default_factory=Drain)
    dead: bool = False
    on_dead: Callable[[], None] = field(default=lambda: None)
    # Read from the app's route table by create_app: what metrics count, what takes a slot.
    metered_routes: frozenset[str] = frozenset()
    generation_routes: tuple[str, ...] = ()

    def set_engine(self, engine: Engine) -> None:
        """The engine, wrapped so that /health can tell a hung engine from an idle one."""
        self.engine = MonitoredEngine(engine, self.liveness)

    def ready(self) -> tuple[Engine, ServedModel]:
        if self.dead:
            raise APIError("the inference engine has died; the server is restarting", 503,
                           code="engine_dead")
        if self.drain.draining:
            raise APIError("the server is shutting down: retry on another replica", 503,
                           code="server_shutdown", headers={"Retry-After": "1"})
        if self.engine is None or self.model is None:
            raise APIError("the model is still loading; retry when GET /health answers 200",
                           503, code="model_loading")
        return self.engine, self.model

    @property
    def model_name(self) -> str:
        """The served model's name, for metric labels ("none" while loading)."""
        return self.model.name if self.model else "none"

    def mark_dead(self, exc: BaseException) -> None:
        if not self.dead:
            log.error("inference engine died: %s; shutting down", exc)
            self.dead = True
            self.on_dead()
