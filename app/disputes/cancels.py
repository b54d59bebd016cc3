"""Subscriptions a lost chargeback ended, cancelled at Stripe after the events are applied.

A lost chargeback on a subscription payment ends that subscription's access
(`DISPUTE_LOST_ENDS_ACCESS`, app/disputes/events.py). Left active at Stripe, the subscription
would go on renewing and charging the client for periods without access, so it is cancelled
there too: at once, without proration or a final invoice, as an approved refund cancels it,
with the idempotency key `billing:dispute-cancel:<dispute row id>`.

Sent after the events are applied, as app/subscriptions/cancels.py describes: a round sends
the cancellations not yet accepted (`subscriptions.dispute_cancel_sent_at` is null) of
subscriptions still live in the mirror.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, literal, select, update

from app.db import DriverStatement, session_driver
from app.models import DisputeEffect, Subscription
from app.stripe_gateway import idempotency_key
from app.subscriptions.cancels import ROUND_SIZE, CancelRounds
from app.webhooks.handlers import TERMINAL_SUBSCRIPTION_STATUSES

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
MARK_SENT = DriverStatement(
    update(cast(Table, Subscription.__table__))
    .where(Subscription.id == bindparam("id"), Subscription.dispute_cancel_sent_at.is_(None))
    .values(dispute_cancel_sent_at=func.now(), updated_at=func.now())
)


class DisputeCancels(CancelRounds):
    name = "dispute"

    async def unsent(self) -> Sequence[tuple[str, str, Any]]:
        async with self._session_factory() as session, session.begin():
            unsent = await UNSENT.fetch(await session_driver(session))
        first_of = {row.id: row for row in reversed(unsent)}  # one per subscription
        return [
            (row.stripe_id, idempotency_key("dispute-cancel", row.dispute_id), row.id)
            for row in sorted(first_of.values(), key=lambda row: row.id)
        ]

    async def record(self, accepted: list[Any]) -> int:
        """Each in a transaction of its own: the event processor's batch updates subscriptions
        in its own order, and a round holding one row while waiting for another could close a
        cycle with it (a deadlock Postgres breaks after `deadlock_timeout`, stalling the
        events meanwhile); one row at a time waits for the batch, never the other way round."""
        async with self._session_factory() as session:
            for row_id in accepted:
                async with session.begin():
                    await MARK_SENT.execute(await session_driver(session), id=row_id)
        return len(accepted)
