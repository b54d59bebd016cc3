"""A debt repayment paid for usage already consumed (conversation and Meta fees): its refund
is bounded like a top-up's, by the unspent balance, so Meta fees are never handed back."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from sqlalchemy import select

from app.models import Payment
from tests.conftest import Deliver, TokenFactory, bearer
from tests.refunds.flows import balance, ledger, new_events, pay_top_up, set_email
from tests.refunds.test_refund_workflow import file_request, reply
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import open_checkout

APPROVE = {"kind": "decision", "message": "Approved.", "outcome": "approved", "remedy": "refund"}


async def charge_meta_fee(client: httpx.AsyncClient, token: TokenFactory, amount: int) -> None:
    response = await client.post(
        "/v1/accounts/acc_dr/usage-charges",
        json={
            "id": f"meta-{amount}",
            "amount": amount,
            "currency": "usd",
            "kind": "meta_fee",
            "occurred_at": "2026-11-02T10:00:00+00:00",
        },
        headers=bearer(token(scope="usage:write")),
    )
    assert response.status_code == 201, response.text


async def test_a_debt_repayment_is_refunded_at_most_up_to_the_unspent_balance(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    # Meta fees of 2000 beyond the balance became debt; the client repaid it at Checkout.
    await charge_meta_fee(client, token, 2000)
    session_id = await open_checkout(
        app, account_id="acc_dr", purpose="debt_repayment", amount=2000
    )
    await deliver(stripe_fake.complete_checkout(session_id))
    async with app.state.session_factory() as session:
        payment = await session.scalar(
            select(Payment).where(Payment.stripe_checkout_session_id == session_id)
        )
        assert payment is not None and payment.stripe_charge_id is not None
    await deliver(stripe_fake.settle_charge(payment.stripe_charge_id, fee=90))
    await set_email(app, "acc_dr", "billing@acc_dr.example")
    assert await balance(app, "acc_dr") == 0

    created = await file_request(
        client, token, "acc_dr", type="refund", payment_reference=payment.stripe_charge_id
    )
    # The repayment paid for Meta fees: nothing of it is unspent, nothing is refunded.
    refused = await reply(client, token, created["id"], **APPROVE, amount=2000)
    assert refused.status_code == 422, refused.text
    assert refused.json()["code"] == "refund_exceeds_limit"
    assert stripe_fake.all("refund") == []
    assert await balance(app, "acc_dr") == 0

    # Once 500 the client paid is in the balance again (a top-up), that much is unspent and
    # may go back, and no more (a goodwill credit would not count: it is spent last).
    await pay_top_up(app, stripe_fake, deliver, account_id="acc_dr", amount=500)
    over = await reply(client, token, created["id"], **APPROVE, amount=501)
    assert (over.status_code, over.json()["code"]) == (422, "refund_exceeds_limit")
    seen = len(stripe_fake.events)
    ok = await reply(client, token, created["id"], **APPROVE, amount=500)
    assert ok.status_code == 201, ok.text
    await deliver(new_events(stripe_fake, seen))
    refund_id = stripe_fake.all("refund")[0]["id"]
    assert [e for e in await ledger(app, "acc_dr") if e[0] == "refund"] == [
        ("refund", refund_id, -500)
    ]
    assert await balance(app, "acc_dr") == 0
