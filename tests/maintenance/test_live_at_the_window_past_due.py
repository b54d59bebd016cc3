"""Without `PAST_DUE_KEEPS_ACCESS` a `past_due` subscription has no access: live during a
window is still what it was then, not its status at the completion, both ways."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from tests.conftest import Deliver, TokenFactory, bearer, make_settings
from tests.maintenance.conftest import LiveSubscription
from tests.maintenance.test_completion import complete, open_window, subscription
from tests.maintenance.test_live_at_the_window import FEBRUARY, RENEWED
from tests.stripe_fake import StripeFake


@pytest.fixture
def settings(database_url: str, stripe_fake: StripeFake, clean_database: None) -> Settings:
    stripe_fake.reset()
    return make_settings(database_url, stripe_fake.url, past_due_keeps_access=False)


async def test_paid_through_the_window_and_past_due_since_is_extended(
    client: httpx.AsyncClient,
    token: TokenFactory,
    deliver: Deliver,
    factory: async_sessionmaker[AsyncSession],
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    ops = bearer(token(scope="ops", sub="ops-bob"))
    sub = await live_subscription("acc_pd1", "ch_pd1", email="pd1@client.example", start=FEBRUARY)
    window = await open_window(client, ops, "2026-02-25T02:00:00Z", "2026-02-25T04:00:00Z")
    stripe_fake.set_time(RENEWED.timestamp())
    await deliver(stripe_fake.renew_subscription(sub["id"], paid=False))
    assert (await subscription(factory, "ch_pd1")).status == "past_due"

    done = await complete(client, ops, window, "2026-02-25T04:00:00Z")

    assert done.status_code == 200, done.text
    assert done.json()["subscriptions_extended"] == 1
    assert (await subscription(factory, "ch_pd1")).extension_days == 1


async def test_past_due_through_the_window_and_paid_since_is_not_extended(
    client: httpx.AsyncClient,
    token: TokenFactory,
    deliver: Deliver,
    factory: async_sessionmaker[AsyncSession],
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    ops = bearer(token(scope="ops", sub="ops-bob"))
    sub = await live_subscription("acc_pd2", "ch_pd2", email="pd2@client.example", start=FEBRUARY)
    stripe_fake.set_time(RENEWED.timestamp())
    await deliver(stripe_fake.renew_subscription(sub["id"], paid=False))
    window = await open_window(client, ops, "2026-03-11T02:00:00Z", "2026-03-11T04:00:00Z")
    # The client pays the declined renewal after the window: active now, no access during it.
    stripe_fake.set_time((RENEWED + timedelta(days=10)).timestamp())
    invoice = stripe_fake.get("subscription", sub["id"])["latest_invoice"]
    await deliver(stripe_fake.pay_invoice(str(invoice)))
    assert (await subscription(factory, "ch_pd2")).status == "active"

    done = await complete(client, ops, window, "2026-03-11T04:00:00Z")

    assert done.status_code == 200, done.text
    assert done.json()["subscriptions_extended"] == 0
    assert (await subscription(factory, "ch_pd2")).extension_days == 0


async def test_paid_until_a_renewal_declined_during_the_window_is_extended(
    client: httpx.AsyncClient,
    token: TokenFactory,
    deliver: Deliver,
    factory: async_sessionmaker[AsyncSession],
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    """The window straddles the period boundary: the subscription was paid and live from the
    window's start until Stripe renewed it inside the window, and the renewal was declined.
    It was live during the window as surely as one whose renewal was declined just after it
    (above), so it keeps the window's days for when it is paid again."""
    ops = bearer(token(scope="ops", sub="ops-bob"))
    sub = await live_subscription("acc_pd3", "ch_pd3", email="pd3@client.example", start=FEBRUARY)
    # 22:00 on 2 March → 02:00 on 3 March UTC (one date in Singapore); Stripe renews at 00:00.
    window = await open_window(client, ops, "2026-03-02T22:00:00Z", "2026-03-03T02:00:00Z")
    stripe_fake.set_time(RENEWED.timestamp())
    await deliver(stripe_fake.renew_subscription(sub["id"], paid=False))
    assert (await subscription(factory, "ch_pd3")).status == "past_due"

    done = await complete(client, ops, window, "2026-03-03T02:00:00Z")

    assert done.status_code == 200, done.text
    assert done.json()["subscriptions_extended"] == 1
    assert (await subscription(factory, "ch_pd3")).extension_days == 1
