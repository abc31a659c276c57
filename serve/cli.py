"""`moegi-serve` / `python -m serve`: parse flags, bind the HTTP port, load the engine, serve.

The port is bound first and the engine loads behind it, so `/health` answers 503 while the
model loads (what orchestrators and Compose healthchecks expect). A failed load or a dead
engine ends the process with exit code 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

from serve import metrics
from serve.app import AppState, create_app
from serve.config import EngineConfig, ServerConfig, parse
from serve.serving import ServedModel

log = logging.getLogger("moegi")

DEFAULT_MODEL = "tiny-chat"  # the embedded model built by serve/tiny (see README)


def served_name(server: ServerConfig, engine: EngineConfig) -> str:
    return server.served_model_name or Path(engine.model.rstrip("/")).name


def load_model(server: ServerConfig, engine: EngineConfig, max_model_len: int) -> ServedModel:
    """Tokenizer, template, preset and stop policy for the model being served."""
    from transformers import AutoTokenizer

    from serve.presets import resolve

    tokenizer = AutoTokenizer.from_pretrained(engine.tokenizer or engine.model,
                                              trust_remote_code=engine.trust_remote_code)
    return resolve(server, engine, tokenizer, served_name(server, engine), max_model_len)


async def _serve(server_cfg: ServerConfig, engine_cfg: EngineConfig) -> int:
    import uvicorn

    from serve.vllm_engine import VllmEngine

    class Server(uvicorn.Server):
        """Ends the engine inside uvicorn's shutdown: once `serve()` returns, uvicorn re-raises
        the SIGTERM/SIGINT it caught, and the process would die before code after it ran."""

        async def shutdown(self, sockets: Any = None) -> None:
            await super().shutdown(sockets)
            for engine in loaded:
                await asyncio.to_thread(engine.shutdown)
            await asyncio.to_thread(_reap_children)

    loaded: list[VllmEngine] = []
    state = AppState(api_key=server_cfg.api_key)
    app = create_app(state)
    server = Server(uvicorn.Config(app, host=server_cfg.host, port=server_cfg.port,
                                   log_level=server_cfg.log_level, access_log=False))
    state.on_dead = lambda: setattr(server, "should_exit", True)
    serving = asyncio.create_task(server.serve())
    try:
        # vLLM labels its metrics with this name, so dashboards filter both families alike.
        engine = await asyncio.to_thread(VllmEngine, engine_cfg, served_name(server_cfg, engine_cfg))
        loaded.append(engine)
        state.model = load_model(server_cfg, engine_cfg, engine.max_model_len)
        metrics.set_model_info(state.model)
        state.engine = engine
        log.info("serving %s as %r on http://%s:%d (template: %s)", engine_cfg.model,
                 state.model.name, server_cfg.host, server_cfg.port, state.model.template_name)
    except Exception:
        log.exception("could not start the engine")
        state.dead = True
        server.should_exit = True
    await serving
    return 1 if state.dead else 0


def _reap_children(timeout: float = 10.0) -> None:
    """End whatever the engine's own shutdown left running (its engine core and workers).

    vLLM's shutdown ends them when the engine is up; an engine still loading when SIGTERM
    arrives (docker stop, a Kubernetes rollout) has no handle to shut down yet, and its
    `VLLM::Worker` would outlive the server holding the model's memory.
    """
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def main(argv: list[str] | None = None) -> None:
    server_cfg, engine_cfg = parse(argv)
    logging.basicConfig(level=server_cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not engine_cfg.model:
        from serve.tiny.build import ensure_model

        engine_cfg.model = str(ensure_model(DEFAULT_MODEL))
        server_cfg.served_model_name = server_cfg.served_model_name or DEFAULT_MODEL
    sys.exit(asyncio.run(_serve(server_cfg, engine_cfg)))
