"""Maintenance fixtures: the local SMTP server (shared with tests/notifications) and live
subscriptions created at the Stripe fake.

Until the lead's webhook consumer is merged, `live_subscription` mirrors the subscription Stripe
created into `subscriptions` the way that consumer does (from the `customer.subscription.created`
event); switch it to `await deliver(events)` once it lands.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.models import Account, Channel, Subscription
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


def _ts(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


@pytest.fixture
def live_subscription(
    app: FastAPI, stripe_fake: StripeFake, factory: async_sessionmaker[AsyncSession]
) -> LiveSubscription:
    """`await live_subscription("acc_1", "ch_1", email=...)`: a paid monthly subscription whose
    period starts at `start` (Stripe's clock), mirrored into our tables. Returns Stripe's
    subscription object."""
    if not any(p["id"] == PRICE_ID for p in stripe_fake.all("price")):
        stripe_fake.add_price(id=PRICE_ID, unit_amount=3900, currency="usd", interval="month")

    async def make(
        account_id: str,
        channel_id: str,
        *,
        email: str | None = None,
        start: datetime = PERIOD_START,
        status: str | None = None,
    ) -> dict[str, Any]:
        stripe_fake.set_time(start.timestamp())
        metadata = {
            "account_id": account_id,
            "channel_id": channel_id,
            "plan_code": "channel_monthly",
            "purpose": "subscription",
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
            key=f"test-checkout-{account_id}-{channel_id}",
        )
        events = stripe_fake.complete_checkout(session["id"])
        sub = next(
            e["data"]["object"] for e in events if e["type"] == "customer.subscription.created"
        )
        item = sub["items"]["data"][0]
        async with factory() as db, db.begin():
            await db.execute(
                insert(Account)
                .values(id=account_id, email=email, currency="usd")
                .on_conflict_do_nothing()
            )
            await db.execute(
                insert(Channel)
                .values(id=channel_id, account_id=account_id)
                .on_conflict_do_nothing()
            )
            db.add(
                Subscription(
                    stripe_id=sub["id"],
                    account_id=account_id,
                    channel_id=channel_id,
                    stripe_customer_id=sub["customer"],
                    plan_code="channel_monthly",
                    stripe_price_id=PRICE_ID,
                    status=status or sub["status"],
                    cancel_at_period_end=sub["cancel_at_period_end"],
                    current_period_start=_ts(item["current_period_start"]),
                    current_period_end=_ts(item["current_period_end"]),
                    trial_end=_ts(sub["trial_end"]),
                )
            )
        return dict(sub)

    return make
