"""A payment intent can have several charges: a declined card, then one that succeeds (Stripe
Checkout and invoice retries reuse the payment intent). The payment is the succeeded charge's."""

from __future__ import annotations

import copy
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import select

from app.models import Payment
from tests.conftest import Deliver, TokenFactory, bearer
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import add_catalog, open_checkout


def declined_charge_of(succeeded: dict[str, Any]) -> dict[str, Any]:
    """The `charge.failed` event of an earlier, declined attempt on the same payment intent."""
    event = copy.deepcopy(succeeded)
    event["id"] = event["id"] + "_declined"
    event["type"] = "charge.failed"
    event["created"] -= 60
    charge = event["data"]["object"]
    charge.update(
        {
            "id": charge["id"] + "_declined",
            "status": "failed",
            "paid": False,
            "captured": False,
            "amount_captured": 0,
            "balance_transaction": None,
            "failure_code": "card_declined",
            "failure_message": "Your card was declined.",
            "created": charge["created"] - 60,
        }
    )
    return event


async def payment_of(app: FastAPI, payment_intent: str) -> Payment:
    async with app.state.session_factory() as session:
        payment = await session.scalar(select(Payment).where(Payment.stripe_id == payment_intent))
        assert payment is not None
        return payment


async def test_the_succeeded_charge_is_the_payments_after_a_declined_attempt(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    add_catalog(stripe_fake)
    session_id = await open_checkout(app, account_id="acc_retry", purpose="top_up", amount=4200)
    events = stripe_fake.complete_checkout(session_id)
    succeeded = next(e for e in events if e["type"] == "charge.succeeded")
    charge_id = succeeded["data"]["object"]["id"]
    payment_intent = succeeded["data"]["object"]["payment_intent"]

    await deliver([declined_charge_of(succeeded), *events])

    payment = await payment_of(app, payment_intent)
    assert (payment.status, payment.stripe_charge_id) == ("succeeded", charge_id)
    # a refund request naming the charge the client was billed by is matched to the payment
    filed = await client.post(
        "/v1/accounts/acc_retry/refund-requests",
        json={"type": "refund", "description": "Please refund", "payment_reference": charge_id},
        headers=bearer(token(account_id="acc_retry")),
    )
    assert filed.status_code == 201, filed.text
    assert (filed.json()["status"], filed.json()["payment_id"]) == ("received", str(payment.id))


async def test_a_late_declined_attempt_does_not_replace_the_succeeded_charge(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver
) -> None:
    add_catalog(stripe_fake)
    session_id = await open_checkout(app, account_id="acc_retry2", purpose="top_up", amount=4200)
    events = stripe_fake.complete_checkout(session_id)
    succeeded = next(e for e in events if e["type"] == "charge.succeeded")
    await deliver(events)
    await deliver([declined_charge_of(succeeded)])

    payment = await payment_of(app, succeeded["data"]["object"]["payment_intent"])
    assert (payment.status, payment.stripe_charge_id) == (
        "succeeded",
        succeeded["data"]["object"]["id"],
    )
