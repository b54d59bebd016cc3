"""An approval whose Stripe answer was lost, and whose refund Stripe then reported failed: the
repeated approval records the decision as `refund_failed`, so finance can retry the refund."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from tests.conftest import Deliver, TokenFactory, bearer
from tests.refunds.flows import new_events, pay_subscription
from tests.refunds.test_refund_workflow import FINANCE, file_request, reply
from tests.stripe_fake import StripeFake

DECISION = {
    "kind": "decision",
    "message": "Approved.",
    "outcome": "approved",
    "remedy": "refund",
    "amount": 1200,
}


async def test_a_lost_approval_whose_refund_failed_can_be_recorded_and_retried(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_subscription(app, stripe_fake, deliver, account_id="acc_l", channel_id="ch_l")
    created = await file_request(client, token, "acc_l", payment_reference=paid.payment_id)
    seen = len(stripe_fake.events)
    stripe_fake.fail_next(path_prefix="/v1/refunds", status=500, count=2, kind="lost_response")
    assert (await reply(client, token, created["id"], **DECISION)).status_code == 502
    [refund] = stripe_fake.all("refund")
    stripe_fake.fail_refund(refund["id"])
    await deliver(new_events(stripe_fake, seen))

    # Finance repeats the approval, as the 409 on any other decision tells them to.
    repeated = await reply(client, token, created["id"], **DECISION)

    assert repeated.status_code == 201, repeated.text
    assert (repeated.json()["status"], repeated.json()["refund"]["status"]) == (
        "refund_failed",
        "failed",
    )
    retried = await client.post(
        f"/v1/finance/refund-requests/{created['id']}/refund-attempts",
        json={"note": "Card replaced"},
        headers=bearer(token(**FINANCE)),
    )
    assert retried.status_code == 201, retried.text
    assert retried.json()["status"] == "refund_pending"
    assert [r["amount"] for r in stripe_fake.all("refund")] == [1200, 1200]
