"""A top-up refund is bounded by the unspent balance, counting refunds already approved but not
yet confirmed by Stripe's events (the ledger is debited only when Stripe's refund event
arrives, so until then the unspent balance must not be handed out twice)."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
from fastapi import FastAPI

from app.refunds.repository import add_ledger_entry
from tests.conftest import Deliver, TokenFactory, bearer
from tests.refunds.flows import balance, new_events, pay_top_up
from tests.refunds.test_refund_workflow import file_request, reply
from tests.stripe_fake import StripeFake


async def test_two_top_up_refunds_approved_before_stripe_confirms_cannot_exceed_the_unspent_balance(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    first = await pay_top_up(app, stripe_fake, deliver, account_id="acc_rv", amount=3000)
    second = await pay_top_up(app, stripe_fake, deliver, account_id="acc_rv", amount=3000)
    async with app.state.session_factory() as session, session.begin():
        await add_ledger_entry(
            session,
            account_id="acc_rv",
            kind="conversation",
            source_id="conv-rv",
            amount=-4000,
            currency="usd",
            description="usage",
            occurred_at=datetime.now(UTC),
        )
    assert await balance(app, "acc_rv") == 2000  # unspent

    one = await file_request(
        client, token, "acc_rv", type="refund", payment_reference=first.charge_id
    )
    two = await file_request(
        client, token, "acc_rv", type="refund", payment_reference=second.charge_id
    )
    seen = len(stripe_fake.events)
    approved = await reply(
        client,
        token,
        one["id"],
        kind="decision",
        message="Unspent balance refunded.",
        outcome="approved",
        remedy="refund",
        amount=2000,
    )
    assert approved.status_code == 201, approved.text

    # Stripe's refund events have not arrived yet: the 2000 is on its way back all the same.
    again = await reply(
        client,
        token,
        two["id"],
        kind="decision",
        message="Unspent balance refunded.",
        outcome="approved",
        remedy="refund",
        amount=2000,
    )
    assert again.status_code == 422, again.text
    assert again.json()["code"] == "refund_exceeds_limit"
    assert len(stripe_fake.all("refund")) == 1

    await deliver(new_events(stripe_fake, seen))
    assert await balance(app, "acc_rv") == 0
    status = await client.get(
        f"/v1/accounts/acc_rv/refund-requests/{two['id']}",
        headers=bearer(token(account_id="acc_rv")),
    )
    assert status.json()["status"] == "received"


async def test_a_goodwill_balance_credit_is_never_refunded_as_cash(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    """Only what the client paid and has not spent goes back to the card: a balance credit
    finance granted (goodwill, no money received) is spent last, so it never turns into a
    refund of the top-up."""
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_gw", amount=3000)
    async with app.state.session_factory() as session, session.begin():
        await add_ledger_entry(
            session,
            account_id="acc_gw",
            kind="conversation",
            source_id="conv-gw",
            amount=-2500,
            currency="usd",
            description="usage",
            occurred_at=datetime.now(UTC),
        )
    goodwill = await file_request(
        client, token, "acc_gw", type="appeal", payment_reference=paid.charge_id
    )
    credited = await reply(
        client,
        token,
        goodwill["id"],
        kind="decision",
        message="A goodwill credit for the trouble.",
        outcome="approved",
        remedy="balance_credit",
        amount=1000,
    )
    assert credited.status_code == 201, credited.text
    assert await balance(app, "acc_gw") == 1500  # 500 paid and unspent + 1000 goodwill

    refund = await file_request(
        client, token, "acc_gw", type="refund", payment_reference=paid.charge_id
    )
    too_much = await reply(
        client,
        token,
        refund["id"],
        kind="decision",
        message="Unspent balance refunded.",
        outcome="approved",
        remedy="refund",
        amount=1500,
    )
    assert too_much.status_code == 422, too_much.text
    assert too_much.json()["code"] == "refund_exceeds_limit"
    assert "500" in too_much.json()["detail"]
    assert stripe_fake.all("refund") == []

    unspent = await reply(
        client,
        token,
        refund["id"],
        kind="decision",
        message="Unspent balance refunded.",
        outcome="approved",
        remedy="refund",
        amount=500,
    )
    assert unspent.status_code == 201, unspent.text
    assert [r["amount"] for r in stripe_fake.all("refund")] == [500]
