"""Subscriptions our approved refunds ended, cancelled at Stripe after the events are applied.

An approved refund of a subscription payment cancels that subscription at once, without
proration or a final invoice (policy; app/refunds/events.py ends its access and records it in
`refund_executions.cancel_subscription_id` when Stripe's refund events confirm the refund).
The cancellation is sent here, not inside the transaction that applies the events, for the
reasons fees and lost chargebacks' cancellations are not (app/webhooks/fees.py,
app/disputes/cancels.py): no Stripe round trip while a batch holds its locks, and a Stripe
outage delays the cancellation only, never the refund's events (the request is `refunded` and
the access ended either way; before, the events failed with it and were parked after a long
outage). The event processor runs `RefundCancels.run` beside its loop with the other Stripe
follow-ups. A round sends the cancellations not yet accepted (`subscription_cancelled_at` is
null), each with the idempotency key `billing:refund-cancel:<execution id>`; Stripe accepting
one (or answering that the subscription is already gone) records it and its audit entry, so
each is sent once. One Stripe refuses (`StripeRequestRejected`) does not hold up the others;
after any failed call the next round waits `FAILURE_BACKOFF_SECONDS`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from time import monotonic

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.models import RefundExecution
from app.refunds import repository as repo
from app.refunds.service import audit_step
from app.stripe_gateway import StripeGateway, StripeRequestRejected, idempotency_key

log = structlog.get_logger()

ROUND_SIZE = 100
FAILURE_BACKOFF_SECONDS = 60.0
ACTOR = "stripe"

UNSENT = (
    select(RefundExecution.id, RefundExecution.cancel_subscription_id)
    .where(
        RefundExecution.cancel_subscription_id.is_not(None),
        RefundExecution.subscription_cancelled_at.is_(None),
    )
    .order_by(RefundExecution.id)
    .limit(ROUND_SIZE)
)
"""Cancellations to send: the refunds' subscriptions Stripe has not accepted a cancel of."""


class RefundCancels:
    def __init__(
        self, session_factory: async_sessionmaker[AsyncSession], stripe: StripeGateway
    ) -> None:
        self._session_factory = session_factory
        self._stripe = stripe
        self._next_round_at = 0.0  # monotonic(); later after a failed call

    async def run(self) -> int:
        """One round; returns how many cancellations Stripe accepted (0: none to send, or the
        backoff after a failure has not passed)."""
        if monotonic() < self._next_round_at:
            return 0
        async with self._session_factory() as session:
            unsent = (await session.execute(UNSENT)).all()
        sent = 0
        failed = False
        for execution_id, subscription_id in unsent:
            assert subscription_id is not None  # UNSENT selects these only
            try:
                await self._stripe.cancel_subscription(
                    subscription_id, key=idempotency_key("refund-cancel", execution_id)
                )
            except Exception as exc:
                failed = True
                log.warning(
                    "refund.cancel_failed",
                    subscription_id=subscription_id,
                    error_type=type(exc).__name__,
                    retry_in_seconds=FAILURE_BACKOFF_SECONDS,
                )
                if isinstance(exc, StripeRequestRejected):
                    continue  # this one refused: the others are still sent
                break  # Stripe failing: for the others too
            if await self._record(execution_id, subscription_id):
                sent += 1
        if failed:
            self._next_round_at = monotonic() + FAILURE_BACKOFF_SECONDS
        if sent:
            log.info("refund.subscriptions_cancelled", count=sent)
        return sent

    async def _record(self, execution_id: uuid.UUID, subscription_id: str) -> bool:
        """Mark the cancellation accepted and audit it, once (another replica's round may
        have recorded it meanwhile)."""
        async with self._session_factory() as session, session.begin():
            execution = await session.get(RefundExecution, execution_id)
            if execution is None:
                return False
            # Lock order everywhere: request, then execution.
            request = await repo.get_request(session, execution.request_id, lock=True)
            execution = await repo.lock_execution(session, execution.id)
            if request is None or execution is None:
                return False
            if execution.subscription_cancelled_at is not None:
                return False
            execution.subscription_cancelled_at = datetime.now(UTC)
            audit_step(
                session,
                request,
                "subscription_cancelled",
                ACTOR,
                subscription_id=subscription_id,
                prorate=False,
            )
        return True
