"""Maintenance fixtures: the local SMTP server (shared with tests/notifications) and live
subscriptions created at the Stripe fake.

Subscriptions are created the real way: Checkout at the Stripe fake, its events delivered to
the webhook consumer.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.models import Account
from tests.conftest import Deliver
from tests.notifications.conftest import (  # noqa: F401  (shared fixtures)
    smtp_server,
    smtp_session_server,
    smtp_settings,
)
from tests.stripe_fake import StripeFake

PERIOD_START = datetime(2026, 3, 1, tzinfo=UTC)
PRICE_ID = "price_maint_monthly"

LiveSubscription = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture
def factory(app: FastAPI) -> async_sessionmaker[AsyncSession]:
    session_factory: async_sessionmaker[AsyncSession] = app.state.session_factory
    return session_factory


@pytest.fixture
def live_subscription(
    app: FastAPI,
    stripe_fake: StripeFake,
    factory: async_sessionmaker[AsyncSession],
    deliver: Deliver,
) -> LiveSubscription:
    """`await live_subscription("acc_1", "ch_1", email=...)`: a paid monthly subscription whose
    period starts at `start` (Stripe's clock), created through Checkout at the Stripe fake and
    mirrored by the webhook consumer (`deliver`). `canceled=True` then ends it at Stripe;
    `payment_status="unpaid"` leaves it `incomplete`, its delayed payment in flight.
    Returns Stripe's subscription object."""
    if not any(p["id"] == PRICE_ID for p in stripe_fake.all("price")):
        stripe_fake.add_price(id=PRICE_ID, unit_amount=3900, currency="usd", interval="month")

    async def make(
        account_id: str,
        channel_id: str,
        *,
        email: str | None = None,
        start: datetime = PERIOD_START,
        canceled: bool = False,
        payment_status: str = "paid",
    ) -> dict[str, Any]:
        stripe_fake.set_time(start.timestamp())
        async with factory() as db, db.begin():
            # The billing contact arrives with the client's token (`email` claim).
            await db.execute(
                insert(Account)
                .values(id=account_id, email=email, currency="usd")
                .on_conflict_do_nothing()
            )
        metadata = {
            "account_id": account_id,
            "channel_id": channel_id,
            "plan_code": "channel_monthly",
            "purpose": "subscription",
            "checkout_session_id": str(uuid.uuid4()),
        }
        session = await app.state.stripe.create_checkout_session(
            {
                "mode": "subscription",
                "line_items": [{"price": PRICE_ID, "quantity": 1}],
                "success_url": "https://app.1msg.io/ok",
                "cancel_url": "https://app.1msg.io/cancel",
                "metadata": metadata,
                "subscription_data": {"metadata": metadata},
            },
            key=f"test-checkout-{metadata['checkout_session_id']}",
        )
        events = stripe_fake.complete_checkout(session["id"], payment_status=payment_status)
        await deliver(events)
        sub = next(
            e["data"]["object"] for e in events if e["type"] == "customer.subscription.created"
        )
        if canceled:
            await deliver(stripe_fake.delete_subscription(sub["id"]))
        return dict(sub)

    return make
