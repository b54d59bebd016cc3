"""A subscription live during a maintenance window is extended even when Stripe renewed it
between the window's end and its completion (its current period then starts after the
window, but the period it paid before covered it)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.models import Subscription
from app.subscriptions.access import access_until
from tests.conftest import Deliver, TokenFactory, bearer
from tests.maintenance.conftest import LiveSubscription
from tests.stripe_fake import StripeFake

URL = "/v1/ops/maintenance-windows"
FEBRUARY = datetime(2026, 2, 1, tzinfo=UTC)
RENEWED = datetime(2026, 3, 3, tzinfo=UTC)  # the fake's 30-day period from 1 February


async def test_a_subscription_renewed_after_the_window_ended_is_still_extended_on_completion(
    client: httpx.AsyncClient,
    token: TokenFactory,
    deliver: Deliver,
    factory: async_sessionmaker[AsyncSession],
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    ops = bearer(token(scope="ops", sub="ops-bob"))
    sub = await live_subscription("acc_rn", "ch_rn", email="rn@client.example", start=FEBRUARY)
    # 10:00 → 12:00 UTC on Wednesday 25 February: one calendar day in the business time zone.
    opened = await client.post(
        URL,
        json={
            "starts_at": "2026-02-25T02:00:00Z",
            "ends_at": "2026-02-25T04:00:00Z",
            "kind": "scheduled",
            "reason": "Upgrade",
        },
        headers=ops,
    )
    assert opened.status_code == 201, opened.text
    # Stripe renews the subscription on 3 March, before ops completes the window.
    stripe_fake.set_time(RENEWED.timestamp())
    await deliver(stripe_fake.renew_subscription(sub["id"]))
    async with factory() as session:
        renewed = (
            await session.execute(select(Subscription).where(Subscription.channel_id == "ch_rn"))
        ).scalar_one()
    assert renewed.current_period_start == RENEWED
    period_end = renewed.current_period_end
    assert period_end is not None

    done = await client.post(
        f"{URL}/{opened.json()['id']}/complete",
        json={"ended_at": "2026-02-25T04:00:00Z"},
        headers=ops,
    )

    assert done.status_code == 200, done.text
    assert done.json()["subscriptions_extended"] == 1
    assert done.json()["accounts_notified"] == 1
    async with factory() as session:
        after = (
            await session.execute(select(Subscription).where(Subscription.channel_id == "ch_rn"))
        ).scalar_one()
    assert after.extension_days == 1
    assert access_until(after) == period_end + timedelta(days=1)
