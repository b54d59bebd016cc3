"""An approval whose Stripe answer was lost is repeated after Stripe forgot its idempotency
key (Stripe keeps keys 24 hours): the refund Stripe already made is the approval's refund,
never a second one."""

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


async def test_repeating_a_lost_approval_after_stripe_forgot_its_key_makes_no_second_refund(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_subscription(app, stripe_fake, deliver, account_id="acc_k", channel_id="ch_k")
    created = await file_request(client, token, "acc_k", payment_reference=paid.payment_id)
    seen = len(stripe_fake.events)
    # Stripe makes the refund, but its answer never reaches us.
    stripe_fake.fail_next(path_prefix="/v1/refunds", status=500, count=2, kind="lost_response")
    lost = await reply(client, token, created["id"], **DECISION)
    assert lost.status_code == 502
    assert len(stripe_fake.all("refund")) == 1
    # Stripe's refund events arrive; a day later Stripe has forgotten the key.
    await deliver(new_events(stripe_fake, seen))
    stripe_fake.forget_idempotency_keys()

    # Finance repeats the approval, as the 409 on any other decision tells them to.
    repeated = await reply(client, token, created["id"], **DECISION)

    assert repeated.status_code == 201, repeated.text
    assert [r["amount"] for r in stripe_fake.all("refund")] == [1200]
    state = (
        await client.get(
            f"/v1/finance/refund-requests/{created['id']}", headers=bearer(token(**FINANCE))
        )
    ).json()
    assert (state["status"], state["refund"]["status"]) == ("refunded", "succeeded")
