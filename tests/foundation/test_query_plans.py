"""Queries the background workers run every round must not read the history: on a database
seeded with a few hundred thousand rows of what a year of billing leaves (sent emails,
applied events, access changes, ...), each job's own statements are planned with an index, no
sequential scan and no sort of the history. The plans are the ones Postgres really chose for
the code's statements (auto_explain, loaded per connection, which takes the superuser the
suite's admin URL is; its plans are sent to the client as log messages), not hand-written
copies. The module seeds a database of its own."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from app.config import Settings
from app.idempotency import prune_expired_keys
from app.maintenance.service import retry_pending_extensions
from app.notifications.worker import park_stale_sending
from app.refunds.metrics import REFUND_REQUESTS_OVERDUE, refresh_refund_metrics
from app.refunds.repository import list_requests
from app.stripe_gateway import StripeGateway
from app.subscriptions.service import record_expired_access
from app.webhooks.processor import prune_payloads
from tests.conftest import alembic, create_database, drop_database, make_settings, plain_dsn

HISTORY = 200_000

SEED = [
    "INSERT INTO accounts(id) SELECT 'acc_' || g FROM generate_series(1, 2000) g",
    "INSERT INTO channels(id, account_id) SELECT 'ch_' || g, 'acc_' || g"
    " FROM generate_series(1, 2000) g",
    # a year of sent notices
    "INSERT INTO outbox_emails(id, dedupe_key, to_address, subject, body, status, attempts,"
    " claimed_at, sent_at, created_at, next_attempt_at)"
    " SELECT gen_random_uuid(), 'notice:' || g, 'client@example.com', 'Your refund', 'text',"
    " 'sent', 1, now() - make_interval(mins => g), now() - make_interval(mins => g),"
    " now() - make_interval(mins => g), now() - make_interval(mins => g)"
    f" FROM generate_series(1, {HISTORY}) g",
    # each channel's access changed every few days; the last change of each runs on
    "INSERT INTO access_changes(channel_id, account_id, has_access, access_until, reason)"
    " SELECT 'ch_' || (g % 2000 + 1), 'acc_' || (g % 2000 + 1), true,"
    f" now() + make_interval(hours => g - {HISTORY - 2000}), 'active'"
    f" FROM generate_series(1, {HISTORY}) g",
    # a hundred maintenance windows, each extending every subscription, all at Stripe
    "INSERT INTO subscriptions(id, stripe_id, account_id, channel_id, status)"
    " SELECT gen_random_uuid(), 'sub_' || g, 'acc_' || g, 'ch_' || g, 'active'"
    " FROM generate_series(1, 2000) g",
    "INSERT INTO maintenance_windows(id, kind, reason, starts_at, ends_at, business_days,"
    " created_by) SELECT gen_random_uuid(), 'scheduled', 'upgrade', now(), now(), 1, 'ops'"
    " FROM generate_series(1, 100)",
    "INSERT INTO maintenance_extensions(window_id, subscription_id, account_id, channel_id,"
    " days, credited_dates, stripe_status) SELECT w.id, s.id, s.account_id, s.channel_id, 1,"
    " '{}', 'applied' FROM maintenance_windows w CROSS JOIN subscriptions s",
    # years of refund and appeal requests, answered and closed
    "INSERT INTO refund_requests(id, account_id, type, status, description, about_payment,"
    " channel, filed_by, received_at, clock_started_at, first_response_due, decision_due,"
    " first_responded_at, decided_at, outcome)"
    " SELECT gen_random_uuid(), 'acc_' || (g % 2000 + 1), 'refund', 'closed', 'Please.',"
    " false, 'api', 'client', now() - make_interval(hours => g), now() - make_interval(hours"
    " => g), now() - make_interval(hours => g - 72), now() - make_interval(hours => g - 300),"
    " now() - make_interval(hours => g - 24), now() - make_interval(hours => g - 48),"
    f" 'rejected' FROM generate_series(1, {HISTORY}) g",
    # a year of applied events, their payloads pruned but for the last days'
    "INSERT INTO stripe_events(stripe_id, type, stripe_created, livemode, status, received_at,"
    " processed_at, payload) SELECT 'evt_' || g, 'invoice.paid', now(), false, 'processed',"
    " now() - make_interval(mins => g), now() - make_interval(mins => g),"
    " CASE WHEN g < 5000 THEN '{}'::json END"
    f" FROM generate_series(1, {HISTORY}) g",
    # a day of usage charges, each reported under its Idempotency-Key
    "INSERT INTO idempotency_records(principal_sub, account_id, method, path, key,"
    " request_hash, response_status, response_body, created_at)"
    " SELECT 'conversation-service', 'acc_' || (g % 2000 + 1), 'POST',"
    " '/v1/accounts/acc_' || (g % 2000 + 1) || '/usage-charges', 'conv-' || g, 'h', 201,"
    " '{}', now() - make_interval(secs => g * 0.4)"
    f" FROM generate_series(1, {HISTORY}) g",
    "ANALYZE",
]


@dataclass
class Planned:
    """A session factory whose statements' plans are collected in `plans`."""

    engine: AsyncEngine
    factory: async_sessionmaker[Any]
    settings: Settings
    plans: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
async def seeded_url() -> AsyncIterator[str]:
    name = f"billing_test_plans_{os.getpid()}_{secrets.token_hex(3)}"
    url = await create_database(name)
    try:
        upgraded = alembic(url, "upgrade", "head")
        assert upgraded.returncode == 0, upgraded.stderr
        conn = await asyncpg.connect(plain_dsn(url))
        try:
            for statement in SEED:
                await conn.execute(statement)
        finally:
            await conn.close()
        yield url
    finally:
        await drop_database(name)


@pytest.fixture
async def planned(seeded_url: str) -> AsyncIterator[Planned]:
    engine = create_async_engine(
        seeded_url,
        connect_args={
            "server_settings": {
                "session_preload_libraries": "auto_explain",
                "auto_explain.log_min_duration": "0",
                "client_min_messages": "log",
            }
        },
    )
    found = Planned(
        engine,
        async_sessionmaker(engine, expire_on_commit=False),
        make_settings(seeded_url, "http://127.0.0.1:9"),
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _collect(dbapi_connection: Any, _: Any) -> None:
        dbapi_connection.driver_connection.add_log_listener(
            lambda _conn, message: found.plans.append(str(message.message))
        )

    yield found
    await engine.dispose()


def assert_indexed(plan: str) -> None:
    """No sequential scan and no sort: what the plan reads does not grow with the history."""
    assert "Seq Scan" not in plan, plan
    assert "Sort" not in plan, plan


async def test_parking_stale_sending_emails_reads_no_sent_history(planned: Planned) -> None:
    parked = await park_stale_sending(planned.factory, planned.settings, datetime.now(UTC))
    assert parked == []
    [plan] = [p for p in planned.plans if "UPDATE outbox_emails" in p]
    assert_indexed(plan)


async def test_the_access_expiry_sweep_reads_no_access_history(planned: Planned) -> None:
    """Every minute: the channels whose last feed entry gave access that has run out."""
    assert await record_expired_access(planned.factory, planned.settings) == 0
    [plan] = [p for p in planned.plans if "access_changes" in p]
    assert "Seq Scan on access_changes" not in plan, plan
    assert "Sort" not in plan, plan


async def test_the_maintenance_push_retry_reads_no_applied_extensions(planned: Planned) -> None:
    """Every minute: the subscriptions with extensions still pending at Stripe (none here)."""
    gateway = StripeGateway(api_key="sk_test_unused", api_base="http://127.0.0.1:9")
    try:
        assert await retry_pending_extensions(planned.factory, gateway) == 0
    finally:
        await gateway.close()
    plans = [p for p in planned.plans if "maintenance_extensions" in p]
    assert len(plans) == 3, plans  # the subscriptions, the pending count before and after
    for plan in plans:
        assert "Seq Scan" not in plan, plan


async def test_the_overdue_gauge_reads_only_open_requests(planned: Planned) -> None:
    """Each /metrics scrape counts the overdue requests: among the open ones, not every request
    ever filed."""
    await refresh_refund_metrics(planned.factory)
    assert REFUND_REQUESTS_OVERDUE._value.get() == 0
    [plan] = [p for p in planned.plans if "refund_requests" in p]
    assert "Seq Scan" not in plan, plan


async def test_finance_s_newest_requests_are_read_without_sorting_them_all(
    planned: Planned,
) -> None:
    """GET /v1/finance/refund-requests (no filter): the newest page, not a sort of every
    request ever filed."""
    async with planned.factory() as session:
        page = await list_requests(session, limit=100)
    assert len(page) == 100
    [plan] = [p for p in planned.plans if "refund_requests" in p]
    assert_indexed(plan)


async def test_hourly_payload_pruning_reads_only_the_payloads_still_kept(
    planned: Planned,
) -> None:
    """Hourly: the applied events whose payload is older than EVENT_RETENTION_DAYS, among
    those still holding one, not among every event ever received."""
    assert await prune_payloads(planned.factory, 3) == 680  # minutes 4320-4999
    [plan] = [p for p in planned.plans if "UPDATE stripe_events" in p]
    assert "Seq Scan" not in plan, plan


async def test_hourly_key_pruning_reads_only_the_expired_keys(planned: Planned) -> None:
    """Hourly: the Idempotency-Key records past their 24 hours (none yet), by their age."""
    assert await prune_expired_keys(planned.factory) == 0
    [plan] = [p for p in planned.plans if "DELETE FROM idempotency_records" in p]
    assert "Seq Scan" not in plan, plan
