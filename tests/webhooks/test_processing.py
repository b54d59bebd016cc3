"""Retries, parking and replay; reconciliation of undelivered events; endpoint registration;
payload pruning."""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from app.config import Settings
from app.models import LedgerEntry, StripeEvent, Subscription
from app.stripe_gateway import API_VERSION
from app.webhooks.handlers import HANDLED_EVENT_TYPES
from app.webhooks.processor import MAX_ATTEMPTS, prune_payloads
from app.webhooks.reconcile import register_webhook_endpoint
from tests.conftest import (
    ROOT,
    WEBHOOK_SECRET,
    Deliver,
    bearer,
    plain_dsn,
    process_env,
)
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import add_catalog, open_checkout
from tests.webhooks.lifecycle import run_lifecycle, snapshot


async def make_due(database_url: str) -> None:
    """Let the backoff elapse (instead of waiting it out)."""
    conn = await asyncpg.connect(plain_dsn(database_url))
    try:
        await conn.execute(
            "UPDATE stripe_events SET next_attempt_at = now() WHERE status = 'pending'"
        )
    finally:
        await conn.close()


async def test_a_failing_event_is_retried_parked_listed_and_replayed(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    database_url: str,
    token,  # type: ignore[no-untyped-def]
) -> None:
    add_catalog(stripe_fake)
    session_id = await open_checkout(
        app, account_id="acc_retry", purpose="subscription", channel_id="chan_retry"
    )
    start = len(stripe_fake.events)
    await deliver(stripe_fake.complete_checkout(session_id))
    created = next(
        e for e in stripe_fake.events[start:] if e["type"] == "customer.subscription.created"
    )
    sub_id = created["data"]["object"]["id"]
    # another event of the same second: only Stripe's current state can order the two, and
    # Stripe answers 500 to every look-up of it: 4 requests per attempt (the batch, then the
    # event alone, each with one SDK retry)
    same_second = copy.deepcopy(created)
    same_second["id"] += "_again"
    same_second["data"]["object"]["cancel_at_period_end"] = True
    stripe_fake.fail_next(4 * MAX_ATTEMPTS, 500, path_prefix=f"/v1/subscriptions/{sub_id}")
    await deliver([same_second], process=False)
    processor = app.state.event_processor
    for attempt in range(1, MAX_ATTEMPTS + 1):
        await processor.drain()
        async with app.state.session_factory() as session:
            row = await session.scalar(
                select(StripeEvent).where(StripeEvent.stripe_id == same_second["id"])
            )
        assert row is not None
        assert row.attempts == attempt
        if attempt < MAX_ATTEMPTS:
            assert row.status == "pending"
            assert row.next_attempt_at is not None
            await make_due(database_url)
    assert row.status == "failed"
    assert "StripeUnavailable" in (row.last_error or "")

    ops = bearer(token(scope="ops", sub="oncall@1msg.io"))
    listed = await client.get("/v1/ops/stripe-events", params={"status": "failed"}, headers=ops)
    assert listed.status_code == 200
    assert [(e["id"], e["attempts"]) for e in listed.json()["data"]] == [
        (row.stripe_id, MAX_ATTEMPTS)
    ]
    # an empty filter (what a form sends for "any status") filters nothing, as on every list
    every = await client.get("/v1/ops/stripe-events", params={"status": ""}, headers=ops)
    assert every.status_code == 200, every.text
    assert row.stripe_id in {e["id"] for e in every.json()["data"]}
    assert len(every.json()["data"]) > len(listed.json()["data"])
    user = bearer(token(account_id="acc_retry"))
    assert (await client.get("/v1/ops/stripe-events", headers=user)).status_code == 403

    replayed = await client.post(f"/v1/ops/stripe-events/{row.stripe_id}/replay", headers=ops)
    assert replayed.status_code == 200
    assert replayed.json()["status"] == "pending"
    again = await client.post(f"/v1/ops/stripe-events/{row.stripe_id}/replay", headers=ops)
    assert again.status_code == 409
    missing = await client.post("/v1/ops/stripe-events/evt_nope/replay", headers=ops)
    assert missing.status_code == 404
    await processor.drain()
    async with app.state.session_factory() as session:
        subscription = await session.scalar(
            select(Subscription).where(Subscription.stripe_id == sub_id)
        )
        event_row = await session.scalar(
            select(StripeEvent).where(StripeEvent.stripe_id == row.stripe_id)
        )
    assert subscription is not None
    assert subscription.cancel_at_period_end is False  # Stripe's current state
    assert event_row is not None
    assert event_row.status == "processed"


def cli(*args: str, stripe_fake: StripeFake, database_url: str) -> subprocess.CompletedProcess[str]:
    env = process_env(database_url, stripe_fake.url)
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_reconcile_recovers_events_that_were_never_delivered(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver, database_url: str
) -> None:
    life = await run_lifecycle(app, stripe_fake)
    delivered = life.events[::3]  # Stripe gave up on two thirds of the deliveries
    await deliver(delivered)
    result = cli("reconcile-events", "--apply", stripe_fake=stripe_fake, database_url=database_url)
    assert result.returncode == 0, result.stderr
    everything = [dict(e) for e in stripe_fake.events]  # incl. events before the lifecycle
    missing = len(everything) - len(delivered)
    assert f"recovered {missing} events that had not been delivered" in result.stdout
    async with app.state.session_factory() as session:
        rows = (await session.scalars(select(StripeEvent))).all()
    assert sorted(r.stripe_id for r in rows) == sorted(e["id"] for e in everything)
    assert {r.status for r in rows} <= {"processed", "ignored"}
    recovered = await snapshot(app)
    assert recovered["subscriptions"][life.subscription_id][3] == "canceled"
    assert recovered["disputes"][life.dispute_id][1] == "lost"

    again = cli("reconcile-events", stripe_fake=stripe_fake, database_url=database_url)
    assert "recovered 0 events" in again.stdout


async def test_a_default_reconcile_recovers_an_event_missed_before_later_deliveries(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver, database_url: str
) -> None:
    started = time.time()
    stripe_fake.set_time(started - 2 * 3600)
    add_catalog(stripe_fake)
    missed_id = await open_checkout(app, account_id="acc_missed", purpose="top_up", amount=1000)
    missed = stripe_fake.complete_checkout(missed_id)  # we answered 5xx (an outage)
    stripe_fake.set_time(started - 3600)  # an hour later deliveries work again
    later_id = await open_checkout(app, account_id="acc_later", purpose="top_up", amount=2000)
    await deliver(stripe_fake.complete_checkout(later_id))
    stripe_fake.set_time(None)

    result = cli("reconcile-events", "--apply", stripe_fake=stripe_fake, database_url=database_url)
    assert result.returncode == 0, result.stderr
    async with app.state.session_factory() as session:
        stored = set((await session.scalars(select(StripeEvent.stripe_id))).all())
        credited = (await session.execute(select(LedgerEntry.account_id, LedgerEntry.amount))).all()
    assert {e["id"] for e in missed} <= stored
    assert sorted(credited) == [("acc_later", 2000), ("acc_missed", 1000)]


async def test_register_webhook_pins_the_api_version_and_the_events_used(
    app: FastAPI, stripe_fake: StripeFake
) -> None:
    url = "https://billing.1msg.io/webhooks/stripe"
    created = await register_webhook_endpoint(app.state.stripe, url)
    assert created["api_version"] == API_VERSION
    assert sorted(created["enabled_events"]) == sorted(HANDLED_EVENT_TYPES)
    assert created["secret"]
    updated = await register_webhook_endpoint(app.state.stripe, url)
    assert updated["id"] == created["id"]
    assert len(stripe_fake.all("webhook_endpoint")) == 1

    # Stripe disables an endpoint that kept failing; registering it again re-enables it
    stripe_fake.get("webhook_endpoint", created["id"])["status"] = "disabled"
    again = await register_webhook_endpoint(app.state.stripe, url)
    assert (again["id"], again["status"]) == (created["id"], "enabled")


async def test_old_payloads_are_pruned_but_late_duplicates_still_recognised(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    database_url: str,
) -> None:
    add_catalog(stripe_fake)
    session_id = await open_checkout(app, account_id="acc_old", purpose="top_up", amount=1000)
    events = stripe_fake.complete_checkout(session_id)
    await deliver(events)
    conn = await asyncpg.connect(plain_dsn(database_url))
    try:
        await conn.execute("UPDATE stripe_events SET received_at = now() - interval '31 days'")
    finally:
        await conn.close()
    assert await prune_payloads(app.state.session_factory, 30) == len(events)
    async with app.state.session_factory() as session:
        payloads = (await session.scalars(select(StripeEvent.payload))).all()
    assert payloads == [None] * len(events)
    # SQL NULL, not the JSON value `null` (which reads as None too): the next hourly run
    # finds nothing left to prune instead of rewriting every pruned event again
    conn = await asyncpg.connect(plain_dsn(database_url))
    try:
        kept = await conn.fetchval("SELECT count(*) FROM stripe_events WHERE payload IS NOT NULL")
    finally:
        await conn.close()
    assert kept == 0
    assert await prune_payloads(app.state.session_factory, 30) == 0
    body, headers = stripe_fake.signed_event(events[-1], WEBHOOK_SECRET)
    late = await client.post("/webhooks/stripe", content=body, headers=headers)
    assert late.json() == {"received": True, "duplicate": True}


async def test_reconcile_since_a_date_without_offset_is_read_as_utc(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver, database_url: str
) -> None:
    """`--since ISO` takes what an operator types: a date or a time with no offset is UTC
    (it was compared with aware times: a traceback); an unreadable one is a usage error."""
    life = await run_lifecycle(app, stripe_fake)
    since = datetime.now(UTC) - timedelta(days=1)
    recovered = []
    for typed in (since.strftime("%Y-%m-%d"), since.strftime("%Y-%m-%dT%H:%M:%S")):
        result = cli(
            "reconcile-events", "--since", typed, stripe_fake=stripe_fake, database_url=database_url
        )
        assert result.returncode == 0, result.stderr
        recovered.append(result.stdout)
    assert f"recovered {len(stripe_fake.events)} events" in recovered[0]
    assert "recovered 0 events" in recovered[1]
    assert life.events
    bad = cli(
        "reconcile-events",
        "--since",
        "yesterday",
        stripe_fake=stripe_fake,
        database_url=database_url,
    )
    assert bad.returncode == 2
    assert "--since" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("currency", "usdollars", "StringDataRightTruncation"),  # its column holds 3
        ("payment_intent", "pi_\x00", "CharacterNotInRepertoire"),  # no lock key of it
    ],
)
async def test_an_event_the_database_refuses_is_retried_alone_and_holds_up_no_other(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver, field: str, value: str, error: str
) -> None:
    """A signed event with a value Postgres refuses (a currency longer than its column, an
    id with a NUL character as its advisory lock's key) fails in Postgres itself. Its
    failure is rolled back to its savepoint and recorded (retried with backoff, parked after
    `MAX_ATTEMPTS`); the transaction goes on, so the events after it are applied. (The
    savepoint was never sent, the handlers' statements going straight to the driver, and
    the lock was taken before it: the aborted transaction could record nothing, and the
    processor claimed the same event again and again, applying nothing after it.)"""
    first = await open_checkout(app, account_id="acc_refused", purpose="top_up", amount=5000)
    second = await open_checkout(app, account_id="acc_refused", purpose="top_up", amount=700)
    charge = next(
        e for e in stripe_fake.complete_checkout(first) if e["type"] == "charge.succeeded"
    )
    refused = copy.deepcopy(charge)
    refused["id"] = f"{charge['id']}_refused"
    refused["data"]["object"][field] = value
    await deliver([refused, *stripe_fake.complete_checkout(second)], process=False)

    processor = app.state.event_processor
    for _ in range(3):  # a batch, then its events one per transaction
        await processor.process_due()
    async with app.state.session_factory() as session:
        credited = (
            await session.scalars(
                select(LedgerEntry.amount).where(LedgerEntry.account_id == "acc_refused")
            )
        ).all()
        row = await session.scalar(
            select(StripeEvent).where(StripeEvent.stripe_id == refused["id"])
        )
    assert credited == [700]
    assert row is not None
    assert (row.status, row.attempts) == ("pending", 1)
    assert row.next_attempt_at is not None
    assert error in (row.last_error or "")


async def test_register_webhook_retried_after_a_lost_answer_and_a_429_makes_one_endpoint(
    app: FastAPI, stripe_fake: StripeFake, settings: Settings
) -> None:
    """The create's answer is lost (Stripe made the endpoint, the SDK's retry is rate
    limited, and the service retries after `Retry-After`): every attempt carries one
    idempotency key, so Stripe replays the first endpoint instead of making a second one
    (whose events would arrive twice, signed with a secret nobody was told)."""
    url = "https://billing.1msg.io/webhooks/stripe"
    delay = settings.stripe_timeout_seconds + 0.5
    path = "/v1/webhook_endpoints"
    stripe_fake.fail_next(1, kind="timeout", delay=delay, path_prefix=path, method="POST")
    stripe_fake.fail_next(1, 429, retry_after=1, path_prefix=path, method="POST")
    created = await register_webhook_endpoint(app.state.stripe, url)
    await asyncio.sleep(delay - settings.stripe_timeout_seconds + 0.3)  # the lost one lands
    posts = stripe_fake.requests_to("POST", path)
    assert len(posts) == 3, [p.status for p in posts]
    assert len({p.idempotency_key for p in posts}) == 1, [p.idempotency_key for p in posts]
    assert [e["id"] for e in stripe_fake.all("webhook_endpoint")] == [created["id"]]
