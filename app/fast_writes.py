"""Checkout creation without FastAPI's per-request layers (as app/fast_reads.py does for reads).

Creating a Checkout session costs about as much CPU in the framework around the endpoint
(middlewares, routing through every route, the request-handler machinery, solving the
dependencies) as in the endpoint's own work (bench/README.md). A `FastPost` answers a
documented guarded POST whose inputs are path parameters, headers, one JSON body and one
route guard (app/auth.py `Guard`), and whose endpoint returns a `Response` itself.

Up to the endpoint call nothing has happened, so anything out of the ordinary is left to
FastAPI, which reads the same body (replayed) and answers as always:

- not a POST of the route's path (its own pattern), an `Origin` header (CORS), a mounted root
  path, FastAPI's own telemetry on (app/main.py);
- a body that is not `application/json` with a `Content-Length` within the 1 MiB limit, a
  client that goes away while sending it, JSON that does not parse;
- a path parameter, header or body that fails the route's own validation (FastAPI's
  `request_params_to_args` and `request_body_to_args`, the functions it validates with);
- a token the route's guard refuses.

Once the endpoint runs, the request is answered here, whatever happens: its answer, or the
answer the app's exception handler for what it raised gives (the handlers FastAPI would call:
domain errors as problem+json, the database's as 503 or 422, anything else 500). Running the
endpoint a second time through FastAPI could repeat what it did. The response gets the headers
FastAPI's stack adds (`vary: Origin` from CORS, `x-request-id`), the request id is bound to the
logs and the request counted in the route's metrics, as `RequestContextMiddleware` does.
tests/checkout/test_fast_checkout.py proves the answers are FastAPI's.
"""

from __future__ import annotations

import inspect
import json
import time
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.utils import request_body_to_args, request_params_to_args
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from app.fast_reads import bind_request_id, count_request, only_guard
from app.observability import MAX_BODY_BYTES


class FastPost:
    """One guarded POST route answered directly (see the module doc)."""

    def __init__(self, app: FastAPI, route: APIRoute) -> None:
        dependant = route.dependant
        guard = only_guard(route)
        returns = inspect.signature(route.endpoint).return_annotation
        if (
            route.methods != {"POST"}
            or guard is None
            or len(dependant.body_params) != 1
            or dependant.query_params
            or dependant.cookie_params
            or returns not in (Response, "Response")  # the endpoint renders its own answer
        ):
            raise ValueError(f"{route.path} is not a plain guarded POST of one JSON body")
        self.app = app
        self.route = route
        self.path_regex = route.path_regex
        self.guard, self.guard_param = guard
        self.request_param = dependant.request_param_name
        self.path_params = dependant.path_params
        self.header_params = dependant.header_params
        self.body_params = dependant.body_params
        self.embed_body = route._embed_body_fields

    def match(self, scope: Scope) -> dict[str, str] | None:
        """The raw path parameters when this request is one to try."""
        if scope["method"] != "POST" or scope.get("root_path"):
            return None
        found = self.path_regex.match(scope["path"])
        if found is None:
            return None
        length = content_type = None
        for name, value in scope["headers"]:
            if name in (b"origin", b"transfer-encoding"):
                return None
            if name == b"content-length":
                length = value
            elif name == b"content-type":
                content_type = value.split(b";")[0].strip().lower()
        if (
            content_type != b"application/json"
            or length is None
            or not length.isdigit()
            or int(length) > MAX_BODY_BYTES
        ):
            return None
        return found.groupdict()

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, raw_params: dict[str, str]
    ) -> Receive | None:
        """Answer the request and return None; or, having answered nothing, the `receive`
        FastAPI should read the request from (the body read here, then the client's)."""
        started = time.perf_counter()
        request_id = bind_request_id(scope)
        body, more = await _read_body(receive)
        replay = _replaying(body, receive)
        if more:
            return replay
        scope["app"] = self.app
        request = Request(scope, replay)
        values = await self._arguments(request, raw_params, body)
        if values is None:
            return replay
        unexpected: Exception | None = None
        try:
            response: Response = await self.route.endpoint(**values)
        except Exception as exc:
            response, unexpected = await _handled(self.app, request, exc)
        status = 500  # what RequestContextMiddleware counts when the answer could not start

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message["headers"],
                    (b"vary", b"Origin"),
                    (b"x-request-id", request_id.encode()),
                ]
                status = message["status"]
            await send(message)

        try:
            await response(scope, replay, send_with_headers)
        finally:
            count_request("POST", self.route.path, status, started)
        if unexpected is not None:
            raise unexpected  # answered; raised on to the server, as ServerErrorMiddleware does
        return None

    async def _arguments(
        self, request: Request, raw_params: dict[str, str], body: bytes
    ) -> dict[str, Any] | None:
        """The endpoint's arguments, validated as FastAPI validates them; None when FastAPI
        should answer (invalid input, a refused token)."""
        try:
            received = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
            return None
        values, errors = request_params_to_args(self.path_params, raw_params)
        headers, header_errors = request_params_to_args(self.header_params, request.headers)
        content, body_errors = await request_body_to_args(
            self.body_params, received, self.embed_body
        )
        if errors or header_errors or body_errors:
            return None
        try:
            values[self.guard_param] = self.guard.check(request, raw_params)
        except Exception:  # Unauthorized, Forbidden: FastAPI answers those
            return None
        if self.request_param is not None:
            values[self.request_param] = request
        return {**values, **headers, **content}


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The request body, and whether the client left before sending all of it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the body already read, then whatever the client sends next."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


async def _handled(
    app: FastAPI, request: Request, exc: Exception
) -> tuple[Response, Exception | None]:
    """The app's answer to `exc`, from the handler Starlette would pick: `ExceptionMiddleware`
    by status for an `HTTPException`, else by the nearest class in the exception's MRO; for an
    exception only the `Exception` handler takes, `ServerErrorMiddleware`'s, which also raises
    it on after answering (returned second)."""
    handlers = app.exception_handlers
    handler = handlers.get(exc.status_code) if isinstance(exc, HTTPException) else None
    for cls in type(exc).__mro__:
        if handler is None and cls is not Exception and cls in handlers:
            handler = handlers[cls]
    unexpected = None
    if handler is None:
        handler, unexpected = handlers[Exception], exc
    response = handler(request, exc)  # the app's handlers are coroutines (app/errors.py)
    if inspect.isawaitable(response):
        response = await response
    assert isinstance(response, Response)
    return response, unexpected
