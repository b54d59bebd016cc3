"""Payments made the real way: a Checkout session at the Stripe fake, its completion and
settlement delivered to /webhooks/stripe, so every stored fact comes from Stripe's events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from sqlalchemy import func, select, update

from app.models import Account, Invoice, LedgerEntry, OutboxEmail, Payment, Subscription
from tests.conftest import Deliver
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import add_catalog, open_checkout


@dataclass
class Paid:
    payment_id: str
    payment_intent: str
    charge_id: str
    subscription_id: str | None


async def _payment(app: FastAPI, **where: Any) -> Payment:
    async with app.state.session_factory() as session:
        payment = await session.scalar(select(Payment).filter_by(**where))
        assert payment is not None
        return payment


async def set_email(app: FastAPI, account_id: str, email: str) -> None:
    async with app.state.session_factory() as session, session.begin():
        await session.execute(update(Account).where(Account.id == account_id).values(email=email))


async def pay_subscription(
    app: FastAPI,
    stripe_fake: StripeFake,
    deliver: Deliver,
    *,
    account_id: str,
    channel_id: str,
    fee: int | None = 150,
) -> Paid:
    add_catalog(stripe_fake)
    session_id = await open_checkout(
        app, account_id=account_id, purpose="subscription", channel_id=channel_id
    )
    await deliver(stripe_fake.complete_checkout(session_id))
    async with app.state.session_factory() as session:
        subscription = await session.scalar(
            select(Subscription)
            .where(Subscription.account_id == account_id)
            .order_by(Subscription.created_at.desc())
        )
        assert subscription is not None
        invoices = select(Invoice.stripe_id).where(
            Invoice.stripe_subscription_id == subscription.stripe_id
        )
        payment = await session.scalar(
            select(Payment).where(
                (Payment.stripe_subscription_id == subscription.stripe_id)
                | Payment.stripe_invoice_id.in_(invoices)
            )
        )
        assert payment is not None and payment.stripe_charge_id is not None
    if fee is not None:
        await deliver(stripe_fake.settle_charge(payment.stripe_charge_id, fee=fee))
    await set_email(app, account_id, f"billing@{account_id}.example")
    return Paid(
        str(payment.id), payment.stripe_id, payment.stripe_charge_id, subscription.stripe_id
    )


async def pay_top_up(
    app: FastAPI,
    stripe_fake: StripeFake,
    deliver: Deliver,
    *,
    account_id: str,
    amount: int,
    fee: int = 175,
) -> Paid:
    session_id = await open_checkout(app, account_id=account_id, purpose="top_up", amount=amount)
    await deliver(stripe_fake.complete_checkout(session_id))
    payment = await _payment(app, stripe_checkout_session_id=session_id)
    assert payment.stripe_charge_id is not None
    await deliver(stripe_fake.settle_charge(payment.stripe_charge_id, fee=fee))
    await set_email(app, account_id, f"billing@{account_id}.example")
    return Paid(str(payment.id), payment.stripe_id, payment.stripe_charge_id, None)


async def balance(app: FastAPI, account_id: str) -> int:
    async with app.state.session_factory() as session:
        total = await session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
                LedgerEntry.account_id == account_id
            )
        )
        return int(total or 0)


async def ledger(app: FastAPI, account_id: str) -> list[tuple[str, str, int]]:
    async with app.state.session_factory() as session:
        rows = await session.execute(
            select(LedgerEntry.kind, LedgerEntry.source_id, LedgerEntry.amount)
            .where(LedgerEntry.account_id == account_id)
            .order_by(LedgerEntry.id)
        )
        return [tuple(row) for row in rows.all()]  # type: ignore[misc]


async def outbox(app: FastAPI, to: str) -> list[OutboxEmail]:
    async with app.state.session_factory() as session:
        rows = await session.scalars(
            select(OutboxEmail).where(OutboxEmail.to_address == to).order_by(OutboxEmail.created_at)
        )
        return list(rows.all())


async def subscription(app: FastAPI, stripe_id: str) -> Subscription:
    async with app.state.session_factory() as session:
        row = await session.scalar(select(Subscription).where(Subscription.stripe_id == stripe_id))
        assert row is not None
        return row


def new_events(stripe_fake: StripeFake, seen: int) -> list[dict[str, Any]]:
    return stripe_fake.events_since(seen)
