"""A real HTTP server speaking Stripe's REST API for the official SDK.

    fake = StripeFake().start()          # or: with StripeFake() as fake:
    client = stripe.StripeClient("sk_test_x", base_addresses={"api": fake.url},
                                 http_client=stripe.HTTPXClient())
    ...
    fake.stop()

No pytest in here: the local simulator can reuse it as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import json
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from .api import StripeSimulator
from .openapi import Json, ParamError, decode_form, match_route, path_exists, validate_params
from .state import API_VERSION, RequestContext, StripeError

logger = logging.getLogger(__name__)


def sign(payload: bytes | str, secret: str, timestamp: int | None = None) -> str:
    """``Stripe-Signature`` header value for ``payload``, exactly as Stripe computes it."""
    body = payload.decode("utf-8") if isinstance(payload, bytes) else payload
    ts = int(time.time()) if timestamp is None else int(timestamp)
    mac = hmac.new(secret.encode("utf-8"), f"{ts}.{body}".encode(), hashlib.sha256)
    return f"t={ts},v1={mac.hexdigest()}"


def event_payload(event: Json) -> bytes:
    """The webhook body Stripe POSTs for ``event`` (pretty JSON like Stripe's)."""
    return json.dumps(event, indent=2).encode("utf-8")


@dataclass
class RecordedRequest:
    """One request as the fake saw it (rejected ones included)."""

    method: str
    path: str
    params: Json
    idempotency_key: str | None
    stripe_version: str | None
    headers: dict[str, str]
    status: int | None = None
    response: Json | None = None
    replayed: bool = False
    template: str | None = None


@dataclass
class FailureRule:
    """A planned failure for the next ``count`` matching requests."""

    count: int = 1
    status: int = 500
    kind: str = "error"  # error | timeout | card_error | lost_response
    delay: float = 5.0
    path_prefix: str | None = None
    method: str | None = None
    retry_after: int = 1
    should_retry: bool | None = None
    message: str | None = None

    def matches(self, method: str, path: str) -> bool:
        return (self.path_prefix is None or path.startswith(self.path_prefix)) and (
            self.method is None or self.method.upper() == method.upper()
        )


@dataclass
class _IdempotentResult:
    method: str
    path: str
    params: Json
    status: int
    body: Json
    headers: dict[str, str] = field(default_factory=dict)


def _error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Json, dict[str, str]]:
    return (
        status,
        StripeError(status, message, type_=type_, param=param, code=code).body(),
        dict(headers or {}),
    )


class StripeFake(StripeSimulator):
    """Stripe API over real HTTP on 127.0.0.1:<random port>, plus the simulation API."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__()
        self.host = host
        self.port = port
        self.requests: list[RecordedRequest] = []
        self._generation = 0  # bumped by `reset`
        self._failures: list[FailureRule] = []
        self._idempotency: dict[str, _IdempotentResult] = {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("StripeFake is not started")
        return f"http://{self.host}:{self.port}"

    def start(self) -> StripeFake:
        if self._server is not None:
            return self
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose `proto` says TCP
        # (accepted ones inherit it). Without it, a response's body (written after its
        # headers) waited ~40 ms for the client's delayed ACK on a kept-alive connection.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._asgi,
            interface="asgi3",
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        self._server = server
        self.public_url = self.url
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            self._stopping = asyncio.Event()
            loop.run_until_complete(server.serve(sockets=[sock]))
            loop.close()

        self._thread = threading.Thread(target=run, name="stripe-fake", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("StripeFake server did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        server, thread, loop = self._server, self._thread, self._loop
        if server is None or thread is None or loop is None:
            return
        server.should_exit = True
        if self._stopping is not None and not loop.is_closed():
            stopping = self._stopping
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout=10)
        self._server = self._thread = self._loop = None
        self._stopping = None

    def __enter__(self) -> StripeFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget all objects, events, recorded requests, idempotency keys and failures. A
        request still held by a `timeout` failure is answered 500 without being applied: it
        belonged to the test before (its client gave up long ago)."""
        with self._lock:
            self._generation += 1
            self.reset_state()
            self.set_time(None)
            self.requests.clear()
            self._failures.clear()
            self._idempotency.clear()

    # ------------------------------------------------------------------ failures

    def fail_next(
        self,
        count: int = 1,
        status: int = 500,
        *,
        kind: str = "error",
        delay: float = 5.0,
        path_prefix: str | None = None,
        method: str | None = None,
        retry_after: int = 1,
        should_retry: bool | None = None,
        message: str | None = None,
    ) -> None:
        """Make the next ``count`` matching requests fail.

        kind="error": answer ``status`` (429 gets ``Retry-After`` + rate_limit body).
        kind="timeout": sleep ``delay`` seconds first, then answer normally.
        kind="card_error": 402 card_declined.
        kind="lost_response": handle the request normally (Stripe applies it, and keeps its
        answer under the idempotency key), then answer ``status`` instead: the answer was
        lost, as when the caller crashes or the connection drops after Stripe committed.
        """
        if kind not in {"error", "timeout", "card_error", "lost_response"}:
            raise ValueError(f"unknown failure kind {kind!r}")
        with self._lock:
            self._failures.append(
                FailureRule(
                    count,
                    status,
                    kind,
                    delay,
                    path_prefix,
                    method,
                    retry_after,
                    should_retry,
                    message,
                )
            )

    def clear_failures(self) -> None:
        """Forget failures still armed by ``fail_next`` (Stripe recovers)."""
        with self._lock:
            self._failures.clear()

    def forget_idempotency_keys(self) -> None:
        """Forget every idempotency key, as Stripe does once a key is 24 hours old: a request
        sent again with an old key is then run again."""
        with self._lock:
            self._idempotency.clear()

    def _take_failure(self, method: str, path: str) -> FailureRule | None:
        with self._lock:
            for rule in self._failures:
                if rule.count > 0 and rule.matches(method, path):
                    rule.count -= 1
                    if rule.count == 0:
                        self._failures.remove(rule)
                    return rule
        return None

    @staticmethod
    def _failure_response(rule: FailureRule) -> tuple[int, Json, dict[str, str]]:
        headers: dict[str, str] = {}
        if rule.should_retry is not None:
            headers["Stripe-Should-Retry"] = "true" if rule.should_retry else "false"
        if rule.kind == "card_error":
            status, body, hdrs = _error(
                402,
                rule.message or "Your card was declined.",
                type_="card_error",
                code="card_declined",
            )
            body["error"]["decline_code"] = "generic_decline"
            return status, body, {**hdrs, **headers}
        if rule.status == 429:
            headers["Retry-After"] = str(rule.retry_after)
            return _error(
                429,
                rule.message
                or "Too many requests hit the API too quickly. "
                "We recommend an exponential backoff of your requests.",
                code="rate_limit",
                headers=headers,
            )
        if rule.status >= 500:
            return _error(
                rule.status,
                rule.message or "An unknown error occurred (injected by the Stripe fake).",
                type_="api_error",
                headers=headers,
            )
        if rule.status == 401:
            return _error(
                401,
                rule.message or "Invalid API Key provided.",
                type_="authentication_error",
                headers=headers,
            )
        if rule.status == 409:
            return _error(
                409,
                rule.message
                or "This object cannot be accessed right now "
                "because another API request or Stripe process is currently "
                "accessing it.",
                type_="invalid_request_error",
                code="lock_timeout",
                headers=headers,
            )
        return _error(rule.status, rule.message or "Injected failure.", headers=headers)

    # ------------------------------------------------------------------ HTTP

    async def _asgi(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        response = await self._handle(request)
        await response(scope, receive, send)

    async def _handle(self, request: Request) -> Response:
        method = request.method.upper()
        path = request.url.path
        if method == "GET" and path.startswith(("/checkout/", "/billing_portal/")):
            return HTMLResponse(f"<html><body><h1>Stripe fake</h1><p>{path}</p></body></html>")
        body = await request.body()
        raw = decode_form(request.url.query)
        raw.update(decode_form(body))
        headers = {k.lower(): v for k, v in request.headers.items()}
        record = RecordedRequest(
            method=method,
            path=path,
            params=raw,
            idempotency_key=headers.get("idempotency-key"),
            stripe_version=headers.get("stripe-version"),
            headers=headers,
        )
        with self._lock:
            self.requests.append(record)
        request_id = "req_" + secrets.token_hex(7)
        status, payload, extra = await self._process(method, path, raw, headers, record, request_id)
        record.status = status
        record.response = payload
        out_headers = {
            "Request-Id": request_id,
            "Stripe-Version": headers.get("stripe-version") or API_VERSION,
            **extra,
        }
        if record.idempotency_key and method == "POST":
            out_headers["Idempotency-Key"] = record.idempotency_key
        return JSONResponse(payload, status_code=status, headers=out_headers)

    async def _process(
        self,
        method: str,
        path: str,
        raw: Json,
        headers: dict[str, str],
        record: RecordedRequest,
        request_id: str,
    ) -> tuple[int, Json, dict[str, str]]:
        rule = self._take_failure(method, path)
        if rule is not None and rule.kind == "lost_response":
            await self._process_request(method, path, raw, headers, record, request_id)
            return self._failure_response(rule)
        if rule is not None:
            if rule.kind == "timeout":
                generation = self._generation
                await self._sleep(rule.delay)
                if self._generation != generation:
                    return _error(500, "The Stripe fake was reset while this request waited.")
            else:
                return self._failure_response(rule)
        return await self._process_request(method, path, raw, headers, record, request_id)

    async def _process_request(
        self,
        method: str,
        path: str,
        raw: Json,
        headers: dict[str, str],
        record: RecordedRequest,
        request_id: str,
    ) -> tuple[int, Json, dict[str, str]]:
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer sk_") and not auth.startswith("Bearer rk_"):
            return _error(
                401,
                "You did not provide an API key. You need to provide your API "
                "key in the Authorization header, using Bearer auth (e.g. "
                "'Authorization: Bearer YOUR_SECRET_KEY').",
                type_="authentication_error",
            )
        found = match_route(method, path)
        if found is None:
            if path_exists(path):
                return _error(
                    404,
                    f"Unrecognized request URL ({method}: {path}). This "
                    "path does not support that method.",
                )
            return _error(
                404,
                f"Unrecognized request URL ({method}: {path}). Please see "
                "https://stripe.com/docs or we can help at "
                "https://support.stripe.com/.",
            )
        route, path_params = found
        record.template = route.template
        try:
            params = validate_params(route, raw)
        except ParamError as exc:
            return _error(
                400,
                exc.message,
                param=exc.param,
                code="parameter_unknown"
                if exc.message.startswith("Received unknown")
                else "parameter_invalid_empty"
                if exc.message.startswith("Missing")
                else None,
            )
        record.params = params
        key = record.idempotency_key
        if method == "POST" and key:
            with self._lock:
                stored = self._idempotency.get(key)
                if stored is not None:
                    if (stored.method, stored.path, stored.params) != (method, path, params):
                        return _error(
                            400,
                            "Keys for idempotent requests can only be used "
                            "with the same parameters they were first used with. "
                            "Try using a key other than "
                            f"'{key}' if you meant to execute a different request.",
                            type_="idempotency_error",
                        )
                    record.replayed = True
                    return (
                        stored.status,
                        copy.deepcopy(stored.body),
                        {**stored.headers, "Idempotent-Replayed": "true"},
                    )
                result = self._run(
                    method, route.template, path_params, params, RequestContext(request_id, key)
                )
                self._idempotency[key] = _IdempotentResult(
                    method,
                    path,
                    params,
                    result[0],
                    copy.deepcopy(result[1]),
                    {"Original-Request": request_id},
                )
                return result
        return self._run(
            method,
            route.template,
            path_params,
            params,
            RequestContext(request_id, key if method == "POST" else None),
        )

    def _run(
        self,
        method: str,
        template: str,
        path_params: dict[str, str],
        params: Json,
        ctx: RequestContext,
    ) -> tuple[int, Json, dict[str, str]]:
        try:
            status, body = self.call(method, template, path_params, params, ctx)
        except StripeError as exc:
            return exc.status, exc.body(), {}
        except Exception as exc:  # a bug in the fake: answer like Stripe's api_error
            logger.exception("StripeFake failed on %s %s", method, template)
            return _error(
                500,
                f"Stripe fake internal error: {exc!r}",
                type_="api_error",
                headers={"Stripe-Should-Retry": "false"},
            )
        return status, body, {}

    async def _sleep(self, delay: float) -> None:
        stopping = self._stopping
        if stopping is None:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=delay)

    # ------------------------------------------------------------------ webhooks

    @staticmethod
    def sign(payload: bytes | str, secret: str, timestamp: int | None = None) -> str:
        return sign(payload, secret, timestamp)

    @staticmethod
    def event_payload(event: Json) -> bytes:
        return event_payload(event)

    def signed_event(
        self, event: Json, secret: str, timestamp: int | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """(body, headers) of the webhook POST Stripe would send for ``event``."""
        body = event_payload(event)
        return body, {
            "Content-Type": "application/json; charset=utf-8",
            "Stripe-Signature": sign(body, secret, timestamp),
        }

    def requests_to(self, method: str, path_prefix: str = "") -> list[RecordedRequest]:
        """Recorded requests with this method whose path starts with ``path_prefix``."""
        with self._lock:
            return [
                r
                for r in self.requests
                if r.method == method.upper() and r.path.startswith(path_prefix)
            ]
