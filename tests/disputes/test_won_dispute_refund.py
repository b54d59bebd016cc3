"""A chargeback the bank decided for us leaves the payment refundable again (Stripe has the last
word on the refund itself); while a chargeback is open, or after it was lost (the client has the
money back then), the payment stays out of refunds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from fastapi import FastAPI

from tests.conftest import Deliver, TokenFactory, bearer
from tests.refunds.flows import new_events, outbox, pay_subscription, set_email
from tests.refunds.test_refund_workflow import file_request, reply
from tests.refunds.test_retry_and_close import quote
from tests.stripe_fake import StripeFake


async def test_a_payment_whose_chargeback_we_won_can_be_refunded_again(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_subscription(
        app, stripe_fake, deliver, account_id="acc_won", channel_id="ch_won"
    )
    opened = stripe_fake.create_dispute(paid.charge_id)
    await deliver(opened)
    dispute_id = opened[0]["data"]["object"]["id"]
    assert (await quote(client, token, "acc_won"))["reasons"] == ["disputed"]

    await deliver(stripe_fake.withdraw_dispute_funds(dispute_id))
    await deliver(stripe_fake.close_dispute(dispute_id, won=True))

    # The bank kept the payment with us: the zero-usage right is the client's again.
    quoted = await quote(client, token, "acc_won")
    assert quoted["reasons"] == []
    assert quoted["eligible"] is True
    request = await file_request(client, token, "acc_won", payment_reference=paid.payment_intent)
    seen = len(stripe_fake.events)
    approved = await reply(
        client,
        token,
        request["id"],
        kind="decision",
        message="Refunded after the chargeback was decided.",
        outcome="approved",
        remedy="refund",
        amount=quoted["refundable_amount"],
    )
    assert approved.status_code == 201, approved.text
    await deliver(new_events(stripe_fake, seen))
    assert len(stripe_fake.all("refund")) == 1


async def test_a_payment_whose_chargeback_was_lost_is_never_refunded(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_subscription(
        app, stripe_fake, deliver, account_id="acc_lost", channel_id="ch_lost"
    )
    opened = stripe_fake.create_dispute(paid.charge_id)
    dispute_id = opened[0]["data"]["object"]["id"]
    await deliver([*opened, *stripe_fake.withdraw_dispute_funds(dispute_id)])
    await deliver(stripe_fake.close_dispute(dispute_id, won=False))

    assert "disputed" in (await quote(client, token, "acc_lost"))["reasons"]
    request = await file_request(client, token, "acc_lost", payment_reference=paid.payment_intent)
    assert request["status"] == "closed"  # as the dispute's events close one filed before it
    refused = await reply(
        client,
        token,
        request["id"],
        kind="decision",
        message="No.",
        outcome="approved",
        remedy="refund",
        amount=1000,
    )
    assert refused.status_code == 409
    assert refused.json()["code"] == "request_already_decided"
    assert stripe_fake.all("refund") == []


async def test_a_late_event_of_a_won_chargeback_does_not_close_a_refund_request_filed_after_it(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    stripe_fake.set_time((now - timedelta(days=10)).timestamp())
    paid = await pay_subscription(
        app, stripe_fake, deliver, account_id="acc_late", channel_id="ch_late"
    )
    # Asked for a refund by email a day later, then disputed the payment with the bank.
    before = await client.post(
        "/v1/finance/refund-requests",
        json={
            "account_id": "acc_late",
            "type": "refund",
            "description": "Please refund",
            "channel": "email",
            "payment_reference": paid.payment_intent,
            "received_at": (now - timedelta(days=9)).isoformat(),
        },
        headers=bearer(token(scope="finance", sub="alice@1msg.io")),
    )
    assert before.status_code == 201, before.text
    stripe_fake.set_time((now - timedelta(days=8)).timestamp())
    opened = stripe_fake.create_dispute(paid.charge_id)
    dispute_id = opened[0]["data"]["object"]["id"]
    withdrawn = stripe_fake.withdraw_dispute_funds(dispute_id)
    stripe_fake.set_time((now - timedelta(days=1)).timestamp())
    closed, reinstated = stripe_fake.close_dispute(dispute_id, won=True)
    assert reinstated["type"] == "charge.dispute.funds_reinstated"
    stripe_fake.set_time(None)
    # Stripe's funds_reinstated delivery fails and is retried later; the others arrive in
    # reverse order (the request the chargeback replaced is closed whatever the order).
    for event in [closed, *withdrawn[::-1], *opened]:
        await deliver([event])

    # The bank decided for us: the payment is with us again and the client asks for a refund.
    quoted = await quote(client, token, "acc_late")
    assert quoted["eligible"] is True
    request = await file_request(client, token, "acc_late", payment_reference=paid.payment_intent)
    await deliver([reinstated])

    # Stripe's retried event of the same won dispute is no chargeback of the payment: the
    # request stays open and is refunded as any other.
    shown = await client.get(
        "/v1/accounts/acc_late/refund-requests", headers=bearer(token(account_id="acc_late"))
    )
    statuses = {r["id"]: r["status"] for r in shown.json()}
    assert statuses == {before.json()["id"]: "closed", request["id"]: "received"}
    approved = await reply(
        client,
        token,
        request["id"],
        kind="decision",
        message="Refunded after the chargeback was decided.",
        outcome="approved",
        remedy="refund",
        amount=quoted["refundable_amount"],
    )
    assert approved.status_code == 201, approved.text
    assert len(stripe_fake.all("refund")) == 1


async def test_a_refund_request_filed_during_an_open_chargeback_is_closed_as_one_filed_before(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    """The dispute's events close the payment's open refund requests; a request filed after
    they were applied (by reference, or identified later by a PATCH) is closed at once the same
    way, rather than waiting, `received` with running deadlines, for the dispute's next event
    (none comes after a lost chargeback's last)."""
    paid = await pay_subscription(
        app, stripe_fake, deliver, account_id="acc_cb", channel_id="ch_cb"
    )
    await set_email(app, "acc_cb", "client@acc-cb.example")
    opened = stripe_fake.create_dispute(paid.charge_id)
    await deliver(opened)
    dispute_id = opened[0]["data"]["object"]["id"]

    named = await file_request(client, token, "acc_cb", payment_reference=paid.payment_intent)
    waiting = await file_request(client, token, "acc_cb")
    assert waiting["status"] == "needs_information"
    patched = await client.patch(
        f"/v1/accounts/acc_cb/refund-requests/{waiting['id']}",
        json={"payment_reference": paid.payment_intent},
        headers=bearer(token(account_id="acc_cb")),
    )
    assert patched.status_code == 200, patched.text

    assert named["status"] == "closed"
    assert patched.json()["status"] == "closed"
    await deliver(stripe_fake.withdraw_dispute_funds(dispute_id))
    finance = bearer(token(scope="finance", sub="alice@1msg.io"))
    for request_id in (named["id"], waiting["id"]):
        shown = await client.get(f"/v1/finance/refund-requests/{request_id}", headers=finance)
        assert shown.status_code == 200, shown.text
        body = shown.json()
        assert (body["status"], body["overdue"]) == ("closed", False)
        actions = [step["action"] for step in body["audit"]]
        assert actions.count("closed_by_chargeback") == 1, actions
    assert sorted(e.subject for e in await outbox(app, "client@acc-cb.example")) == sorted(
        f"Your refund request is closed [{request_id}]"
        for request_id in (named["id"], waiting["id"])
    )
