"""Maintenance extensions reach Stripe exactly once and heal themselves after a crash.

The crash that matters is the one after Stripe applied `trial_end` but before we recorded its
answer: the Stripe fake's `lost_response` failure applies the update (and keeps the answer
under the idempotency key) and then answers 500, which is what the service sees when it
dies or its connection drops at that moment. Nothing is recorded; Stripe's event with the new
period end is on its way."""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from app.config import Settings
from app.maintenance.service import retry_pending_extensions
from app.models import MaintenanceExtension
from app.subscriptions.access import access_until
from tests.conftest import (
    Deliver,
    TokenFactory,
    bearer,
    process_env,
)
from tests.maintenance.conftest import PERIOD_START, LiveSubscription
from tests.maintenance.test_completion import (
    ACROSS_MIDNIGHT,
    PERIOD_END,
    Factory,
    complete,
    open_window,
    subscription,
)
from tests.robustness.test_cli_failures import billing
from tests.stripe_fake import StripeFake

EXTENDED = PERIOD_END + timedelta(days=2)  # ACROSS_MIDNIGHT touches two Singapore dates
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ops(token: TokenFactory) -> dict[str, str]:
    return bearer(token(scope="ops", sub="ops-carol"))


def pushes(stripe_fake: StripeFake, stripe_id: str) -> list[Any]:
    return stripe_fake.requests_to("POST", f"/v1/subscriptions/{stripe_id}")


def subscription_events(stripe_fake: StripeFake, seen: int) -> list[dict[str, Any]]:
    return [
        e for e in stripe_fake.events_since(seen) if e["type"] == "customer.subscription.updated"
    ]


async def api_access_until(
    client: httpx.AsyncClient, token: TokenFactory, account_id: str
) -> datetime:
    response = await client.get(
        f"/v1/accounts/{account_id}/subscriptions", headers=bearer(token(account_id=account_id))
    )
    assert response.status_code == 200, response.text
    [row] = response.json()["data"]
    return datetime.fromisoformat(row["access_until"])


async def extension_row(factory: Factory) -> MaintenanceExtension:
    async with factory() as session:
        return (await session.execute(select(MaintenanceExtension))).scalar_one()


async def crash_after_stripe_answered(
    client: httpx.AsyncClient,
    ops: dict[str, str],
    stripe_fake: StripeFake,
    sub: dict[str, Any],
) -> None:
    """Complete a window while every attempt's answer is lost after Stripe applied it."""
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)
    stripe_fake.fail_next(
        2, 500, kind="lost_response", path_prefix=f"/v1/subscriptions/{sub['id']}", method="POST"
    )
    response = await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])
    assert response.status_code == 200, response.text
    assert response.json()["stripe_updates"]["pending"] == 1
    at_stripe = stripe_fake.get("subscription", sub["id"])
    assert at_stripe["items"]["data"][0]["current_period_end"] == int(EXTENDED.timestamp())


async def test_stripe_event_after_a_crash_that_lost_stripes_answer_never_counts_days_twice(
    app: FastAPI,
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    sub = await live_subscription("acc_x1", "ch_x1", email="x1@client.example")
    seen = len(stripe_fake.events)
    await crash_after_stripe_answered(client, ops, stripe_fake, sub)

    # Nothing recorded: the days show outside Stripe's (stored) period.
    row = await subscription(factory, "ch_x1")
    assert (row.current_period_end, row.extension_days, row.extension_days_in_period) == (
        PERIOD_END,
        2,
        0,
    )
    assert await api_access_until(client, token, "acc_x1") == EXTENDED

    # Stripe's event with the moved period end arrives before any retry.
    await deliver(subscription_events(stripe_fake, seen))
    row = await subscription(factory, "ch_x1")
    assert (row.current_period_end, row.extension_days, row.extension_days_in_period) == (
        EXTENDED,
        2,
        2,
    )
    assert access_until(row) == EXTENDED
    assert await api_access_until(client, token, "acc_x1") == EXTENDED
    assert (await extension_row(factory)).stripe_status == "pending"

    # The retry job settles the row; Stripe's period already holds it, so it is not re-sent.
    settled = await retry_pending_extensions(factory, app.state.stripe)

    assert settled == 1
    extension = await extension_row(factory)
    assert (extension.stripe_status, extension.stripe_period_end) == ("applied", EXTENDED)
    attempts = pushes(stripe_fake, sub["id"])
    assert len({r.idempotency_key for r in attempts}) == 1
    assert [r.replayed for r in attempts] == [False, True]  # Stripe applied it once
    assert await api_access_until(client, token, "acc_x1") == EXTENDED
    assert await retry_pending_extensions(factory, app.state.stripe) == 0


async def test_retry_job_confirms_an_update_stripe_applied_and_the_late_event_adds_nothing(
    app: FastAPI,
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    sub = await live_subscription("acc_x2", "ch_x2", email="x2@client.example")
    seen = len(stripe_fake.events)
    await crash_after_stripe_answered(client, ops, stripe_fake, sub)

    settled = await retry_pending_extensions(factory, app.state.stripe)

    assert settled == 1
    # Stripe's subscription already holds the target: confirmed from it, not sent again.
    attempts = pushes(stripe_fake, sub["id"])
    assert len({r.idempotency_key for r in attempts}) == 1
    assert [(r.replayed, r.status) for r in attempts] == [(False, 500), (True, 500)]
    row = await subscription(factory, "ch_x2")
    assert (row.current_period_end, row.extension_days_in_period, row.status) == (
        EXTENDED,
        2,
        "trialing",
    )
    assert access_until(row) == EXTENDED

    # The event Stripe sent for the update arrives late, then the moved renewal.
    await deliver(subscription_events(stripe_fake, seen))
    assert access_until(await subscription(factory, "ch_x2")) == EXTENDED
    stripe_fake.set_time(EXTENDED.timestamp())
    await deliver(stripe_fake.renew_subscription(sub["id"]))
    renewed = await subscription(factory, "ch_x2")
    assert renewed.current_period_start == EXTENDED
    assert access_until(renewed) == renewed.current_period_end
    assert (renewed.extension_days, renewed.extension_days_in_period) == (2, 2)
    assert await api_access_until(client, token, "acc_x2") == renewed.current_period_end


async def test_an_older_stripe_snapshot_arriving_after_the_push_neither_drops_nor_doubles_days(
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    sub = await live_subscription("acc_x3", "ch_x3", email="x3@client.example")
    # A change at Stripe whose event is delayed until after the push was recorded.
    stripe_fake.set_time((PERIOD_START + timedelta(minutes=1)).timestamp())
    delayed = stripe_fake.update_subscription(sub["id"], metadata={"note": "delayed"})
    stripe_fake.set_time((PERIOD_START + timedelta(minutes=2)).timestamp())
    seen = len(stripe_fake.events)
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)
    response = await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])
    assert response.json()["stripe_updates"]["applied"] == 1
    assert access_until(await subscription(factory, "ch_x3")) == EXTENDED

    await deliver(delayed)  # Stripe's period before the push: the days are outside it again
    row = await subscription(factory, "ch_x3")
    assert (row.current_period_end, row.extension_days_in_period) == (PERIOD_END, 0)
    assert access_until(row) == EXTENDED

    await deliver(subscription_events(stripe_fake, seen))
    row = await subscription(factory, "ch_x3")
    assert (row.current_period_end, row.extension_days_in_period) == (EXTENDED, 2)
    assert access_until(row) == EXTENDED


async def test_a_target_stripes_period_already_passed_is_not_pushed(
    app: FastAPI,
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    """Stripe stayed down until the subscription renewed without the extension: pushing the
    old target would cut the newly paid period short, so the row is rejected and the days stay
    in access_until."""
    sub = await live_subscription("acc_x4", "ch_x4", email="x4@client.example")
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)
    stripe_fake.fail_next(2, 500, path_prefix=f"/v1/subscriptions/{sub['id']}", method="POST")
    await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])
    stripe_fake.set_time(PERIOD_END.timestamp())
    await deliver(stripe_fake.renew_subscription(sub["id"]))
    renewed = await subscription(factory, "ch_x4")
    assert renewed.current_period_end is not None and renewed.current_period_end > EXTENDED
    requests_before = len(pushes(stripe_fake, sub["id"]))

    assert await retry_pending_extensions(factory, app.state.stripe) == 1

    extension = await extension_row(factory)
    assert extension.stripe_status == "rejected"
    assert extension.last_error and extension.last_error.startswith("target_passed")
    assert len(pushes(stripe_fake, sub["id"])) == requests_before
    row = await subscription(factory, "ch_x4")
    assert access_until(row) == renewed.current_period_end + timedelta(days=2)


async def test_push_extensions_command_retries_pending_pushes_with_the_same_key(
    settings: Settings,
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    """`billing push-extensions`, for deployments without background workers."""
    sub = await live_subscription("acc_x5", "ch_x5", email="x5@client.example")
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)
    stripe_fake.fail_next(2, 500, path_prefix=f"/v1/subscriptions/{sub['id']}", method="POST")
    await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])
    assert (await extension_row(factory)).stripe_status == "pending"

    env = process_env(settings.database_url, stripe_fake.url)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app.cli",
        "push-extensions",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()

    assert process.returncode == 0, stderr.decode()
    assert "settled 1 pending maintenance extension pushes" in stdout.decode()
    extension = await extension_row(factory)
    assert extension.stripe_status == "applied"
    attempts = pushes(stripe_fake, sub["id"])
    assert len({r.idempotency_key for r in attempts}) == 1
    assert [r.status for r in attempts] == [500, 500, 200]
    row = await subscription(factory, "ch_x5")
    assert (row.current_period_end, row.extension_days_in_period) == (EXTENDED, 2)
    assert access_until(row) == EXTENDED
    assert row.current_period_end.tzinfo is not None
    assert row.current_period_end > datetime(2026, 1, 1, tzinfo=UTC)


async def test_push_extensions_command_exits_non_zero_while_stripe_fails_and_settles_when_run_again(
    settings: Settings,
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    """Run by cron while Stripe is down, `billing push-extensions` says the pushes stay
    pending because Stripe failed and exits 1 (it printed "settled 0" and exited 0, so a
    days-long outage looked like nothing to do); run again once Stripe is back, it settles
    them under the same key."""
    sub = await live_subscription("acc_x6", "ch_x6", email="x6@client.example")
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)
    path = f"/v1/subscriptions/{sub['id']}"
    stripe_fake.fail_next(2, 500, path_prefix=path)
    await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])
    stripe_fake.fail_next(5, 503, path_prefix=path)  # still down when cron runs

    down = billing(
        "push-extensions", database_url=settings.database_url, stripe_url=stripe_fake.url
    )

    assert down.returncode == 1, down.stdout + down.stderr
    assert "Traceback" not in down.stderr, down.stderr
    assert "Stripe" in down.stderr and "pending" in down.stderr, down.stderr
    assert (await extension_row(factory)).stripe_status == "pending"

    stripe_fake.clear_failures()
    back = billing(
        "push-extensions", database_url=settings.database_url, stripe_url=stripe_fake.url
    )

    assert back.returncode == 0, back.stderr
    assert "settled 1 pending maintenance extension pushes" in back.stdout
    assert (await extension_row(factory)).stripe_status == "applied"
    assert len({r.idempotency_key for r in pushes(stripe_fake, sub["id"])}) == 1


async def test_completion_while_stripe_times_out_waits_for_one_push_not_one_per_subscription(
    app: FastAPI,
    settings: Settings,
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    """Stripe timing out: the completion pushes until the first outage, then answers, the other
    pushes left `pending` for the retry job (each would wait out every timeout and retry, so a
    window over many subscriptions would hold the request for as many times that)."""
    subs = [
        await live_subscription(f"acc_to{i}", f"ch_to{i}", email=f"to{i}@client.example")
        for i in range(3)
    ]
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)
    delay = settings.stripe_timeout_seconds + 0.5
    attempts = settings.stripe_max_network_retries + 1
    stripe_fake.fail_next(
        attempts * len(subs), kind="timeout", delay=delay, path_prefix="/v1/subscriptions/"
    )
    started = time.monotonic()
    response = await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.json()["stripe_updates"]["pending"] == len(subs)
    one_push = attempts * (settings.stripe_timeout_seconds + 2.0)
    assert elapsed < one_push, elapsed
    asked = [
        s["id"] for s in subs if stripe_fake.requests_to("GET", f"/v1/subscriptions/{s['id']}")
    ]
    assert len(asked) == 1, asked

    # Stripe recovers (the timed-out update lands first): the retry job pushes every one,
    # each under its own row's key, once.
    await asyncio.sleep(delay - settings.stripe_timeout_seconds + 0.3)
    stripe_fake.clear_failures()
    await retry_pending_extensions(factory, app.state.stripe)
    async with factory() as session:
        rows = (await session.execute(select(MaintenanceExtension))).scalars().all()
    assert sorted(r.stripe_status for r in rows) == ["applied"] * len(subs)
    for sub in subs:
        keys = {r.idempotency_key for r in pushes(stripe_fake, sub["id"])}
        assert len(keys) == 1, keys
        at_stripe = stripe_fake.get("subscription", sub["id"])
        assert at_stripe["items"]["data"][0]["current_period_end"] == int(EXTENDED.timestamp())


async def test_a_renewal_not_yet_mirrored_is_not_cut_short_by_the_push(
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    """Stripe renewed (and charged) the subscription shortly before the completion, and its
    events have not reached us yet: our mirror still shows the old period. Pushing the target
    it gives (the old period end plus the days) would make the newly paid period a trial
    ending two days later, after which Stripe charges again: the client would pay twice. The
    days stay in access_until instead."""
    sub = await live_subscription("acc_x9", "ch_x9", email="x9@client.example")
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)
    stripe_fake.set_time(PERIOD_END.timestamp())
    renewal = stripe_fake.renew_subscription(sub["id"])  # delivered only after the completion
    paid_until = stripe_fake.get("subscription", sub["id"])["items"]["data"][0][
        "current_period_end"
    ]

    done = await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])

    assert done.status_code == 200, done.text
    at_stripe = stripe_fake.get("subscription", sub["id"])
    assert at_stripe["status"] == "active"
    assert at_stripe["items"]["data"][0]["current_period_end"] == paid_until
    assert done.json()["stripe_updates"]["rejected"] == 1
    await deliver(renewal)
    row = await subscription(factory, "ch_x9")
    assert access_until(row) == datetime.fromtimestamp(paid_until, UTC) + timedelta(days=2)
