"""The read routes' successful answers without FastAPI's per-request layers.

A channel-access check or a refund-eligibility quote costs less CPU in our code and the
database than in the framework around it: error and telemetry middlewares, CORS, routing
through every route, solving the dependencies, validating the response (bench/README.md). A
`FastReads` sits in front of all that (`BillingApp.__call__`) for a few documented GET routes
whose only inputs are path parameters, the request and one route guard (app/auth.py `Guard`),
and answers a request itself only when everything is in order, with exactly what FastAPI
would send; anything else goes to FastAPI, untouched, which answers it as always:

- it is not a plain GET of one of these paths (another method, a body, an `Origin` header,
  so CORS, a path that does not match the route's own pattern, a mounted root path); no
  route registered before them may match their paths (the tests compare the answers);
- a path parameter fails the route's own validation (each parameter's field, as FastAPI's
  `request_params_to_args` validates it);
- the guard refuses the token (the guard object of the route, the same rule FastAPI runs);
- the route's endpoint raises (the database is down: FastAPI runs it again and answers 503).

What it answers is the route's own endpoint function's result, validated and serialised
with the route's response model as FastAPI does, with the headers FastAPI's stack adds
(`content-length`, `content-type`, `vary: Origin` from CORS, `x-request-id`); the request id
is bound to the logs and the request counted in the route's metrics, as
`RequestContextMiddleware` does. tests/reads/test_fast_reads.py proves the answers are the
same byte for byte, errors included.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable
from typing import Any

import structlog
from fastapi import APIRouter, FastAPI
from fastapi.datastructures import DefaultPlaceholder
from fastapi.routing import APIRoute
from pydantic import TypeAdapter
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from app.auth import Guard
from app.observability import new_request_id, route_metrics


class FastRead:
    """One GET route answered directly when everything is in order (see the module doc)."""

    def __init__(self, route: APIRoute) -> None:
        dependant = route.dependant
        guard = only_guard(route)
        if (
            route.methods != {"GET"}
            or guard is None
            or dependant.query_params
            or dependant.header_params
            or dependant.cookie_params
            or dependant.body_params
            or route.response_model is None
            or route.status_code not in (None, 200)
            or not isinstance(route.response_class, DefaultPlaceholder)  # JSON, as below
            or not route.response_model_by_alias
            or route.response_model_include is not None
            or route.response_model_exclude is not None
            or route.response_model_exclude_unset
            or route.response_model_exclude_defaults
            or route.response_model_exclude_none
        ):
            raise ValueError(f"{route.path} is not a plain guarded GET of path parameters")
        self.route = route
        self.path_regex = route.path_regex
        self.guard, self.guard_param = guard
        self.request_param = dependant.request_param_name
        self.path_params = dependant.path_params
        self.response = TypeAdapter(route.response_model)

    def valid_path_params(self, raw_params: dict[str, str]) -> dict[str, Any] | None:
        """The path parameters, each validated by its own field (`ModelField.validate`, what
        FastAPI's `request_params_to_args` runs for a path parameter, without its handling of
        query, header and model parameters), or None when one fails."""
        values: dict[str, Any] = {}
        for field in self.path_params:
            value, errors = field.validate(
                raw_params[field.alias], values, loc=("path", field.alias)
            )
            if errors:
                return None
            values[field.name] = value
        return values

    async def answer(self, request: Request, raw_params: dict[str, str]) -> bytes | None:
        """The response body, or None when FastAPI should answer."""
        values = self.valid_path_params(raw_params)
        if values is None:
            return None
        try:
            values[self.guard_param] = self.guard.check(request, raw_params)
            if self.request_param is not None:
                values[self.request_param] = request
            result = await self.route.endpoint(**values)
            return self.response.dump_json(self.response.validate_python(result), by_alias=True)
        except Exception:  # a refused token, the database: FastAPI answers those
            return None


class FastReads:
    """The `FastRead`s of an app, tried in order for GET requests."""

    def __init__(self, app: FastAPI, routes: Iterable[APIRoute]) -> None:
        self.app = app
        self.reads = [FastRead(route) for route in routes]

    def match(self, scope: Scope) -> tuple[FastRead, dict[str, str]] | None:
        """The route and its raw path parameters, when this request is one to try."""
        if scope["method"] != "GET" or scope.get("root_path"):
            return None
        path = scope["path"]
        for read in self.reads:
            found = read.path_regex.match(path)
            if found is not None:
                for name, _ in scope["headers"]:
                    if name in (b"origin", b"content-length", b"transfer-encoding"):
                        return None
                return read, found.groupdict()
        return None

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, found: tuple[FastRead, dict[str, str]]
    ) -> bool:
        """Answer the request; False (nothing sent) when FastAPI should."""
        read, raw_params = found
        started = time.perf_counter()
        request_id = bind_request_id(scope)
        scope["app"] = self.app
        body = await read.answer(Request(scope, receive), raw_params)
        if body is None:
            return False
        headers: list[tuple[bytes, bytes]] = [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/json"),
            (b"vary", b"Origin"),
            (b"x-request-id", request_id.encode()),
        ]
        status = 500  # what RequestContextMiddleware counts when the answer could not start
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            status = 200
            await send({"type": "http.response.body", "body": body})
        finally:
            count_request("GET", read.route.path, status, started)
        return True


def only_guard(route: APIRoute) -> tuple[Guard, str] | None:
    """The route's guard and its parameter's name, when the route has a coroutine endpoint
    and no dependency but that guard."""
    dependencies = route.dependant.dependencies
    if not inspect.iscoroutinefunction(route.endpoint) or len(dependencies) != 1:
        return None
    guard, name = dependencies[0].call, dependencies[0].name
    return (guard, name) if isinstance(guard, Guard) and name is not None else None


def bind_request_id(scope: Scope) -> str:
    """The request's id (its last `X-Request-ID`, as `RequestContextMiddleware` reads it, or a
    new one), bound to the logs."""
    request_id = b""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            request_id = value
    text = request_id.decode("latin-1")[:64] or new_request_id()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=text)
    return text


def count_request(method: str, route_path: str, status: int, started: float) -> None:
    """The request in its route's metrics, as `RequestContextMiddleware` counts it."""
    requests, latency = route_metrics(method, route_path, status)
    requests.inc()
    latency.observe(time.perf_counter() - started)


def fast_reads_for(
    app: FastAPI, routers: Iterable[APIRouter], endpoints: Iterable[Any]
) -> FastReads:
    """`FastReads` for the routes of these endpoint functions (in these routers, included in
    the app without a prefix)."""
    wanted = list(endpoints)
    routes = [
        route
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute) and route.endpoint in wanted
    ]
    if len(routes) != len(wanted):
        raise ValueError("every endpoint needs exactly one route")
    return FastReads(app, routes)
