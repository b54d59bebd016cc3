"""An approval whose Stripe call failed (502: Stripe made nothing) leaves its refund attempt
`pending`, to be completed by repeating the approval. A chargeback (here an inquiry the bank
then closed for us) closes the request meanwhile, so the approval can no longer be repeated:
the attempt was never sent and never will be. Repeating it finds no refund at Stripe and
releases the attempt, so the unsent refund no longer holds back what may be refunded; a
refund Stripe did make is kept for its events to complete."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from sqlalchemy import func, update

from app.models import RefundExecution
from app.refunds.service import IN_FLIGHT_BOUND
from tests.conftest import Deliver, TokenFactory, bearer
from tests.refunds.flows import new_events, pay_top_up
from tests.refunds.test_refund_workflow import FINANCE, file_request, reply
from tests.stripe_fake import StripeFake

DECISION = {"kind": "decision", "message": "Refunded.", "outcome": "approved", "remedy": "refund"}


async def sent_long_ago(app: FastAPI) -> None:
    """Every refund attempt last sent longer ago than a Stripe call can last
    (`IN_FLIGHT_BOUND`): none can still be waiting for Stripe."""
    async with app.state.session_factory() as session, session.begin():
        await session.execute(
            update(RefundExecution).values(updated_at=func.now() - IN_FLIGHT_BOUND * 2)
        )


async def test_an_unsent_refund_of_a_request_a_chargeback_closed_is_released(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_us", amount=5000)
    first = await file_request(client, token, "acc_us", payment_reference=paid.charge_id)
    stripe_fake.fail_next(path_prefix="/v1/refunds", status=500, count=2)
    assert (await reply(client, token, first["id"], **DECISION, amount=2000)).status_code == 502
    assert stripe_fake.all("refund") == []  # Stripe made nothing
    opened = stripe_fake.create_dispute(paid.charge_id, status="warning_needs_response")
    await deliver(opened)  # the request is closed by the chargeback
    await deliver(stripe_fake.close_dispute(opened[0]["data"]["object"]["id"], won=True))

    second = await file_request(client, token, "acc_us", payment_reference=paid.charge_id)
    at_once = await reply(client, token, first["id"], **DECISION, amount=2000)
    assert at_once.status_code == 409, at_once.text
    # sent moments ago, it may still be in flight: kept, so 2000 is still held back
    assert (await reply(client, token, second["id"], **DECISION, amount=5000)).status_code == 422

    await sent_long_ago(app)
    repeated = await reply(client, token, first["id"], **DECISION, amount=2000)
    assert repeated.status_code == 409, repeated.text
    assert repeated.json()["code"] == "request_already_decided"
    assert stripe_fake.all("refund") == []  # still nothing sent for the closed request

    # The payment is with us again: all of it may be refunded on the new request.
    approved = await reply(client, token, second["id"], **DECISION, amount=5000)
    assert approved.status_code == 201, approved.text
    assert [r["amount"] for r in stripe_fake.all("refund")] == [5000]


async def test_a_refund_stripe_made_for_a_request_a_chargeback_closed_is_kept(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_uk", amount=5000)
    first = await file_request(client, token, "acc_uk", payment_reference=paid.charge_id)
    seen = len(stripe_fake.events)
    stripe_fake.fail_next(path_prefix="/v1/refunds", status=500, count=2, kind="lost_response")
    assert (await reply(client, token, first["id"], **DECISION, amount=2000)).status_code == 502
    [made] = stripe_fake.all("refund")  # Stripe made it; its events have not come yet
    refund_events = new_events(stripe_fake, seen)
    opened = stripe_fake.create_dispute(paid.charge_id, status="warning_needs_response")
    await deliver(opened)
    await deliver(stripe_fake.close_dispute(opened[0]["data"]["object"]["id"], won=True))

    repeated = await reply(client, token, first["id"], **DECISION, amount=2000)
    assert repeated.status_code == 409, repeated.text
    await deliver(refund_events)

    state = (
        await client.get(
            f"/v1/finance/refund-requests/{first['id']}", headers=bearer(token(**FINANCE))
        )
    ).json()
    assert (state["refund"]["status"], state["refund"]["stripe_refund_id"]) == (
        "succeeded",
        made["id"],
    )
    second = await file_request(client, token, "acc_uk", payment_reference=paid.charge_id)
    too_much = await reply(client, token, second["id"], **DECISION, amount=5000)
    assert too_much.status_code == 422, too_much.text  # 2000 of it went back


async def test_an_unsent_retry_of_a_payment_whose_chargeback_was_lost_is_released(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    disputed = await pay_top_up(app, stripe_fake, deliver, account_id="acc_ur", amount=5000)
    other = await pay_top_up(app, stripe_fake, deliver, account_id="acc_ur", amount=3000)
    first = await file_request(client, token, "acc_ur", payment_reference=disputed.charge_id)
    seen = len(stripe_fake.events)
    assert (await reply(client, token, first["id"], **DECISION, amount=2000)).status_code == 201
    [failed] = stripe_fake.all("refund")
    stripe_fake.fail_refund(failed["id"])
    await deliver(new_events(stripe_fake, seen))  # refund_failed: balance 8000 again
    url = f"/v1/finance/refund-requests/{first['id']}/refund-attempts"
    finance = bearer(token(**FINANCE))
    stripe_fake.fail_next(path_prefix="/v1/refunds", status=500, count=2)
    assert (await client.post(url, json={}, headers=finance)).status_code == 502
    assert len(stripe_fake.all("refund")) == 1  # the retry made nothing at Stripe
    opened = stripe_fake.create_dispute(disputed.charge_id)
    await deliver(opened)
    dispute_id = opened[0]["data"]["object"]["id"]
    await deliver(stripe_fake.withdraw_dispute_funds(dispute_id))
    await deliver(stripe_fake.close_dispute(dispute_id, won=False))  # balance 3000

    await sent_long_ago(app)
    repeated = await client.post(url, json={}, headers=finance)
    assert repeated.status_code == 409, repeated.text
    assert repeated.json()["code"] == "payment_disputed"
    assert len(stripe_fake.all("refund")) == 1

    # The retry never sent holds back none of the unspent 3000 of the other top-up.
    second = await file_request(client, token, "acc_ur", payment_reference=other.charge_id)
    approved = await reply(client, token, second["id"], **DECISION, amount=3000)
    assert approved.status_code == 201, approved.text
