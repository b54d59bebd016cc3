"""`POST /webhooks/stripe` (Stripe's deliveries) and the ops view of stored events."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
import structlog
from fastapi import APIRouter, Header, Query, Request
from sqlalchemy import select

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
        return incoming_event(event, livemode=settings.stripe_livemode)
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
    settings: Settings = request.app.state.settings
    body = await request.body()
    metrics.RECEIVED.inc()
    try:
        verify_signature(
            body,
            stripe_signature,
            request.app.state.webhook_secrets,
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
    ingestor: EventIngestor = request.app.state.event_ingestor
    try:
        is_new = await ingestor.store(event)
    except Exception:
        raise ServiceUnavailable("the event could not be stored; retry later") from None
    if not is_new:
        metrics.DUPLICATES.inc()
    structlog.contextvars.bind_contextvars(stripe_event_id=event.stripe_id)
    return WebhookAck(received=True, duplicate=not is_new)


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
