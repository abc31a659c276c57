"""`moegi-serve` / `python -m serve`: check the settings, bind the port, load the engine, serve.

Everything that can be checked is checked before the model loads (a bad template, preset,
path or engine option fails in a second, not after minutes of loading). The port is bound
first and the engine loads behind it, so `/health` answers 503 while the model loads (what
orchestrators and Compose healthchecks expect). A failed load or a dead engine ends the
process with exit code 1; SIGTERM drains (lifecycle.py) and ends it with 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from serve import metrics
from serve.admission import Admission
from serve.app import AppState, create_app
from serve.config import Settings, check_before_load, parse
from serve.lifecycle import Drain, Liveness, reap_children, watchdog
from serve.model import ServedModel

log = logging.getLogger("moegi")

DEFAULT_MODEL = "tiny-chat"  # the embedded model built by tiny (see README)


def served_name(settings: Settings) -> str:
    return settings.served_model_name or Path(settings.model.rstrip("/")).name


def load_model(settings: Settings, max_model_len: int) -> ServedModel:
    """Tokenizer, template, preset and stop policy for the model being served."""
    from transformers import AutoTokenizer

    from serve.presets import resolve

    tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer or settings.model,
                                              trust_remote_code=settings.trust_remote_code)
    return resolve(settings, tokenizer, served_name(settings), max_model_len)


async def _serve(settings: Settings) -> int:
    import uvicorn

    from serve.vllm_engine import VllmEngine

    loaded: list[VllmEngine] = []
    watchers: list[asyncio.Task[None]] = []
    drain = Drain()

    class Server(uvicorn.Server):
        """Drains on SIGTERM, then ends the engine inside uvicorn's shutdown, and exits with
        our own code: uvicorn would re-raise the signal it caught once `serve()` returns."""

        async def shutdown(self, sockets: Any = None) -> None:
            expiry = drain.start(settings.shutdown_timeout_s)
            try:
                await super().shutdown(sockets)
            finally:
                expiry.cancel()
                for task in watchers:  # the engine is about to stop on purpose
                    task.cancel()
                # Its processes first, all at once (vLLM's own shutdown ends them one after the
                # other, with waits: 7 s for an idle engine), then vLLM's handles.
                await asyncio.to_thread(reap_children)
                for engine in loaded:
                    await asyncio.to_thread(engine.shutdown)
                self._captured_signals.clear()  # exit with our code, not the signal's

    state = AppState(api_key=settings.key(), max_request_bytes=settings.max_request_bytes,
                     admission=Admission(settings.max_running_requests,
                                         settings.max_waiting_requests, settings.max_wait_s),
                     liveness=Liveness(settings.engine_stall_s), drain=drain)
    app = create_app(state)
    # Past the drain's deadline uvicorn closes what is left (a client that stopped reading).
    server = Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                   log_level=settings.log_level, access_log=False,
                                   timeout_graceful_shutdown=int(settings.shutdown_timeout_s) + 3))
    state.on_dead = lambda: setattr(server, "should_exit", True)
    serving = asyncio.create_task(server.serve())
    try:
        # vLLM labels its metrics with this name, so dashboards filter both families alike.
        engine = await asyncio.to_thread(VllmEngine, settings.vllm_args(), served_name(settings))
        loaded.append(engine)
        state.model = load_model(settings, engine.max_model_len)
        metrics.set_model_info(state.model, state.generation_routes)
        state.set_engine(engine)
        assert state.engine is not None
        watchers.append(asyncio.create_task(watchdog(state.engine, state.mark_dead)))
        log.info("serving %s as %r on http://%s:%d (template: %s)", settings.model,
                 state.model.name, settings.host, settings.port, state.model.template_name)
    except Exception:
        log.exception("could not start the engine")
        state.dead = True
        server.should_exit = True
    await serving
    for task in watchers:
        task.cancel()
    return 1 if state.dead else 0


def main(argv: list[str] | None = None) -> None:
    # vLLM's CPU backend otherwise sizes its KV cache from --gpu-memory-utilization (90% of RAM,
    # which a shared host rarely has free); 1 GiB holds the embedded model's every context.
    # Set VLLM_CPU_KVCACHE_SPACE (GiB) or `--engine-args kv_cache_memory_bytes=N` yourself for a
    # real model on a CPU host. vLLM lets the variable override the argument, so it is set only
    # where the argument is not given.
    settings = parse(argv)
    if "kv_cache_memory_bytes" not in settings.engine_args:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.model:
        from tiny.build import ensure_model

        settings.model = str(ensure_model(DEFAULT_MODEL))
        settings.served_model_name = settings.served_model_name or DEFAULT_MODEL
    try:
        check_before_load(settings)
        from serve import vllm_engine

        vllm_engine.prepare(settings)
    except ValueError as exc:
        raise SystemExit(f"moegi-serve: {exc}") from None
    sys.exit(_run(_serve(settings)))


def _run(main_coroutine: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where it is installed (vLLM brings it): its socket writes are C, and a
    stream's writes are most of the front end's CPU time; else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main_coroutine)
    return uvloop.run(main_coroutine)
