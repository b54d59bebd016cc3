"""Subscriptions a lost chargeback ended, cancelled at Stripe after the events are applied.

A lost chargeback on a subscription payment ends that subscription's access
(`DISPUTE_LOST_ENDS_ACCESS`, app/disputes/events.py). Left active at Stripe, the subscription
would go on renewing and charging the client for periods without access, so it is cancelled
there too: at once, without proration or a final invoice, as an approved refund cancels it,
with the idempotency key `billing:dispute-cancel:<dispute row id>`.

Not inside the transaction that applies the events, for the reasons fees are not
(app/webhooks/fees.py): no Stripe round trip while a batch holds its locks, and a Stripe outage
delays the cancellation only, never the events (the revocation is already applied). The event
processor runs `DisputeCancels.run` beside its loop after the fee look-ups. A round sends the
cancellations not yet accepted (`subscriptions.dispute_cancel_sent_at` is null) of
subscriptions still live in the mirror; Stripe accepting one (or answering that the
subscription is already gone) records it, so each is sent once. One Stripe refuses
(`StripeRequestRejected`) does not hold up the others; after any failed call the next round
waits `FAILURE_BACKOFF_SECONDS`. Two replicas sending the same one at once send the same
key, which Stripe answers once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from time import monotonic
from typing import cast

import structlog
from sqlalchemy import Table, literal, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import ArrayUpdate, DriverStatement, session_driver
from app.models import DisputeEffect, Subscription
from app.stripe_gateway import StripeGateway, StripeRequestRejected, idempotency_key
from app.webhooks.handlers import TERMINAL_SUBSCRIPTION_STATUSES

log = structlog.get_logger()

ROUND_SIZE = 100
FAILURE_BACKOFF_SECONDS = 60.0

UNSENT = DriverStatement(
    select(Subscription.id, Subscription.stripe_id, DisputeEffect.dispute_id)
    .join(DisputeEffect, DisputeEffect.subscription_id == Subscription.id)
    .where(
        DisputeEffect.kind == "access_ended",
        Subscription.dispute_cancel_sent_at.is_(None),
        Subscription.status.not_in([literal(s) for s in sorted(TERMINAL_SUBSCRIPTION_STATUSES)]),
    )
    .order_by(Subscription.id, DisputeEffect.dispute_id)
    .limit(ROUND_SIZE),
    named=True,
)
"""Cancellations to send: each subscription with the lost chargebacks that ended its access
(the first of them names the key)."""
MARK_SENT = ArrayUpdate(
    cast(Table, Subscription.__table__),
    ["dispute_cancel_sent_at"],
    where='"subscriptions".dispute_cancel_sent_at IS NULL',
)


class DisputeCancels:
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
        async with self._session_factory() as session, session.begin():
            unsent = await UNSENT.fetch(await session_driver(session))
        first_of = {row.id: row for row in reversed(unsent)}  # one per subscription
        sent = []
        failed = False
        for row in sorted(first_of.values(), key=lambda row: row.id):
            try:
                await self._stripe.cancel_subscription(
                    row.stripe_id, key=idempotency_key("dispute-cancel", row.dispute_id)
                )
            except Exception as exc:
                failed = True
                log.warning(
                    "dispute.cancel_failed",
                    subscription_id=row.stripe_id,
                    error_type=type(exc).__name__,
                    retry_in_seconds=FAILURE_BACKOFF_SECONDS,
                )
                if isinstance(exc, StripeRequestRejected):
                    continue  # this one refused: the others are still sent
                break  # Stripe failing: for the others too
            sent.append({"id": row.id, "dispute_cancel_sent_at": datetime.now(UTC)})
        if failed:
            self._next_round_at = monotonic() + FAILURE_BACKOFF_SECONDS
        if sent:
            async with self._session_factory() as session, session.begin():
                await MARK_SENT.execute(await session_driver(session), sent)
            log.info("dispute.subscriptions_cancelled", count=len(sent))
        return len(sent)
