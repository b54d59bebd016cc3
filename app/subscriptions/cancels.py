"""Cancellations at Stripe sent beside the event loop, once the events that asked for them are
applied (a lost chargeback, app/disputes/cancels.py; an approved refund, app/refunds/cancels.py).

Not inside the transaction that applies the events, for the reasons fees are not
(app/webhooks/fees.py): no Stripe round trip while a batch holds its locks, and a Stripe outage
delays the cancellation only, never the events (access is already ended). The event processor
runs each kind's `run` beside its loop after the fee look-ups. A round sends the cancellations
not yet accepted, each with an idempotency key derived from the row that asked for it, so two
replicas sending one at once send the same key, which Stripe answers once; Stripe accepting one
(or answering that the subscription is already gone) records it, so each is sent once. One
Stripe refuses (`StripeRequestRejected`) does not hold up the others; Stripe failing stops the
round; after any failed call the next round waits `FAILURE_BACKOFF_SECONDS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from time import monotonic
from typing import Any, ClassVar

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.stripe_gateway import StripeGateway, StripeRequestRejected

log = structlog.get_logger()

ROUND_SIZE = 100
FAILURE_BACKOFF_SECONDS = 60.0


class CancelRounds(ABC):
    """One kind of cancellation: what to send (`unsent`) and how to record what Stripe
    accepted (`record`)."""

    name: ClassVar[str]
    """Prefix of the log events (`<name>.cancel_failed`, `<name>.subscriptions_cancelled`)."""

    def __init__(
        self, session_factory: async_sessionmaker[AsyncSession], stripe: StripeGateway
    ) -> None:
        self._session_factory = session_factory
        self._stripe = stripe
        self._next_round_at = 0.0  # monotonic(); later after a failed call

    @abstractmethod
    async def unsent(self) -> Sequence[tuple[str, str, Any]]:
        """Up to `ROUND_SIZE` cancellations to send: (Stripe subscription id, idempotency key,
        what `record` needs to mark it sent)."""

    @abstractmethod
    async def record(self, accepted: list[Any]) -> int:
        """Mark these cancellations accepted; returns how many this call recorded."""

    async def run(self) -> int:
        """One round; returns how many cancellations Stripe accepted (0: none to send, or the
        backoff after a failure has not passed)."""
        if monotonic() < self._next_round_at:
            return 0
        accepted = []
        failed = False
        for subscription_id, key, item in await self.unsent():
            try:
                await self._stripe.cancel_subscription(subscription_id, key=key)
            except Exception as exc:
                failed = True
                log.warning(
                    f"{self.name}.cancel_failed",
                    subscription_id=subscription_id,
                    error_type=type(exc).__name__,
                    retry_in_seconds=FAILURE_BACKOFF_SECONDS,
                )
                if isinstance(exc, StripeRequestRejected):
                    continue  # this one refused: the others are still sent
                break  # Stripe failing: for the others too
            accepted.append(item)
        if failed:
            self._next_round_at = monotonic() + FAILURE_BACKOFF_SECONDS
        sent = await self.record(accepted) if accepted else 0
        if sent:
            log.info(f"{self.name}.subscriptions_cancelled", count=sent)
        return sent
