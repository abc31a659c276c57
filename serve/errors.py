"""One mapping from every failure to OpenAI's error envelope.

`{"error": {"message", "type", "param", "code"}}` with a 4xx status for the client's mistakes
(never FastAPI's 422 `{"detail": ...}`), 503 when the engine is dead or not ready, and 500 only
for a real server bug. Messages name the fix.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serve.engine import EngineDeadError

log = logging.getLogger(__name__)

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

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.param, self.code)


def error_type(status: int) -> str:
    """The OpenAI error `type` for an HTTP status."""
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(
    message: str, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(err: APIError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """pydantic's error list -> one readable sentence and the offending parameter."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx", {}) or {}
        return f"the request body is not valid JSON: {ctx.get('error', 'parse error')}", None
    if first.get("type") == "missing":
        return f"'{param}' is required", param
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"invalid value for '{param}': {msg}" if param else msg), param


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(exc)
        return error_response(APIError(msg, 400, param, "invalid_value"))

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return error_response(APIError(f"the request body is not valid JSON: {exc}", 400))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            detail = "no such route; see /docs for the API (routes live under /v1/)"
        return error_response(APIError(detail, exc.status_code), headers=exc.headers)

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        log.error("engine is dead: %s", exc)
        return error_response(APIError("the inference engine has died; the server is restarting",
                                       503, code="engine_dead"))

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(APIError(f"internal server error: {type(exc).__name__}", 500))
