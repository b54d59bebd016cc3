"""An approval whose Stripe answer was lost (Stripe made the refund; the service answered 502),
repeated by finance as the 409 on any other decision tells them to:

- after Stripe forgot its idempotency key (Stripe keeps keys 24 hours), the refund Stripe
  already made is the approval's refund, never a second one, whether Stripe's refund events
  named it or not (then it is found at Stripe by the execution id in its metadata);
- after Stripe reported that refund failed, the repeated approval records the decision as
  `refund_failed`, so finance can retry the refund."""

from __future__ import annotations

from typing import Any

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


async def lost_approval(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
    account_id: str,
) -> tuple[dict[str, Any], int]:
    """A paid subscription's refund request approved while Stripe's answer is lost: (the
    request, how many Stripe events there were before the refund)."""
    paid = await pay_subscription(
        app, stripe_fake, deliver, account_id=account_id, channel_id=f"ch_{account_id}"
    )
    created = await file_request(client, token, account_id, payment_reference=paid.payment_id)
    seen = len(stripe_fake.events)
    stripe_fake.fail_next(path_prefix="/v1/refunds", status=500, count=2, kind="lost_response")
    assert (await reply(client, token, created["id"], **DECISION)).status_code == 502
    assert len(stripe_fake.all("refund")) == 1  # Stripe made it
    return created, seen


async def request_and_refund_status(
    client: httpx.AsyncClient, token: TokenFactory, request_id: str
) -> tuple[str, str]:
    state = (
        await client.get(
            f"/v1/finance/refund-requests/{request_id}", headers=bearer(token(**FINANCE))
        )
    ).json()
    return state["status"], state["refund"]["status"]


async def test_repeating_a_lost_approval_after_stripe_forgot_its_key_makes_no_second_refund(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    created, seen = await lost_approval(app, client, stripe_fake, deliver, token, "acc_k")
    # Stripe's refund events arrive; a day later Stripe has forgotten the key.
    await deliver(new_events(stripe_fake, seen))
    stripe_fake.forget_idempotency_keys()

    repeated = await reply(client, token, created["id"], **DECISION)

    assert repeated.status_code == 201, repeated.text
    assert [r["amount"] for r in stripe_fake.all("refund")] == [1200]
    assert await request_and_refund_status(client, token, created["id"]) == (
        "refunded",
        "succeeded",
    )


async def test_repeating_a_lost_approval_before_any_refund_event_and_after_the_key_expired_finds_the_refund(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    created, seen = await lost_approval(app, client, stripe_fake, deliver, token, "acc_n")
    [made] = stripe_fake.all("refund")
    stripe_fake.forget_idempotency_keys()  # a day later, and no refund event has come

    repeated = await reply(client, token, created["id"], **DECISION)

    assert repeated.status_code == 201, repeated.text
    assert [r["id"] for r in stripe_fake.all("refund")] == [made["id"]]  # no second refund
    assert repeated.json()["refund"]["stripe_refund_id"] == made["id"]
    await deliver(new_events(stripe_fake, seen))
    assert await request_and_refund_status(client, token, created["id"]) == (
        "refunded",
        "succeeded",
    )


async def test_a_lost_approval_whose_refund_failed_can_be_recorded_and_retried(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    created, seen = await lost_approval(app, client, stripe_fake, deliver, token, "acc_l")
    [refund] = stripe_fake.all("refund")
    stripe_fake.fail_refund(refund["id"])
    await deliver(new_events(stripe_fake, seen))

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


async def test_a_retried_refund_whose_answer_was_lost_is_found_at_stripe_after_the_key_expired(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    created, seen = await lost_approval(app, client, stripe_fake, deliver, token, "acc_r")
    [first] = stripe_fake.all("refund")
    stripe_fake.fail_refund(first["id"])
    await deliver(new_events(stripe_fake, seen))
    assert (await reply(client, token, created["id"], **DECISION)).json()["status"] == (
        "refund_failed"
    )
    url = f"/v1/finance/refund-requests/{created['id']}/refund-attempts"
    finance = bearer(token(**FINANCE))
    stripe_fake.fail_next(path_prefix="/v1/refunds", status=500, count=2, kind="lost_response")
    lost = await client.post(url, json={"note": "Card replaced"}, headers=finance)
    assert lost.status_code == 502, lost.text
    [_, second] = stripe_fake.all("refund")  # Stripe made the retry's refund
    stripe_fake.forget_idempotency_keys()

    repeated = await client.post(url, json={"note": "Card replaced"}, headers=finance)

    assert repeated.status_code == 201, repeated.text
    assert [r["id"] for r in stripe_fake.all("refund")] == [first["id"], second["id"]]
    assert repeated.json()["refund"]["stripe_refund_id"] == second["id"]
