"""Transport policy: how a request holds its engine slot, watches its client and ends its stream.

A generation request takes an engine slot (`admission.py`) for as long as its response or
stream lasts; a client that leaves before a non-streamed answer aborts the engine request; a
stream that fails after its 200 ends with the route's error frame (an OpenAI error chunk and
`data: [DONE]`, or a Responses `error` event), through the same mapper as every other error;
the drain's deadline ends what is still open at shutdown. The routes (`app.py`) call
`generate` and nothing else of this.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve import metrics
from serve.engine import Engine, EngineDeadError
from serve.errors import APIError, error_type, to_api_error
from serve.model import ServedModel
from serve.sse import EventStream
from serve.state import AppState

_SHUTDOWN = APIError("the server is shutting down and ended this request at its deadline: "
                     "retry on another replica", 503, code="server_shutdown")


async def _guard(state: AppState, route: str, chunks: AsyncIterator[str],
                 error_frame: Callable[[BaseException], str]) -> AsyncIterator[str]:
    """Run a stream to its end, or end it with `error_frame`; give its engine slot back.

    A stream that is cancelled or closed before its end lost its client (the engine request
    is aborted by `run.Run`), unless the drain's deadline ended it.
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


Result = dict[str, Any] | EventStream


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
        handed_over = True
        return StreamingResponse(_guard(state, route, aiter(result), result.error_frame),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    finally:
        if not handed_over:
            state.admission.release(state.model_name)


async def generate(state: AppState, request: Request, req: Any,
                    serve: Callable[[Engine, ServedModel, Any], Awaitable[Result]]) -> Response:
    """A generation route: the serving call under an engine slot."""
    engine, model = state.ready()
    return await _respond(state, request, request.scope["path"], lambda: serve(engine, model, req))
