"""moegi's own Prometheus metrics (`moegi_*`) beside vLLM's engine metrics (`vllm:*`).

Both live in prometheus_client's default registry and are served together at `GET /metrics`.
vLLM already measures the engine (queue, KV cache, inter-token latency, engine-side TTFT);
these measure what only the front end sees: HTTP routes and status codes, end-to-end latency
including templating and streaming, client disconnects, errors by OpenAI error type, which stop
ended each choice (the EOS truncation rules), and the template/preset in use.

`MetricsMiddleware` is a pure ASGI middleware so that a streamed response is timed to its last
byte, and `/metrics` and `/health` (scrapes and probes) are left out of the request metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram, Info

from serve.errors import ASGIApp, Message, Receive, Scope, Send, error_type
from serve.middleware import HEALTH

if TYPE_CHECKING:
    from serve.model import ServedModel


# Not counted: Prometheus' scrapes and orchestrators' probes would drown the API's own figures.
UNMETERED = frozenset({"/metrics", HEALTH})

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKENS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

REQUESTS = Counter("moegi_requests", "HTTP requests by route, model and status code",
                   ["route", "model", "status"])
REQUEST_DURATION = Histogram("moegi_request_duration_seconds",
                             "End-to-end request time, to the last byte of a stream",
                             ["route", "model"], buckets=_LATENCY)
TIME_TO_FIRST_TOKEN = Histogram("moegi_time_to_first_token_seconds",
                                "From the engine request to the first generated token (streamed "
                                "requests; a non-streamed reply arrives whole)",
                                ["model"], buckets=_LATENCY)
PROMPT_TOKENS = Counter("moegi_prompt_tokens", "Prompt tokens processed", ["model"])
GENERATION_TOKENS = Counter("moegi_generation_tokens", "Tokens generated", ["model"])
REQUEST_PROMPT_TOKENS = Histogram("moegi_request_prompt_tokens", "Prompt length per request",
                                  ["model"], buckets=_TOKENS)
REQUEST_GENERATION_TOKENS = Histogram("moegi_request_generation_tokens",
                                      "Generated tokens per request", ["model"], buckets=_TOKENS)
ACTIVE_STREAMS = Gauge("moegi_active_streams", "Server-sent event streams open now",
                       ["route", "model"])
DISCONNECTS = Counter("moegi_client_disconnects",
                      "Clients that went away before their answer was complete (work aborted)",
                      ["route", "model"])
ERRORS = Counter("moegi_errors", "Error responses (and errors sent inside a stream) by OpenAI "
                 "error type", ["route", "model", "type"])
FINISHED = Counter("moegi_choices_finished",
                   "Finished choices by finish_reason and the stop that fired (eos_token, "
                   "eos_text, turn_marker, stop_string, stop_token, sentence_trim, length)",
                   ["model", "finish_reason", "stop_type"])
MODEL_INFO = Info("moegi_model", "The served model, its prompt format and EOS rules")
REJECTED = Counter("moegi_rejected_requests", "Requests refused for overload: too_many_requests "
                   "(429, the line was full) or engine_saturated (503, waited too long)",
                   ["route", "model", "reason"])
RUNNING = Gauge("moegi_requests_running", "Requests holding an engine slot (admission control)",
                ["model"])
WAITING = Gauge("moegi_requests_waiting", "Requests waiting for an engine slot", ["model"])
REJECT_REASONS = ("too_many_requests", "engine_saturated")


def set_model_info(model: ServedModel, admitted_routes: Iterable[str]) -> None:
    """The model's info metric, and at 0 the series a dashboard reads for it, so its panels
    show 0 rather than "No data" (`admitted_routes`: the routes that take engine slots)."""
    for route in admitted_routes:
        for reason in REJECT_REASONS:
            REJECTED.labels(route, model.name, reason)
    RUNNING.labels(model.name).set(0)
    WAITING.labels(model.name).set(0)
    MODEL_INFO.info({"model": model.name, "template": model.template_name or "none",
                     "preset": model.preset or "none",
                     "eos_truncation": str(model.stops.eos_truncation).lower(),
                     "sentence_trim": str(model.sentence_trim).lower(),
                     "max_model_len": str(model.max_model_len)})


def observe_finish(model: str, finish_reason: str, stop_type: str | None) -> None:
    FINISHED.labels(model, finish_reason, stop_type or "none").inc()


def observe_usage(model: str, prompt_tokens: int, generation_tokens: int) -> None:
    PROMPT_TOKENS.labels(model).inc(prompt_tokens)
    GENERATION_TOKENS.labels(model).inc(generation_tokens)
    REQUEST_PROMPT_TOKENS.labels(model).observe(prompt_tokens)
    REQUEST_GENERATION_TOKENS.labels(model).observe(generation_tokens)


class MetricsMiddleware:
    """Counts, times and classifies every API request; `model()` names the served model, and
    `routes()` the app's route table (read from the app: label values stay bounded, as an
    unknown path is counted as "other")."""

    def __init__(self, app: ASGIApp, model: Callable[[], str],
                 routes: Callable[[], frozenset[str]]) -> None:
        self.app, self.model, self.routes = app, model, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNMETERED:
            await self.app(scope, receive, send)
            return
        path, model = scope["path"], self.model()
        route = path if path in self.routes() else "other"
        start = time.perf_counter()
        status = 500  # stays so if the app raises before answering (the error handler's 500)
        streaming = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, streaming
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = dict(message.get("headers") or [])
                streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
                if streaming:
                    ACTIVE_STREAMS.labels(route, model).inc()
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if streaming:
                ACTIVE_STREAMS.labels(route, model).dec()
            # Disconnects are counted in transport.py, where they are seen (499, a stream cut short).
            if 400 <= status != 499:
                ERRORS.labels(route, model, error_type(status)).inc()
            REQUESTS.labels(route, model, str(status)).inc()
            REQUEST_DURATION.labels(route, model).observe(time.perf_counter() - start)
