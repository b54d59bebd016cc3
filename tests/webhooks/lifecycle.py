"""A realistic Stripe lifecycle for one account, produced by the Stripe fake, and a snapshot of
everything the mirror holds, to compare runs delivered in different orders."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from fastapi import FastAPI
from sqlalchemy import select

from app.models import (
    Account,
    CheckoutSession,
    Dispute,
    Invoice,
    LedgerEntry,
    Payment,
    Refund,
    Subscription,
)
from app.subscriptions.access import channel_access
from tests.conftest import plain_dsn
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import add_catalog, open_checkout

ACCOUNT, CHANNEL = "acc_life", "chan_life"


@dataclass
class Lifecycle:
    events: list[dict[str, Any]]
    subscription_id: str
    top_up_session: str
    top_up_payment_intent: str
    subscription_charge: str
    dispute_id: str
    refund_id: str


def _charge_of(fake: StripeFake, payment_intent: str) -> str:
    return str(fake.get("payment_intent", payment_intent)["latest_charge"])


async def run_lifecycle(app: FastAPI, fake: StripeFake) -> Lifecycle:
    """Checkout (subscription), fee settles, cancel at period end, resume, a top-up with a
    partial refund, a dispute on the subscription payment that is lost, a renewal, deletion."""
    add_catalog(fake)
    subscription_session = await open_checkout(
        app, account_id=ACCOUNT, purpose="subscription", channel_id=CHANNEL
    )
    top_up_session = await open_checkout(app, account_id=ACCOUNT, purpose="top_up", amount=5000)
    start = len(fake.events)
    fake.complete_checkout(subscription_session)
    subscription_id = str(fake.get("checkout.session", subscription_session)["subscription"])
    invoice = fake.get("invoice", str(fake.get("subscription", subscription_id)["latest_invoice"]))
    first_pi = str(fake.all("invoice_payment")[0]["payment"]["payment_intent"])
    subscription_charge = _charge_of(fake, first_pi)
    assert invoice["id"]
    fake.settle_charge(subscription_charge, fee=143)
    fake.update_subscription(subscription_id, cancel_at_period_end=True)
    fake.update_subscription(subscription_id, cancel_at_period_end=False)
    fake.complete_checkout(top_up_session)
    top_up_pi = str(fake.get("checkout.session", top_up_session)["payment_intent"])
    fake.settle_charge(_charge_of(fake, top_up_pi), fee=175)
    refund = fake.create_refund({"payment_intent": top_up_pi, "amount": 1000})
    fake.create_dispute(subscription_charge)
    dispute_id = str(fake.all("dispute")[0]["id"])
    fake.withdraw_dispute_funds(dispute_id)
    fake.close_dispute(dispute_id, won=False)
    fake.renew_subscription(subscription_id, paid=True)
    fake.delete_subscription(subscription_id)
    return Lifecycle(
        events=[dict(e) for e in fake.events[start:]],
        subscription_id=subscription_id,
        top_up_session=top_up_session,
        top_up_payment_intent=top_up_pi,
        subscription_charge=subscription_charge,
        dispute_id=dispute_id,
        refund_id=str(refund["id"]),
    )


async def snapshot(app: FastAPI) -> dict[str, Any]:
    """Everything the events decide, in a form that does not depend on processing order."""
    now = datetime(2030, 1, 1, tzinfo=UTC)
    async with app.state.session_factory() as session:
        subscriptions = (await session.scalars(select(Subscription))).all()
        state: dict[str, Any] = {
            "accounts": {
                a.id: (a.stripe_customer_id, a.currency, a.first_paid_at)
                for a in (await session.scalars(select(Account))).all()
            },
            "checkout": {
                c.stripe_id: (
                    c.status,
                    c.payment_status,
                    c.fulfilled_at is not None,
                    c.stripe_subscription_id,
                )
                for c in (await session.scalars(select(CheckoutSession))).all()
            },
            "subscriptions": {
                s.stripe_id: (
                    s.account_id,
                    s.channel_id,
                    s.plan_code,
                    s.status,
                    s.cancel_at_period_end,
                    s.cancel_at,
                    s.current_period_start,
                    s.current_period_end,
                    s.canceled_at,
                    s.ended_at,
                )
                for s in subscriptions
            },
            "invoices": {
                i.stripe_id: (
                    i.account_id,
                    i.stripe_subscription_id,
                    i.status,
                    i.amount_paid,
                    i.paid_at,
                )
                for i in (await session.scalars(select(Invoice))).all()
            },
            "payments": {
                p.stripe_id: (
                    p.account_id,
                    p.purpose,
                    p.stripe_invoice_id,
                    p.stripe_subscription_id,
                    p.stripe_charge_id,
                    p.amount,
                    p.currency,
                    p.status,
                    p.fee,
                    p.amount_refunded,
                    p.disputed,
                    p.paid_at,
                )
                for p in (await session.scalars(select(Payment))).all()
            },
            "refunds": {
                r.stripe_id: (r.stripe_payment_intent_id, r.amount, r.status)
                for r in (await session.scalars(select(Refund))).all()
            },
            "disputes": {
                d.stripe_id: (
                    d.account_id,
                    d.status,
                    d.amount,
                    d.funds_withdrawn,
                    d.funds_reinstated,
                )
                for d in (await session.scalars(select(Dispute))).all()
            },
            "ledger": sorted(
                (e.account_id, e.kind, e.source_id, e.amount, e.currency)
                for e in (await session.scalars(select(LedgerEntry))).all()
            ),
            "access": {
                channel: channel_access(
                    [s for s in subscriptions if s.channel_id == channel],
                    now,
                    past_due_keeps_access=app.state.settings.past_due_keeps_access,
                )
                for channel in {s.channel_id for s in subscriptions}
            },
        }
    return state


MIRROR_TABLES = [
    "stripe_events",
    "subscriptions",
    "invoices",
    "payments",
    "refunds",
    "disputes",
    "ledger_entries",
    "access_changes",
    "channels",
]


class Baseline:
    """The rows that existed before any event (accounts, our checkout sessions), restorable."""

    def __init__(self, database_url: str) -> None:
        self.dsn = plain_dsn(database_url)
        self.rows: dict[str, list[asyncpg.Record]] = {}

    async def capture(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            for table in ("accounts", "checkout_sessions"):
                self.rows[table] = await conn.fetch(f"SELECT * FROM {table}")
        finally:
            await conn.close()

    async def restore(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            async with conn.transaction():
                tables = ", ".join([*MIRROR_TABLES, "checkout_sessions", "accounts"])
                await conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
                for table, rows in self.rows.items():
                    if rows:
                        columns = list(rows[0].keys())
                        await conn.copy_records_to_table(
                            table, records=[tuple(r) for r in rows], columns=columns
                        )
        finally:
            await conn.close()
