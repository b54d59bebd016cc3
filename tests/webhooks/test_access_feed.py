"""The access feed records access that ends by time alone, with no Stripe event."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, text, update

from app.models import AccessChange, Subscription
from app.subscriptions.service import record_expired_access
from tests.conftest import Deliver, TokenFactory, bearer, plain_dsn
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import add_catalog, open_checkout
from tests.webhooks.test_processing import cli


async def test_an_ended_period_appears_in_the_feed_once(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    add_catalog(stripe_fake)
    session_id = await open_checkout(
        app, account_id="acc_t", purpose="subscription", channel_id="ch_t"
    )
    await deliver(stripe_fake.complete_checkout(session_id))
    async with app.state.session_factory() as session:
        subscription = await session.scalar(select(Subscription))
    assert subscription is not None
    assert subscription.current_period_end is not None
    period_end = subscription.current_period_end
    reader = bearer(token(scope="billing:read"))
    before = (await client.get("/v1/access-changes", headers=reader)).json()["data"]
    assert [(c["channel_id"], c["has_access"]) for c in before] == [("ch_t", True)]

    factory, settings = app.state.session_factory, app.state.settings
    assert await record_expired_access(factory, settings, period_end - timedelta(seconds=1)) == 0
    # Stripe's renewal never came: at the period end access stops
    assert await record_expired_access(factory, settings, period_end) == 1
    assert await record_expired_access(factory, settings, period_end + timedelta(days=1)) == 0
    after = (await client.get("/v1/access-changes", headers=reader)).json()["data"]
    assert [(c["channel_id"], c["has_access"]) for c in after] == [("ch_t", True), ("ch_t", False)]
    assert after[1]["reason"] == "period_ended"


async def test_expire_access_command_records_ended_access(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
    database_url: str,
) -> None:
    """`billing expire-access`, for deployments whose web processes run no background work."""
    add_catalog(stripe_fake)
    session_id = await open_checkout(
        app, account_id="acc_c", purpose="subscription", channel_id="ch_c"
    )
    await deliver(stripe_fake.complete_checkout(session_id))
    # a month later, with no renewal event: the period end (and what the feed recorded as
    # access_until) has passed
    ended = datetime.now(UTC) - timedelta(minutes=1)
    async with app.state.session_factory() as session, session.begin():
        subscription = await session.scalar(select(Subscription))
        assert subscription is not None
        subscription.current_period_end = ended
        await session.execute(update(AccessChange).values(access_until=ended))
    result = cli("expire-access", stripe_fake=stripe_fake, database_url=database_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "recorded 1 access ends in the access feed"
    feed = await client.get("/v1/access-changes", headers=bearer(token(scope="billing:read")))
    assert [c["has_access"] for c in feed.json()["data"]] == [True, False]


async def test_an_event_applied_after_expire_access_does_not_repeat_its_feed_entry(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    """The event processor's transaction is SERIALIZABLE: its snapshot is taken when it
    claims the events, possibly long before it gets the Stripe object's lock (held by another
    replica's batch). An access end that `expire-access` recorded meanwhile must still count
    as the channel's last entry, not be appended a second time."""
    add_catalog(stripe_fake)
    session_id = await open_checkout(
        app, account_id="acc_race", purpose="subscription", channel_id="ch_race"
    )
    await deliver(stripe_fake.complete_checkout(session_id))
    factory, settings = app.state.session_factory, app.state.settings
    async with factory() as session, session.begin():
        subscription = await session.scalar(select(Subscription))
        assert subscription is not None
        sub_id = subscription.stripe_id
        # the period ended with no renewal (at Stripe too)
        ended = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
        subscription.current_period_end = ended
        await session.execute(update(AccessChange).values(access_until=ended))
    stripe_fake.get("subscription", sub_id)["items"]["data"][0]["current_period_end"] = int(
        ended.timestamp()
    )
    # an update that does not change access, stored but not applied yet
    await deliver(stripe_fake.update_subscription(sub_id, metadata={"note": "x"}), process=False)

    async with factory() as holder, holder.begin():
        # another replica holds the subscription's lock: the batch claims, then waits
        await holder.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": sub_id}
        )
        processing = asyncio.create_task(app.state.event_processor.drain())
        for _ in range(500):
            waiting = await holder.scalar(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            )
            if waiting:
                break
            await asyncio.sleep(0.01)
        assert waiting == 1
        # meanwhile the time-based job records the end
        assert await record_expired_access(factory, settings) == 1
    await processing

    feed = await client.get("/v1/access-changes", headers=bearer(token(scope="billing:read")))
    entries = [(c["has_access"], c["access_until"], c["reason"]) for c in feed.json()["data"]]
    assert [has_access for has_access, _, _ in entries] == [True, False], entries


async def test_a_follower_of_the_feed_learns_what_the_access_check_answers(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    """A service following the feed instead of polling every channel ends on the access check's
    answer, reason included: a renewal declined (`past_due`) then paid, a cancellation at the
    period end then resumed, change the reason though not the access end."""
    add_catalog(stripe_fake)
    session_id = await open_checkout(
        app, account_id="acc_f", purpose="subscription", channel_id="ch_f"
    )
    await deliver(stripe_fake.complete_checkout(session_id))
    sub_id = str(stripe_fake.get("checkout.session", session_id)["subscription"])
    reader = bearer(token(scope="billing:read"))

    async def latest_entry_and_check() -> tuple[tuple[object, ...], tuple[object, ...]]:
        feed = (await client.get("/v1/access-changes", headers=reader)).json()["data"]
        check = (await client.get("/v1/channels/ch_f/access", headers=reader)).json()
        last = feed[-1]
        return (
            (last["has_access"], last["access_until"], last["reason"]),
            (check["has_access"], check["access_until"], check["reason"]),
        )

    await deliver(stripe_fake.renew_subscription(sub_id, paid=False))
    entry, check = await latest_entry_and_check()
    assert entry == check and check[2] == "subscription_past_due"
    invoice = str(stripe_fake.get("subscription", sub_id)["latest_invoice"])
    for step in (
        lambda: stripe_fake.pay_invoice(invoice),
        lambda: stripe_fake.update_subscription(sub_id, cancel_at_period_end=True),
        lambda: stripe_fake.update_subscription(sub_id, cancel_at_period_end=False),
    ):
        await deliver(step())
        entry, check = await latest_entry_and_check()
        assert entry == check


@pytest.mark.parametrize("batch_holds", ["first", "last"])
async def test_the_expiry_sweep_never_deadlocks_with_an_applying_batch(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver, database_url: str, batch_holds: str
) -> None:
    """The sweep (`record_expired_access`, every minute beside the event processor) takes the
    feed locks of every expired channel. An event batch takes channels' feed locks once per
    group that changes access (subscriptions, then each refund, then lost disputes), so it
    may hold a later channel's and then want an earlier one's: a sweep holding the earlier
    one while waiting for the later would close a cycle (Postgres breaks it after
    `deadlock_timeout`: ~1 s of stalled events and a failed side). The sweep leaves the
    channels another transaction holds to its next run, whichever of the two the batch holds
    first."""
    add_catalog(stripe_fake)
    channels = ["ch_sweep_a", "ch_sweep_b"]
    for channel in channels:
        session_id = await open_checkout(
            app, account_id=f"acc_{channel}", purpose="subscription", channel_id=channel
        )
        await deliver(stripe_fake.complete_checkout(session_id))
    ended = datetime.now(UTC) - timedelta(minutes=1)
    factory, settings = app.state.session_factory, app.state.settings
    async with factory() as session, session.begin():
        await session.execute(update(Subscription).values(current_period_end=ended))
        await session.execute(update(AccessChange).values(access_until=ended))
    held, other = channels if batch_holds == "first" else channels[::-1]
    lock = "SELECT pg_advisory_xact_lock(hashtextextended('channel:' || $1::text, 0))"
    batch = await asyncpg.connect(plain_dsn(database_url))
    admin = await asyncpg.connect(plain_dsn(database_url))
    try:
        await batch.execute("BEGIN")
        await batch.execute(lock, held)
        sweep = asyncio.create_task(record_expired_access(factory, settings))
        for _ in range(500):  # until the sweep ends or waits for the held channel
            if sweep.done() or await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            ):
                break
            await asyncio.sleep(0.02)
        await batch.execute(lock, other)  # the batch's next group
        await batch.execute("COMMIT")
        assert await sweep == 1  # the one the batch did not hold
    finally:
        await batch.close()
        await admin.close()
    assert await record_expired_access(factory, settings) == 1  # the other, at the next run
    async with factory() as session:
        ends = (
            await session.scalars(
                select(AccessChange.channel_id).where(AccessChange.has_access.is_(False))
            )
        ).all()
    assert sorted(ends) == channels
