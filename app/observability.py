"""Structured logging, request ids and Prometheus metrics (pure ASGI middleware)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import structlog
from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from structlog.tracebacks import ExceptionDictTransformer

from app.errors import problem_response

HTTP_REQUESTS = Counter(
    "billing_http_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "billing_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

MAX_BODY_BYTES = 1024 * 1024

_route_metrics: dict[tuple[str, str, int], tuple[Any, Any]] = {}


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods counted under their own name; any other (a client may send any token) is `other`:
each label value is a series kept for the life of the process."""


def route_metrics(method: str, route: str, status: int) -> tuple[Any, Any]:
    """The request counter and latency histogram children of one method, route and status,
    looked up once (`labels()` takes a lock and builds its key on every call)."""
    if method not in HTTP_METHODS:
        method = "other"
    key = (method, route, status)
    children = _route_metrics.get(key)
    if children is None:
        children = (
            HTTP_REQUESTS.labels(method, route, str(status)),
            HTTP_LATENCY.labels(method, route),
        )
        _route_metrics[key] = children
    return children


def new_request_id() -> str:
    """32 random hex digits (what `uuid4().hex` gave, without building a UUID)."""
    return os.urandom(16).hex()


class ClientDisconnected(Exception):
    """The client went away before its request body was read."""


async def read_body(declared: bytes | None, receive: Receive, max_bytes: int) -> bytes | None:
    """A request's whole body from the ASGI `receive`; None when it is over `max_bytes` (by
    its `content-length`, or as it arrives). One message, the usual case, is not copied."""
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                return None
        except ValueError:
            return None
    message = await receive()
    if message["type"] != "http.request":
        raise ClientDisconnected
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body if len(body) <= max_bytes else None
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


QUIET_LIBRARY_LOGGERS = ("aiohttp", "stripe")
"""Loggers that would write one unstructured INFO line per Stripe call (URL included): our own
`stripe.*` events say what matters, as JSON."""


def configure_logging(level: str) -> None:
    logging.basicConfig(format="%(message)s", level=level.upper())
    for name in QUIET_LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # no frame locals in tracebacks: they hold headers, tokens and request bodies
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )


class RequestContextMiddleware:
    """Binds a request id to the logs, limits the body to 1 MiB (413) and records metrics."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or new_request_id()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        status_holder: dict[str, Any] = {"status": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            body_receive = await self._bounded_receive(headers, receive)
            if body_receive is None:
                response = problem_response(
                    413,
                    "payload_too_large",
                    "Request body too large",
                    f"Request bodies are limited to {self.max_body_bytes} bytes",
                )
                await response(scope, receive, send_wrapper)
            else:
                await self.app(scope, body_receive, send_wrapper)
        finally:
            route = scope.get("route")
            route_name = getattr(route, "path", None) or "unmatched"
            requests, latency = route_metrics(
                scope.get("method", ""), route_name, status_holder["status"]
            )
            requests.inc()
            latency.observe(time.perf_counter() - started)

    async def _bounded_receive(
        self, headers: dict[bytes, bytes], receive: Receive
    ) -> Receive | None:
        """Read the whole body up front (at most the limit); None when it is too large. A
        request that declares no body (neither `content-length` nor `transfer-encoding`, as
        HTTP/1.1 requires of one that has a body) is passed on untouched."""
        if b"content-length" not in headers and b"transfer-encoding" not in headers:
            return receive
        try:
            body = await read_body(headers.get(b"content-length"), receive, self.max_body_bytes)
        except ClientDisconnected:
            return receive  # the app sees the disconnect on its next receive()
        if body is None:
            return None
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay
