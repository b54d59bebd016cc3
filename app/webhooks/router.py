"""`POST /webhooks/stripe` (Stripe's deliveries) and the ops view of stored events."""

from __future__ import annotations

import os
import time
from typing import Annotated, Any

import orjson
import structlog
from fastapi import APIRouter, Header, Query, Request
from fastapi.routing import APIRoute
from sqlalchemy import select
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.accounts.params import BlankIsNone
from app.auth import OpsStaff
from app.config import Settings
from app.db import SessionDep
from app.errors import (
    BillingError,
    Forbidden,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
    error_responses,
    problem_response,
)
from app.models import StripeEvent
from app.observability import (
    HTTP_LATENCY,
    HTTP_REQUESTS,
    MAX_BODY_BYTES,
    ClientDisconnected,
    read_body,
)
from app.webhooks import metrics
from app.webhooks.ingest import EventIngestor, IncomingEvent, incoming_event
from app.webhooks.processor import replay_event
from app.webhooks.schemas import StoredEvent, StoredEventList, WebhookAck
from app.webhooks.signature import SignatureError, verify_signature

log = structlog.get_logger()
router = APIRouter()


class InvalidWebhook(BillingError):
    status, code, title = 400, "invalid_webhook", "Invalid Stripe webhook"


class EventNotFound(NotFound):
    code, title = "event_not_found", "Stripe event not found"


class EventNotReplayable(BillingError):
    status, code, title = 409, "event_not_replayable", "Event cannot be replayed"


def parse_event(body: bytes, settings: Settings) -> IncomingEvent:
    try:
        event: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidWebhook("body is not JSON") from None
    try:
        return incoming_event(event, livemode=settings.stripe_livemode, raw=body)
    except ValueError as exc:
        raise InvalidWebhook(str(exc)) from None


WEBHOOK_PATH = "/webhooks/stripe"


@router.post(
    WEBHOOK_PATH,
    tags=["webhooks"],
    summary="Receive a Stripe event",
    description=(
        "Verifies the `Stripe-Signature` against every secret in `STRIPE_WEBHOOK_SECRETS`, "
        "stores the event durably (once, whatever the number of deliveries) and acknowledges "
        "it; the effect is applied asynchronously by the event processor. 400 for a bad or "
        "stale signature, a livemode mismatch or a Connect event (nothing stored); 503 when "
        "the event cannot be stored, so Stripe retries."
    ),
    response_model=WebhookAck,
    responses=error_responses(InvalidWebhook, ServiceUnavailable),
)
async def receive_stripe_event(
    request: Request,
    stripe_signature: Annotated[str | None, Header(alias="Stripe-Signature")] = None,
) -> WebhookAck:
    # The documented contract. `WebhookFastPath` (in front of the framework, app/main.py)
    # answers these requests identically, so this only runs for an app built without it.
    duplicate = await acknowledge(request.app.state, await request.body(), stripe_signature)
    return WebhookAck(received=True, duplicate=duplicate)


async def acknowledge(state: Any, body: bytes, stripe_signature: str | None) -> bool:
    """Verify, parse and durably store one delivery; True when it was a duplicate.
    Raises InvalidWebhook (400) or ServiceUnavailable (503)."""
    settings: Settings = state.settings
    RECEIVED.inc()
    try:
        verify_signature(
            body,
            stripe_signature,
            state.webhook_secrets,
            tolerance_seconds=settings.stripe_webhook_tolerance_seconds,
        )
    except SignatureError as exc:
        REJECTED_SIGNATURE.inc()
        log.info("webhook.rejected", reason="signature", detail=str(exc))
        raise InvalidWebhook(str(exc)) from None
    try:
        event = parse_event(body, settings)
    except InvalidWebhook as exc:
        REJECTED_PAYLOAD.inc()
        log.info("webhook.rejected", reason="payload", detail=exc.detail)
        raise
    ingestor: EventIngestor = state.event_ingestor
    try:
        is_new = await ingestor.store(event)
    except Exception:
        raise ServiceUnavailable("the event could not be stored; retry later") from None
    if not is_new:
        DUPLICATES.inc()
    return not is_new


RECEIVED = metrics.RECEIVED
DUPLICATES = metrics.DUPLICATES
REJECTED_SIGNATURE = metrics.REJECTED.labels("signature")
REJECTED_PAYLOAD = metrics.REJECTED.labels("payload")
_ACKS = {
    duplicate: orjson.dumps(WebhookAck(received=True, duplicate=duplicate).model_dump())
    for duplicate in (False, True)
}
_JSON = (b"content-type", b"application/json")
_ACK_LENGTHS = {duplicate: str(len(body)).encode() for duplicate, body in _ACKS.items()}


class WebhookFastPath:
    """Pure ASGI handler of `POST /webhooks/stripe`, called by the app before any of the
    framework's layers (`BillingApp.__call__` in app/main.py): routing, dependency solving,
    CORS, the exception and telemetry middlewares cost several times the delivery's own work
    (bench/README.md). It answers exactly what the route documents (the same `acknowledge`,
    the same 200 body and problem+json 400/503, a problem+json 500 for a bug) and does what
    `RequestContextMiddleware` does for every other request: the request id (bound to the
    logs, echoed in `x-request-id`), the 1 MiB body limit (413) and the route's metrics."""

    def __init__(self, app: Any, route: APIRoute, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.route = route
        self.max_body_bytes = max_body_bytes
        self._latency = HTTP_LATENCY.labels("POST", route.path)
        self._answered: dict[int, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        scope["app"] = self.app
        scope["route"] = self.route
        request_id = signature = declared = None
        for name, value in scope["headers"]:
            if name == b"stripe-signature":
                signature = value.decode("latin-1")
            elif name == b"x-request-id":
                request_id = value[:64]
            elif name == b"content-length":
                declared = value
        if not request_id:
            request_id = os.urandom(16).hex().encode()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id.decode("latin-1"))
        status = 500
        try:
            body = await read_body(declared, receive, self.max_body_bytes)
            if body is None:
                status = 413
                await self._problem(send, request_id, PAYLOAD_TOO_LARGE)
            else:
                try:
                    duplicate = await acknowledge(self.app.state, body, signature)
                except BillingError as exc:
                    status = exc.status
                    await self._problem(
                        send,
                        request_id,
                        problem_response(
                            exc.status, exc.code, exc.title, exc.detail, headers=exc.headers
                        ),
                    )
                else:
                    status = 200
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 200,
                            "headers": [
                                _JSON,
                                (b"content-length", _ACK_LENGTHS[duplicate]),
                                (b"x-request-id", request_id),
                            ],
                        }
                    )
                    await send({"type": "http.response.body", "body": _ACKS[duplicate]})
        except ClientDisconnected:
            pass  # nothing to answer
        except Exception as exc:
            log.exception("request.unhandled_error", error_type=type(exc).__name__)
            await self._problem(send, request_id, INTERNAL_ERROR)
        finally:
            counter = self._answered.get(status)
            if counter is None:
                counter = self._answered[status] = HTTP_REQUESTS.labels(
                    "POST", self.route.path, str(status)
                )
            counter.inc()
            self._latency.observe(time.perf_counter() - started)

    @staticmethod
    async def _problem(send: Send, request_id: bytes, response: Response) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [*response.raw_headers, (b"x-request-id", request_id)],
            }
        )
        await send({"type": "http.response.body", "body": response.body})


PAYLOAD_TOO_LARGE = problem_response(
    413,
    "payload_too_large",
    "Request body too large",
    f"Request bodies are limited to {MAX_BODY_BYTES} bytes",
)
INTERNAL_ERROR = problem_response(500, "internal_error", "Internal error", "Unexpected error")


@router.get(
    "/v1/ops/stripe-events",
    tags=["ops"],
    summary="List stored Stripe events (e.g. status=failed)",
    response_model=StoredEventList,
    responses=error_responses(Unauthorized, Forbidden),
)
async def list_stripe_events(
    session: SessionDep,
    _: OpsStaff,
    status: Annotated[
        str | None, Query(pattern="^(pending|processed|failed|ignored)$"), BlankIsNone
    ] = None,
    after: Annotated[str | None, Query(max_length=18, pattern="^[0-9]+$")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> StoredEventList:
    query = select(StripeEvent).order_by(StripeEvent.id).limit(limit + 1)
    if status is not None:
        query = query.where(StripeEvent.status == status)
    if after is not None:
        query = query.where(StripeEvent.id > int(after))
    rows = list((await session.scalars(query)).all())
    page = rows[:limit]
    return StoredEventList(
        data=[_stored(row) for row in page],
        next_cursor=str(page[-1].id) if len(rows) > limit else None,
    )


@router.post(
    "/v1/ops/stripe-events/{event_id}/replay",
    tags=["ops"],
    summary="Queue a failed Stripe event for processing again",
    response_model=StoredEvent,
    responses=error_responses(Unauthorized, Forbidden, EventNotFound, EventNotReplayable),
)
async def replay_stripe_event(
    request: Request, event_id: str, session: SessionDep, principal: OpsStaff
) -> StoredEvent:
    row = await session.scalar(
        select(StripeEvent).where(StripeEvent.stripe_id == event_id).with_for_update()
    )
    if row is None:
        raise EventNotFound(f"no stored event {event_id}")
    if row.payload is None:
        raise EventNotReplayable("the event's payload was pruned after processing")
    if row.status == "pending":
        raise EventNotReplayable("the event is already queued")
    await replay_event(session, row)
    log.info("stripe_event.replayed", stripe_event_id=event_id, by=principal.sub)
    request.app.state.event_processor.notify()
    return _stored(row)


def _stored(row: StripeEvent) -> StoredEvent:
    return StoredEvent(
        id=row.stripe_id,
        type=row.type,
        status=row.status,
        attempts=row.attempts,
        last_error=row.last_error,
        stripe_created=row.stripe_created,
        received_at=row.received_at,
        processed_at=row.processed_at,
        next_attempt_at=row.next_attempt_at,
    )
