"""Set up what the checkout API would have created before Stripe's events arrive: the account
with its Stripe customer, our checkout row and the Stripe Checkout session carrying our
metadata. Used by the webhook tests (which do not depend on the checkout endpoints)."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert

from app.models import Account, CheckoutSession
from app.stripe_gateway import idempotency_key
from tests.stripe_fake import StripeFake

PRICE_ID = "price_channel_monthly_usd"


def add_catalog(fake: StripeFake) -> None:
    fake.add_price(id=PRICE_ID, unit_amount=3900, currency="usd", interval="month")


async def open_checkout(
    app: FastAPI,
    *,
    account_id: str,
    purpose: str,
    channel_id: str | None = None,
    amount: int | None = None,
    currency: str = "usd",
) -> str:
    """Our checkout row plus its Stripe session; returns the Stripe session id."""
    factory = app.state.session_factory
    gateway = app.state.stripe
    async with factory() as session, session.begin():
        await session.execute(
            insert(Account).values(id=account_id).on_conflict_do_nothing(index_elements=["id"])
        )
        account = await session.scalar(select(Account).where(Account.id == account_id))
        assert account is not None
        if account.stripe_customer_id is None:
            customer = await gateway.create_customer(
                account_id=account_id, key=idempotency_key("customer", account_id)
            )
            account.stripe_customer_id = customer["id"]
        row = CheckoutSession(
            id=uuid.uuid4(),
            account_id=account_id,
            purpose=purpose,
            channel_id=None,
            plan_code="channel_monthly" if purpose == "subscription" else None,
            amount=amount,
            currency=currency,
            status="pending",
            success_url="https://app.1msg.io/ok",
            cancel_url="https://app.1msg.io/cancel",
        )
        session.add(row)
        customer_id = account.stripe_customer_id
    metadata = {"account_id": account_id, "purpose": purpose, "checkout_session_id": str(row.id)}
    params: dict[str, Any] = {
        "customer": customer_id,
        "client_reference_id": account_id,
        "success_url": "https://app.1msg.io/ok?session={CHECKOUT_SESSION_ID}",
        "cancel_url": "https://app.1msg.io/cancel",
    }
    if purpose == "subscription":
        assert channel_id is not None
        metadata |= {"channel_id": channel_id, "plan_code": "channel_monthly"}
        params |= {
            "mode": "subscription",
            "line_items": [{"price": PRICE_ID, "quantity": 1}],
            "subscription_data": {"metadata": metadata},
        }
    else:
        params |= {
            "mode": "payment",
            "line_items": [
                {
                    "price_data": {
                        "currency": currency,
                        "unit_amount": amount,
                        "product_data": {"name": "Balance top-up"},
                    },
                    "quantity": 1,
                }
            ],
            "payment_intent_data": {"metadata": metadata},
        }
    params["metadata"] = metadata
    created = await gateway.create_checkout_session(params, key=idempotency_key("checkout", row.id))
    async with factory() as session, session.begin():
        stored = await session.get(CheckoutSession, row.id)
        assert stored is not None
        stored.stripe_id = created["id"]
        stored.status = "open"
        stored.url = created["url"]
    return str(created["id"])
