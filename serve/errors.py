"""One mapping from every failure to OpenAI's error envelope, for responses and streams alike.

`{"error": {"message", "type", "param", "code"}}` with a 4xx status for the client's mistakes
(never FastAPI's 422 `{"detail": ...}`), 429/503 with Retry-After for overload, 503 when the
engine is dead or not ready, and 500 only for a real server bug. Messages name the fix.
`to_api_error` is the mapper; the exception handlers, the ASGI error boundary (`ErrorBoundary`,
which answers a 500 itself so the connection stays usable) and the stream guard all use it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from serve.engine import EngineDeadError, EngineInputError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error with an HTTP status that goes to the client in the OpenAI envelope."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.param, self.code)


def error_type(status: int) -> str:
    """The OpenAI error `type` for an HTTP status."""
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, status: int, param: str | None = None, code: str | None = None
               ) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def _validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """pydantic's error list -> one readable sentence and the offending parameter."""
    if not errors:
        return "invalid request body", None
    # A union (str | list[str]) reports one error per member; our own checks say more.
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Union members and tagged alternatives add their type names to the location.
    loc = [p for p in loc if not (p[:1].isupper() or "[" in p or p in ("str", "int", "list"))]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx", {}) or {}
        return f"the request body is not valid JSON: {ctx.get('error', 'parse error')}", None
    if first.get("type") == "missing":
        return f"'{param}' is required", param
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"invalid value for '{param}': {msg}" if param else msg), param


def to_api_error(exc: BaseException) -> APIError:
    """The one mapper: any exception -> the APIError the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (RequestValidationError, ValidationError)):
        msg, param = _validation_message(list(exc.errors()))
        return APIError(msg, 400, param, "invalid_value")
    if isinstance(exc, EngineInputError):
        return APIError(f"the engine refused the request: {exc}", 400, exc.param, "invalid_value")
    if isinstance(exc, EngineDeadError):
        return APIError("the inference engine has died; the server is restarting", 503,
                        code="engine_dead")
    if isinstance(exc, HTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            detail = "no such route; see /docs for the API (routes live under /v1/)"
        return APIError(detail, exc.status_code, headers=exc.headers)
    log.error("unhandled error", exc_info=exc)
    return APIError(f"internal server error: {type(exc).__name__}", 500)


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)


def sse_error(exc: BaseException) -> str:
    """An error inside a stream that already answered 200: one `data:` chunk (then [DONE])."""
    return f"data: {json.dumps(to_api_error(exc).body(), ensure_ascii=False)}\n\n"


class ErrorBoundary:
    """Pure ASGI: an exception that escapes the app becomes an envelope 500 here.

    Starlette's own catch-all answers and then re-raises, and uvicorn closes the connection
    without `Connection: close`, so a pooled client's next request fails (ECONNRESET).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if started:  # a stream's own guard ends it; nothing more can be said here
                log.error("error after the response started", exc_info=exc)
                return
            await error_response(to_api_error(exc))(scope, receive, send)


def install_handlers(app: FastAPI) -> None:
    async def handle(_: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))

    for kind in (APIError, RequestValidationError, ValidationError, HTTPException,
                 EngineDeadError, EngineInputError):
        app.add_exception_handler(kind, handle)
