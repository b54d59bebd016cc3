"""Subscriptions our approved refunds ended, cancelled at Stripe after the events are applied.

An approved refund of a subscription payment cancels that subscription at once, without
proration or a final invoice (policy; app/refunds/events.py ends its access and records it in
`refund_executions.cancel_subscription_id` when Stripe's refund events confirm the refund).
The cancellation is sent after the events are applied, as app/subscriptions/cancels.py
describes (before, a Stripe outage failed the refund's events with it, and a long one parked
them): a round sends the cancellations not yet accepted (`subscription_cancelled_at` is null),
each with the idempotency key `billing:refund-cancel:<execution id>`, and records each accepted
one with its audit entry.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from app.models import RefundExecution
from app.refunds import repository as repo
from app.refunds.service import audit_step
from app.stripe_gateway import idempotency_key
from app.subscriptions.cancels import ROUND_SIZE, CancelRounds

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


class RefundCancels(CancelRounds):
    name = "refund"

    async def unsent(self) -> Sequence[tuple[str, str, Any]]:
        async with self._session_factory() as session:
            unsent = (await session.execute(UNSENT)).all()
        return [
            (str(subscription_id), idempotency_key("refund-cancel", execution_id), execution_id)
            for execution_id, subscription_id in unsent
        ]

    async def record(self, accepted: list[Any]) -> int:
        return sum([await self._record(execution_id) for execution_id in accepted])

    async def _record(self, execution_id: uuid.UUID) -> bool:
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
                subscription_id=execution.cancel_subscription_id,
                prorate=False,
            )
        return True
