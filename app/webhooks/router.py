"""`POST /webhooks/stripe` (Stripe's deliveries) and the ops view of stored events."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
import structlog
from fastapi import APIRouter, Header, Query, Request
from fastapi.routing import APIRoute
from sqlalchemy import select
from starlette.types import ASGIApp, Receive, Scope, Send

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


@router.post(
    "/webhooks/stripe",
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
    # Normally answered by `WebhookFastPath` before the framework sees it; this route is the
    # documented contract and serves any request the fast path passes on.
    return await acknowledge(request.app.state, await request.body(), stripe_signature)


async def acknowledge(state: Any, body: bytes, stripe_signature: str | None) -> WebhookAck:
    """Verify, parse and durably store one delivery; raises InvalidWebhook/ServiceUnavailable."""
    settings: Settings = state.settings
    metrics.RECEIVED.inc()
    try:
        verify_signature(
            body,
            stripe_signature,
            state.webhook_secrets,
            tolerance_seconds=settings.stripe_webhook_tolerance_seconds,
        )
    except SignatureError as exc:
        metrics.REJECTED.labels("signature").inc()
        raise InvalidWebhook(str(exc)) from None
    try:
        event = parse_event(body, settings)
    except InvalidWebhook:
        metrics.REJECTED.labels("payload").inc()
        raise
    ingestor: EventIngestor = state.event_ingestor
    try:
        is_new = await ingestor.store(event)
    except Exception:
        raise ServiceUnavailable("the event could not be stored; retry later") from None
    if not is_new:
        metrics.DUPLICATES.inc()
    structlog.contextvars.bind_contextvars(stripe_event_id=event.stripe_id)
    return WebhookAck(received=True, duplicate=not is_new)


_ACKS = {
    duplicate: orjson.dumps(WebhookAck(received=True, duplicate=duplicate).model_dump())
    for duplicate in (False, True)
}


class WebhookFastPath:
    """Pure ASGI handler of `POST /webhooks/stripe`, in front of the framework's routing,
    CORS, exception and dependency layers, which cost several times the work of the delivery
    itself (see bench/README.md). It answers exactly what the route documents (same function,
    same problem+json errors); any other request goes on to the app. It sits inside
    `RequestContextMiddleware`, so request ids, the body limit and the metrics still apply."""

    def __init__(self, app: ASGIApp, route: APIRoute) -> None:
        self.app = app
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.route.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # the metrics' route label
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        signature = None
        for name, value in scope["headers"]:
            if name == b"stripe-signature":
                signature = value.decode("latin-1")
                break
        try:
            ack = await acknowledge(scope["app"].state, b"".join(chunks), signature)
        except BillingError as exc:
            response = problem_response(
                exc.status, exc.code, exc.title, exc.detail, headers=exc.headers
            )
            await response(scope, receive, send)
            return
        body = _ACKS[ack.duplicate]
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


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
    status: Annotated[str | None, Query(pattern="^(pending|processed|failed|ignored)$")] = None,
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
