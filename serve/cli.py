"""`moegi-serve` / `python -m serve`: check the settings, bind the port, load the engine, serve.

Everything that can be checked is checked before the model loads (a bad template, preset,
path or engine option fails in a second, not after minutes of loading). The port is bound
first and the engine loads behind it, so `/health` answers 503 while the model loads (what
orchestrators and Compose healthchecks expect). A failed load or a dead engine ends the
process with exit code 1; SIGTERM drains (lifecycle.py) and ends it with 0.
"""

from __future__ import annotations

import asyncio
import json
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
    # Set VLLM_CPU_KVCACHE_SPACE (GiB) yourself for a real model on a CPU host.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    settings = parse(argv)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.model:
        from tiny.build import ensure_model

        settings.model = str(ensure_model(DEFAULT_MODEL))
        settings.served_model_name = settings.served_model_name or DEFAULT_MODEL
    try:
        check_before_load(settings)
        _check_platform(settings)
        _cpu_dtype(settings)
    except ValueError as exc:
        raise SystemExit(f"moegi-serve: {exc}") from None
    sys.exit(_run(_serve(settings)))


def _check_platform(settings: Settings) -> None:
    """What vLLM's platform decides about a split, settled before vLLM starts: Ray needs a
    platform that supports it, and several CPU ranks need their own cores (serve/parallel.py)."""
    if settings.distributed_executor_backend != "ray" and (
            settings.tensor_parallel_size, settings.pipeline_parallel_size) == (1, 1):
        return
    from vllm.platforms import current_platform

    from serve.parallel import THREADS_BIND, bind_cpu_threads

    if settings.distributed_executor_backend == "ray" and not current_platform.ray_device_key:
        # vLLM raises this only once its engine core has started and joined the Ray cluster.
        raise ValueError(f"--distributed-executor-backend ray: vLLM's {current_platform.device_name} "
                         "platform does not run on Ray (vLLM raises 'does not support ray'); use "
                         "--distributed-executor-backend mp on one machine, or Ray on GPU hosts")
    if current_platform.is_cpu() and settings.pipeline_parallel_size > 1 and settings.enforce_eager:
        # vllm/v1/worker/cpu_model_runner.py: `warming_up_model` returns early in eager mode, and
        # it is what allocates a later stage's intermediate-tensor buffer: the first request then
        # kills the engine (AssertionError in sync_and_gather_intermediate_tensors).
        raise ValueError("--pipeline-parallel-size with --enforce-eager: vLLM's CPU workers "
                         "(0.32) set up the later stages' buffers only when they compile, and the "
                         "first request would kill the engine; leave --enforce-eager out")
    if current_platform.is_cpu() and (bound := bind_cpu_threads(
            settings.tensor_parallel_size, settings.pipeline_parallel_size)):
        log.info("CPU ranks bound to cores %s (%s; set it yourself to choose)", bound,
                 THREADS_BIND)


def _cpu_dtype(settings: Settings) -> None:
    """On a CPU, `--dtype auto` serves a float16 checkpoint (every AutoAWQ one) in bfloat16.

    vLLM would keep float16, which x86 CPUs compute slowly: its CPU AWQ kernel then takes its
    generic path instead of AMX, and moegi's int4 kernels are vectorized for bfloat16 only.
    Measured by `make bench-moe` (4x7B layer shape, 4-bit against bf16): decode at batch 1 went
    from 1.31x to 2.58x and prefill of 2,048 tokens from 0.24x to 0.63x on vLLM's AMX path, and
    from 1.09x to 1.95x and 0.25x to 0.87x on moegi's plugin. `--dtype float16` keeps float16."""
    config = Path(settings.model or "") / "config.json"
    if settings.dtype != "auto" or not config.is_file():
        return
    cfg = json.loads(config.read_text())
    if (cfg.get("torch_dtype") or cfg.get("dtype")) != "float16":
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        settings.dtype = "bfloat16"
        log.info("float16 checkpoint served in bfloat16 on this CPU (--dtype float16 to keep it)")


def _run(main_coroutine: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where it is installed (vLLM brings it): its socket writes are C, and a
    stream's writes are most of the front end's CPU time; else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main_coroutine)
    return uvloop.run(main_coroutine)
