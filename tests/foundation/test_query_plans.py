"""Queries the background workers run every round, and the per-account and per-window ones
(a checkout, a balance, a maintenance completion), must not read the history: on a database
seeded with a few hundred thousand rows of what a year of billing leaves (sent emails,
applied events, access changes, ...), each job's own statements are planned with an index, no
sequential scan and no sort of the history. The plans are the ones Postgres really chose for
the code's statements (auto_explain, loaded per connection, which takes the superuser the
suite's admin URL is; its plans are sent to the client as log messages), not hand-written
copies. The module seeds a database of its own."""

from __future__ import annotations

import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from app.accounts.service import account_facts
from app.balance.service import account_balance
from app.checkout.service import _PAID_REPAYMENTS
from app.config import Settings
from app.db import driver_transaction
from app.idempotency import prune_expired_keys
from app.maintenance.schemas import MaintenanceWindowComplete
from app.maintenance.service import complete_window, retry_pending_extensions
from app.notifications.worker import park_stale_sending
from app.refunds.metrics import REFUND_REQUESTS_OVERDUE, refresh_refund_metrics
from app.refunds.repository import list_requests
from app.stripe_gateway import StripeGateway
from app.subscriptions.service import record_expired_access
from app.webhooks.processor import prune_payloads
from tests.conftest import alembic, create_database, drop_database, make_settings, plain_dsn

HISTORY = 200_000
LEDGER = 100_000
OUTAGE = uuid.UUID("00000000-0000-4000-8000-00000000a0a0")

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
    # one busy account's years of checkouts (top-ups and debt repayments, some abandoned),
    # among everyone's
    "INSERT INTO accounts(id) VALUES ('acc_busy'), ('acc_ledger')",
    "INSERT INTO checkout_sessions(id, account_id, purpose, amount, currency, status,"
    " payment_status, success_url, cancel_url, created_at, fulfilled_at)"
    " SELECT gen_random_uuid(), CASE WHEN g % 5 = 0 THEN 'acc_busy' ELSE 'acc_' || (g % 2000"
    " + 1) END, CASE WHEN g % 3 = 0 THEN 'debt_repayment' ELSE 'top_up' END, 1000, 'usd',"
    " CASE WHEN g % 4 = 0 THEN 'expired' ELSE 'complete' END, CASE WHEN g % 4 = 0 THEN"
    " 'unpaid' ELSE 'paid' END, 'https://app.1msg.io/ok', 'https://app.1msg.io/no',"
    " now() - make_interval(mins => g), CASE WHEN g % 4 <> 0 THEN now() - make_interval(mins"
    f" => g) END FROM generate_series(1, {HISTORY // 2}) g",
    # an account that reported a hundred thousand usage charges, among others
    "INSERT INTO ledger_entries(account_id, kind, source_id, amount, currency, occurred_at)"
    " SELECT CASE WHEN g % 3 = 0 THEN 'acc_ledger' ELSE 'acc_' || (g % 2000 + 1) END,"
    " 'conversation', 'conv-' || g, -1, 'usd', now() - make_interval(secs => g)"
    f" FROM generate_series(1, {LEDGER * 3}) g",
    # years of ended subscriptions with their invoices and payments (half the payments name
    # no subscription: found through their invoice), and twenty subscriptions live now
    "INSERT INTO subscriptions(id, stripe_id, account_id, channel_id, status,"
    " cancel_at_period_end, current_period_start, current_period_end, ended_at)"
    " SELECT gen_random_uuid(), 'sub_old_' || g, 'acc_' || (g % 2000 + 1),"
    " 'ch_' || (g % 2000 + 1), 'canceled', g % 2 = 0, now() - make_interval(hours => 800 + g),"
    " now() - make_interval(hours => 80 + g), now() - make_interval(hours => 80 + g)"
    " FROM generate_series(1, 50000) g",
    "INSERT INTO subscriptions(id, stripe_id, account_id, channel_id, status,"
    " current_period_start, current_period_end)"
    " SELECT gen_random_uuid(), 'sub_live_' || g, 'acc_' || g, 'ch_' || g, 'past_due',"
    " now() - interval '10 days', now() + interval '20 days' FROM generate_series(1, 20) g",
    "INSERT INTO invoices(id, stripe_id, account_id, stripe_subscription_id, status,"
    " amount_due, amount_paid, currency, period_start, period_end, paid_at)"
    " SELECT gen_random_uuid(), 'in_' || g, 'acc_' || (g % 2000 + 1),"
    " 'sub_old_' || (g % 50000 + 1), 'paid', 1000, 1000, 'usd',"
    " now() - make_interval(hours => 1500 + g), now() - make_interval(hours => 800 + g),"
    " now() - make_interval(hours => 800 + g) FROM generate_series(1, 300000) g",
    "INSERT INTO payments(id, stripe_id, account_id, purpose, stripe_invoice_id,"
    " stripe_subscription_id, amount, currency, status, paid_at)"
    " SELECT gen_random_uuid(), 'pi_' || g, 'acc_' || (g % 2000 + 1), 'subscription',"
    " 'in_' || g, CASE WHEN g % 2 = 0 THEN 'sub_old_' || (g % 50000 + 1) END, 1000, 'usd',"
    " 'succeeded', now() - make_interval(hours => 800 + g) FROM generate_series(1, 300000) g",
    "INSERT INTO maintenance_windows(id, kind, reason, starts_at, ends_at, business_days,"
    f" created_by) VALUES ('{OUTAGE}', 'emergency', 'outage', now() - interval '3 hours',"
    " now() - interval '2 hours', 1, 'ops')",
    # as autovacuum leaves an insert-only table: analyzed, its pages marked all-visible
    "VACUUM ANALYZE",
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


async def test_a_checkout_reads_only_the_account_s_last_minute_of_sessions(
    planned: Planned,
) -> None:
    """Each checkout counts the account's Stripe sessions of the last minute (the rate limit,
    in `account_facts`): by their creation time, not among every checkout the account made."""
    async with driver_transaction(planned.engine) as conn:
        facts = await account_facts(conn, "acc_busy")
    assert facts.recent.count == 0
    [plan] = [p for p in planned.plans if "checkout_sessions" in p]
    assert "Seq Scan on checkout_sessions" not in plan, plan
    assert "Filter: (created_at >" not in plan, plan  # not the account's every checkout


async def test_a_debt_repayment_reads_only_the_repayments_not_yet_credited(
    planned: Planned,
) -> None:
    """A debt repayment subtracts the account's repayments Stripe reports paid that no event
    has credited yet: among those, not among every checkout the account made."""
    async with driver_transaction(planned.engine) as conn:
        assert await _PAID_REPAYMENTS.fetchval(conn, account_id="acc_busy") == 0
    [plan] = [p for p in planned.plans if "checkout_sessions" in p]
    assert "Seq Scan" not in plan, plan
    assert "Filter:" not in plan, plan  # not the account's every checkout


async def test_completing_a_window_reads_only_the_subscriptions_it_can_concern(
    planned: Planned,
) -> None:
    """Completion locks the subscriptions whose access could reach into the window (not every
    subscription ever made) and reads their invoices and payments by index."""
    gateway = StripeGateway(api_key="sk_test_unused", api_base="http://127.0.0.1:9")
    ended_at = datetime.now(UTC) - timedelta(hours=2, minutes=30)
    started = time.perf_counter()
    try:
        done = await complete_window(
            planned.factory,
            gateway,
            planned.settings,
            OUTAGE,
            MaintenanceWindowComplete(ended_at=ended_at),
            "ops",
        )
    finally:
        await gateway.close()
    print(f"completion took {time.perf_counter() - started:.3f}s")
    assert done.subscriptions_extended == 20  # the live past_due ones (skipped at Stripe)
    plans = [
        p
        for p in planned.plans
        if ("FROM subscriptions" in p and "FOR UPDATE" in p)
        or "FROM payments" in p
        or "FROM invoices" in p
    ]
    assert len(plans) == 3, plans
    for plan in plans:
        assert "Seq Scan" not in plan, plan


async def test_the_balance_reads_the_account_s_ledger_by_index(planned: Planned) -> None:
    """GET .../balance sums the account's ledger on each read (by design): measured on an
    account with a hundred thousand entries."""
    async with planned.factory() as session:
        await session.execute(text("SELECT 1"))  # connected: the time is the read's
        started = time.perf_counter()
        balance, debt, currency = await account_balance(session, "acc_ledger")
        elapsed = time.perf_counter() - started
    assert (balance, debt, currency) == (0, LEDGER, "usd")
    [plan] = [p for p in planned.plans if "sum(ledger_entries.amount)" in p]
    print(f"balance read: {elapsed * 1000:.1f} ms; sum: {plan.split(' ms')[0]} ms")
    assert "Index Only Scan" in plan, plan
    assert "Seq Scan" not in plan, plan
