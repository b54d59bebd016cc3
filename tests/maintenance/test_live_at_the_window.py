"""A subscription is judged live by what it was during the window, not by its status at the
completion: one the client paid for through the window keeps the days it lost even when a
renewal after the window was declined (`unpaid` now), and gets them back with access once the
open invoice is paid."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.subscriptions.access import access_until
from tests.conftest import Deliver, TokenFactory, bearer
from tests.maintenance.conftest import LiveSubscription
from tests.maintenance.test_completion import complete, open_window, subscription
from tests.stripe_fake import StripeFake

FEBRUARY = datetime(2026, 2, 1, tzinfo=UTC)
RENEWED = datetime(2026, 3, 3, tzinfo=UTC)  # the fake's 30-day period from 1 February


async def test_a_subscription_paid_through_the_window_is_extended_though_unpaid_at_completion(
    client: httpx.AsyncClient,
    token: TokenFactory,
    deliver: Deliver,
    factory: async_sessionmaker[AsyncSession],
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    ops = bearer(token(scope="ops", sub="ops-bob"))
    sub = await live_subscription("acc_up", "ch_up", email="up@client.example", start=FEBRUARY)
    # 10:00 → 12:00 UTC on Wednesday 25 February, inside the paid February period.
    window = await open_window(client, ops, "2026-02-25T02:00:00Z", "2026-02-25T04:00:00Z")
    # After the window the renewal is declined, and Stripe's retries end with it `unpaid`.
    stripe_fake.set_time(RENEWED.timestamp())
    await deliver(stripe_fake.renew_subscription(sub["id"], paid=False))
    await deliver(stripe_fake.update_subscription(sub["id"], status="unpaid"))
    assert (await subscription(factory, "ch_up")).status == "unpaid"

    done = await complete(client, ops, window, "2026-02-25T04:00:00Z")

    assert done.status_code == 200, done.text
    assert done.json()["subscriptions_extended"] == 1
    assert done.json()["accounts_notified"] == 1
    unpaid = await subscription(factory, "ch_up")
    assert unpaid.extension_days == 1
    # The client pays the open invoice: the day lost in February follows the paid period.
    invoice = stripe_fake.get("subscription", sub["id"])["latest_invoice"]
    await deliver(stripe_fake.pay_invoice(str(invoice)))
    paid = await subscription(factory, "ch_up")
    assert paid.status == "active"
    assert paid.current_period_end is not None
    assert access_until(paid) == paid.current_period_end + timedelta(days=1)


async def test_a_subscription_unpaid_all_through_the_window_is_not_extended(
    client: httpx.AsyncClient,
    token: TokenFactory,
    deliver: Deliver,
    factory: async_sessionmaker[AsyncSession],
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    ops = bearer(token(scope="ops", sub="ops-bob"))
    sub = await live_subscription("acc_nx", "ch_nx", email="nx@client.example", start=FEBRUARY)
    # The March renewal is declined before the window and never paid: `unpaid` through it.
    stripe_fake.set_time(RENEWED.timestamp())
    await deliver(stripe_fake.renew_subscription(sub["id"], paid=False))
    await deliver(stripe_fake.update_subscription(sub["id"], status="unpaid"))
    window = await open_window(client, ops, "2026-03-11T02:00:00Z", "2026-03-11T04:00:00Z")
    # Stripe goes on billing it after the window (another declined invoice): only the
    # February payment was ever made, and its period had ended before the window.
    stripe_fake.set_time((RENEWED + timedelta(days=30)).timestamp())
    await deliver(stripe_fake.renew_subscription(sub["id"], paid=False))
    await deliver(stripe_fake.update_subscription(sub["id"], status="unpaid"))

    done = await complete(client, ops, window, "2026-03-11T04:00:00Z")

    assert done.status_code == 200, done.text
    assert done.json()["subscriptions_extended"] == 0
    assert (await subscription(factory, "ch_nx")).extension_days == 0


async def test_a_subscription_whose_first_payment_arrived_after_the_window_is_not_extended(
    client: httpx.AsyncClient,
    token: TokenFactory,
    deliver: Deliver,
    factory: async_sessionmaker[AsyncSession],
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    ops = bearer(token(scope="ops", sub="ops-bob"))
    # A delayed payment method (SEPA): `incomplete`, no access, while the payment is in flight.
    sub = await live_subscription(
        "acc_sp", "ch_sp", email="sp@client.example", start=FEBRUARY, payment_status="unpaid"
    )
    assert (await subscription(factory, "ch_sp")).status == "incomplete"
    window = await open_window(client, ops, "2026-02-04T02:00:00Z", "2026-02-04T04:00:00Z")
    # The payment succeeds after the window: active now, its period started before it.
    stripe_fake.set_time(datetime(2026, 2, 6, tzinfo=UTC).timestamp())
    [checkout] = [
        s for s in stripe_fake.all("checkout.session") if s.get("subscription") == sub["id"]
    ]
    await deliver(stripe_fake.async_payment_succeeded(checkout["id"]))
    assert (await subscription(factory, "ch_sp")).status == "active"

    done = await complete(client, ops, window, "2026-02-04T04:00:00Z")

    assert done.status_code == 200, done.text
    assert done.json()["subscriptions_extended"] == 0
    assert (await subscription(factory, "ch_sp")).extension_days == 0


async def test_past_due_with_access_through_the_window_and_unpaid_since_is_extended(
    client: httpx.AsyncClient,
    token: TokenFactory,
    deliver: Deliver,
    factory: async_sessionmaker[AsyncSession],
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    """`PAST_DUE_KEEPS_ACCESS` (the default): a subscription `past_due` all through the window
    had access during it, so it was live then; Stripe's retries ending with it `unpaid` after
    the window do not take the days back: they count once it is paid, as for one whose renewal
    was declined after the window."""
    ops = bearer(token(scope="ops", sub="ops-bob"))
    sub = await live_subscription("acc_pk", "ch_pk", email="pk@client.example", start=FEBRUARY)
    stripe_fake.set_time(RENEWED.timestamp())
    await deliver(stripe_fake.renew_subscription(sub["id"], paid=False))
    assert (await subscription(factory, "ch_pk")).status == "past_due"
    window = await open_window(client, ops, "2026-03-11T02:00:00Z", "2026-03-11T04:00:00Z")
    # Stripe's last retry fails after the window.
    stripe_fake.set_time((RENEWED + timedelta(days=14)).timestamp())
    await deliver(stripe_fake.update_subscription(sub["id"], status="unpaid"))
    assert (await subscription(factory, "ch_pk")).status == "unpaid"

    done = await complete(client, ops, window, "2026-03-11T04:00:00Z")

    assert done.status_code == 200, done.text
    assert done.json()["subscriptions_extended"] == 1
    assert done.json()["accounts_notified"] == 1
    assert (await subscription(factory, "ch_pk")).extension_days == 1


async def test_a_subscription_begun_during_the_window_and_paid_after_it_is_not_extended(
    client: httpx.AsyncClient,
    token: TokenFactory,
    deliver: Deliver,
    factory: async_sessionmaker[AsyncSession],
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    """Checkout completed during the outage with a delayed payment method: `incomplete`, no
    access, all through the window; its first payment succeeded only after it."""
    ops = bearer(token(scope="ops", sub="ops-bob"))
    window = await open_window(client, ops, "2026-02-04T02:00:00Z", "2026-02-04T04:00:00Z")
    sub = await live_subscription(
        "acc_sd",
        "ch_sd",
        email="sd@client.example",
        start=datetime(2026, 2, 4, 3, tzinfo=UTC),
        payment_status="unpaid",
    )
    assert (await subscription(factory, "ch_sd")).status == "incomplete"
    stripe_fake.set_time(datetime(2026, 2, 6, tzinfo=UTC).timestamp())
    [checkout] = [
        s for s in stripe_fake.all("checkout.session") if s.get("subscription") == sub["id"]
    ]
    await deliver(stripe_fake.async_payment_succeeded(checkout["id"]))
    assert (await subscription(factory, "ch_sd")).status == "active"

    done = await complete(client, ops, window, "2026-02-04T04:00:00Z")

    assert done.status_code == 200, done.text
    assert done.json()["subscriptions_extended"] == 0
    assert (await subscription(factory, "ch_sd")).extension_days == 0
