"""Completing a maintenance window: access extension, Stripe update, client emails."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.main import create_app
from app.models import AccessChange, OutboxEmail, Subscription
from app.subscriptions.access import access_until
from tests.conftest import Deliver, TokenFactory, bearer, plain_dsn
from tests.maintenance.conftest import LiveSubscription
from tests.robustness.test_lock_conflicts import wait_for_a_lock_wait
from tests.stripe_fake import StripeFake

URL = "/v1/ops/maintenance-windows"
Factory = async_sessionmaker[AsyncSession]
PERIOD_END = datetime(2026, 3, 31, tzinfo=UTC)  # the fake's month from 1 March 00:00 UTC
# 23:00 on 10 March → 01:00 on 11 March in Singapore: two calendar days there, one in UTC.
ACROSS_MIDNIGHT = ("2026-03-10T15:00:00Z", "2026-03-10T17:00:00Z")


@pytest.fixture
def ops(token: TokenFactory) -> dict[str, str]:
    return bearer(token(scope="ops", sub="ops-bob"))


async def open_window(
    client: httpx.AsyncClient, ops: dict[str, str], starts_at: str, ends_at: str, **kw: str
) -> str:
    body = {"starts_at": starts_at, "ends_at": ends_at, "kind": "scheduled", "reason": "Upgrade"}
    response = await client.post(URL, json={**body, **kw}, headers=ops)
    assert response.status_code == 201, response.text
    window_id: str = response.json()["id"]
    return window_id


async def complete(
    client: httpx.AsyncClient, ops: dict[str, str], window_id: str, ended_at: str
) -> httpx.Response:
    return await client.post(
        f"{URL}/{window_id}/complete", json={"ended_at": ended_at}, headers=ops
    )


async def subscription(factory: Factory, channel_id: str) -> Subscription:
    async with factory() as session:
        return (
            await session.execute(select(Subscription).where(Subscription.channel_id == channel_id))
        ).scalar_one()


def stripe_updates(stripe_fake: StripeFake, stripe_id: str) -> list[Any]:
    return [
        r
        for r in stripe_fake.requests_to("POST", f"/v1/subscriptions/{stripe_id}")
        if r.status == 200
    ]


async def test_completion_extends_live_subscriptions_once_and_pushes_stripe_once(
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    sub = await live_subscription("acc_a", "ch_a", email="a@client.example")
    await live_subscription("acc_gone", "ch_gone", email="gone@client.example", canceled=True)
    # A subscription whose paid period starts after the window is not extended.
    await live_subscription(
        "acc_late", "ch_late", email="late@client.example", start=datetime(2026, 3, 20, tzinfo=UTC)
    )
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)

    first = await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])

    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["status"], body["ended_at"], body["unavailable_days"]) == (
        "completed",
        "2026-03-10T15:00:00Z".replace("15", "17"),
        2,
    )
    assert body["subscriptions_extended"] == 1 and body["accounts_notified"] == 1
    assert body["stripe_updates"] == {"applied": 1, "pending": 0, "rejected": 0, "skipped": 0}
    assert body["completed_by"] == "ops-bob"
    # Stripe got trial_end = old period end + 2 days, proration none, keyed by our row id.
    [update] = stripe_updates(stripe_fake, sub["id"])
    new_end = PERIOD_END + timedelta(days=2)
    assert update.params == {"trial_end": int(new_end.timestamp()), "proration_behavior": "none"}
    assert update.idempotency_key and update.idempotency_key.startswith(
        "billing:maintenance-extension:"
    )
    at_stripe = stripe_fake.get("subscription", sub["id"])
    assert at_stripe["status"] == "trialing"
    assert at_stripe["items"]["data"][0]["current_period_end"] == int(new_end.timestamp())

    mirrored = await subscription(factory, "ch_a")
    assert (mirrored.extension_days, mirrored.extension_days_in_period) == (2, 2)
    assert mirrored.current_period_end == new_end
    assert access_until(mirrored) == new_end
    for other in ("ch_gone", "ch_late"):
        assert (await subscription(factory, other)).extension_days == 0

    # The client sees it at once.
    listed = await client.get(f"{URL}/{window_id}", headers=ops)
    assert listed.json()["stripe_updates"]["applied"] == 1

    # Completing again (same end) changes nothing and calls Stripe no more.
    again = await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])
    assert again.status_code == 200
    assert again.json()["subscriptions_extended"] == 1
    assert len(stripe_updates(stripe_fake, sub["id"])) == 1
    mirrored = await subscription(factory, "ch_a")
    assert (mirrored.extension_days, mirrored.extension_days_in_period) == (2, 2)
    async with factory() as session:
        changes = list((await session.execute(select(AccessChange))).scalars())
        emails = list((await session.execute(select(OutboxEmail))).scalars())
    assert [(c.channel_id, c.access_until) for c in changes if c.channel_id == "ch_a"][-1] == (
        "ch_a",
        PERIOD_END + timedelta(days=2),
    )
    assert len([c for c in changes if c.access_until == PERIOD_END + timedelta(days=2)]) == 1
    assert [e.dedupe_key for e in emails] == [f"maintenance:{window_id}:acc_a"]

    # Another end for a completed window is a conflict.
    conflict = await complete(client, ops, window_id, "2026-03-10T18:00:00Z")
    assert (conflict.status_code, conflict.json()["code"]) == (409, "maintenance_already_completed")


async def test_stripe_period_end_arriving_later_does_not_count_the_extension_twice(
    deliver: Deliver,
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    sub = await live_subscription("acc_b", "ch_b", email="b@client.example")
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)
    await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])
    extended = PERIOD_END + timedelta(days=2)

    # Stripe's event with the new period end reaches the webhook consumer (which overwrites the
    # period and never the extension columns): nothing is counted twice.
    updates = [e for e in stripe_fake.events if e["type"] == "customer.subscription.updated"]
    await deliver(updates)
    row = await subscription(factory, "ch_b")
    assert (row.status, row.current_period_end) == ("trialing", extended)
    assert access_until(row) == extended

    # The trial ends and Stripe charges the next month from the moved date.
    stripe_fake.set_time(extended.timestamp())
    renewal = stripe_fake.renew_subscription(sub["id"])
    await deliver(renewal)
    after = await subscription(factory, "ch_b")
    assert after.current_period_start == extended
    assert after.status == "active"
    assert access_until(after) == after.current_period_end
    assert after.extension_days == 2


@pytest.mark.parametrize(
    ("timezone", "window", "days"),
    [
        ("Asia/Singapore", ACROSS_MIDNIGHT, 2),  # 23:00 → 01:00 local
        ("UTC", ACROSS_MIDNIGHT, 1),  # 15:00 → 17:00 local
        ("America/New_York", ("2026-03-10T03:30:00Z", "2026-03-10T04:30:00Z"), 2),  # 23:30 → 00:30
        # Half-open: ending exactly at local midnight does not touch the next day.
        ("Asia/Singapore", ("2026-03-10T08:00:00Z", "2026-03-10T16:00:00Z"), 1),
        # Spanning a weekend: calendar days, not business days (Fri 09:00 → Mon 09:00 = 4).
        ("Asia/Singapore", ("2026-03-13T01:00:00Z", "2026-03-16T01:00:00Z"), 4),
    ],
)
async def test_extension_counts_calendar_days_touched_in_the_business_timezone(
    settings: Settings,
    token: TokenFactory,
    live_subscription: LiveSubscription,
    timezone: str,
    window: tuple[str, str],
    days: int,
) -> None:
    await live_subscription("acc_tz", "ch_tz", email="tz@client.example")
    application = create_app(settings.model_copy(update={"business_timezone": timezone}))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            factory = application.state.session_factory
            ops = bearer(token(scope="ops"))
            window_id = await open_window(http, ops, *window, kind="emergency")
            response = await complete(http, ops, window_id, window[1])
            assert response.json()["unavailable_days"] == days
            row = await subscription(factory, "ch_tz")
            assert row.extension_days == days
            assert access_until(row) == PERIOD_END + timedelta(days=days)


async def test_a_maintenance_window_never_changes_the_refund_eligibility_quote(
    client: httpx.AsyncClient,
    ops: dict[str, str],
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    """Policy section 5: maintenance is not grounds for a refund. The quote for the paid
    period is the same before the window, after its completion extended access, and after
    Stripe's events about the pushed period end arrived."""
    sub = await live_subscription("acc_q", "ch_q", email="q@client.example")
    charge = next(c for c in stripe_fake.all("charge") if c["customer"] == sub["customer"])
    await deliver(stripe_fake.settle_charge(charge["id"], fee=143))
    client_token = bearer(token(account_id="acc_q"))

    async def quote() -> dict[str, Any]:
        response = await client.get("/v1/accounts/acc_q/refund-eligibility", headers=client_token)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    before = await quote()
    assert len(before["quotes"]) == 1
    assert before["quotes"][0]["processing_fee"] == 143
    seen = len(stripe_fake.events)
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)
    completed = await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])
    assert completed.json()["subscriptions_extended"] == 1
    assert await quote() == before
    pushed = [dict(e) for e in stripe_fake.events[seen:]]
    assert [e["type"] for e in pushed] == ["customer.subscription.updated"]
    await deliver(pushed)
    assert await quote() == before


async def test_an_end_still_in_the_future_is_refused_and_changes_nothing(
    client: httpx.AsyncClient, ops: dict[str, str]
) -> None:
    """`ended_at` in the future is 422 (README, the schema): the service is not back yet, and
    an end a few minutes ahead crossing local midnight would credit every client a calendar
    day on which nothing was unavailable. Ends up to 5 minutes ahead used to be accepted."""
    now = datetime.now(UTC).replace(microsecond=0)
    window_id = await open_window(
        client, ops, (now - timedelta(hours=1)).isoformat(), (now + timedelta(hours=1)).isoformat()
    )

    ahead = await complete(client, ops, window_id, (now + timedelta(minutes=2)).isoformat())

    assert ahead.status_code == 422, ahead.text
    shown = (await client.get(f"{URL}/{window_id}", headers=ops)).json()
    assert (shown["status"], shown["ended_at"], shown["unavailable_days"]) == ("open", None, None)
    done = await complete(client, ops, window_id, now.isoformat())
    assert done.status_code == 200, done.text


async def test_completion_never_deadlocks_with_a_batch_locking_subscriptions(
    app: FastAPI,
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
    database_url: str,
) -> None:
    """The completion locks every subscription live during the window in one statement; an
    event batch locks its subscriptions in one statement too (`LOCKED_SUBSCRIPTIONS`, and a
    lost chargeback's `SUBSCRIPTIONS_TO_REVOKE`), in the order of their Stripe ids. The
    completion took them in the order of our ids: holding one while waiting for another the
    batch held, which then wanted the first, it was the deadlock's victim (503 after
    `deadlock_timeout`, its work lost). It takes them in the batch's order."""
    subs = [
        await live_subscription(f"acc_dl_m{n}", f"ch_dl_m{n}", email=f"m{n}@client.example")
        for n in (1, 2)
    ]
    first, last = sorted(sub["id"] for sub in subs)
    async with factory() as session, session.begin():
        # our ids in the other order than Stripe's (random otherwise)
        for stripe_id, our_id in (
            (first, "00000000-0000-4000-8000-000000000002"),
            (last, "00000000-0000-4000-8000-000000000001"),
        ):
            await session.execute(
                text("UPDATE subscriptions SET id = CAST(:id AS uuid) WHERE stripe_id = :sid"),
                {"id": our_id, "sid": stripe_id},
            )
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)
    batch = await asyncpg.connect(plain_dsn(database_url))
    try:
        held = batch.transaction()
        await held.start()
        # the batch never looks for the deadlock first: the completion's backend would
        await batch.execute("SET LOCAL deadlock_timeout = '30s'")
        lock = "SELECT 1 FROM subscriptions WHERE stripe_id = $1 FOR UPDATE"
        await batch.execute(lock, first)  # its statement's first row
        completion = asyncio.create_task(complete(client, ops, window_id, ACROSS_MIDNIGHT[1]))
        await wait_for_a_lock_wait(batch)
        await batch.execute(lock, last)  # and its next
        await held.commit()
    finally:
        await batch.close()
    response = await completion
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "completed"
