"""A refund approval whose answer from Stripe was lost leaves its refund attempt pending (Stripe
may have made the refund): no other decision may be recorded over it, else the request reads
`rejected` (and the client is told so) while the refund goes out."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from tests.conftest import Deliver, TokenFactory, bearer
from tests.refunds.flows import balance, new_events, outbox, pay_top_up
from tests.refunds.test_refund_workflow import FINANCE, file_request, reply
from tests.stripe_fake import StripeFake


async def test_a_request_whose_refund_may_be_at_stripe_cannot_be_rejected_and_the_approval_completes(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_lr", amount=3000)
    created = await file_request(
        client, token, "acc_lr", type="refund", payment_reference=paid.charge_id
    )
    seen = len(stripe_fake.events)
    approval = {
        "kind": "decision",
        "message": "Refunded.",
        "outcome": "approved",
        "remedy": "refund",
        "amount": 1000,
    }
    # Stripe makes the refund, but its answers never reach us.
    stripe_fake.fail_next(path_prefix="/v1/refunds", status=500, count=5, kind="lost_response")
    lost = await reply(client, token, created["id"], **approval)
    assert lost.status_code == 502
    stripe_fake.clear_failures()
    assert len(stripe_fake.all("refund")) == 1

    rejected = await reply(
        client, token, created["id"], kind="decision", message="No.", outcome="rejected"
    )
    assert rejected.status_code == 409, rejected.text
    assert rejected.json()["code"] == "refund_in_progress"
    credit = await reply(
        client,
        token,
        created["id"],
        kind="decision",
        message="Credited.",
        outcome="approved",
        remedy="balance_credit",
        amount=1000,
    )
    assert credit.status_code == 409, credit.text
    assert credit.json()["code"] == "refund_in_progress"

    completed = await reply(client, token, created["id"], **approval)
    assert completed.status_code == 201, completed.text
    assert len(stripe_fake.all("refund")) == 1
    await deliver(new_events(stripe_fake, seen))
    state = (
        await client.get(
            f"/v1/finance/refund-requests/{created['id']}", headers=bearer(token(**FINANCE))
        )
    ).json()
    assert (state["status"], state["outcome"], state["refund"]["status"]) == (
        "refunded",
        "approved",
        "succeeded",
    )
    assert await balance(app, "acc_lr") == 2000
    decisions = [
        e.body for e in await outbox(app, "billing@acc_lr.example") if "Decision:" in e.body
    ]
    assert len(decisions) == 1 and "Decision: approved" in decisions[0]
