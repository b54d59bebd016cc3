"""Several partial refunds of one payment: each is counted once in "already refunded", in
whatever order Stripe's events arrive. The charge's `amount_refunded` (from `charge.refunded`)
already includes a refund this service asked for, so while that refund's own `refund.*` event
is still on its way the refund must not be counted a second time as "asked for, not yet
reported"."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from tests.conftest import Deliver, TokenFactory
from tests.refunds.flows import balance, new_events, pay_top_up
from tests.refunds.test_refund_workflow import file_request, reply
from tests.stripe_fake import StripeFake

DECISION = {
    "kind": "decision",
    "message": "Refunded.",
    "outcome": "approved",
    "remedy": "refund",
}


async def test_a_partial_refund_reported_by_the_charge_first_is_counted_once(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_pc", amount=5000)
    one = await file_request(client, token, "acc_pc", payment_reference=paid.charge_id)
    two = await file_request(client, token, "acc_pc", payment_reference=paid.charge_id)
    seen = len(stripe_fake.events)
    first = await reply(client, token, one["id"], **DECISION, amount=2000)
    assert first.status_code == 201, first.text
    # Stripe's `charge.refunded` (amount_refunded 2000) arrives; `refund.created` is late.
    events = new_events(stripe_fake, seen)
    await deliver([event for event in events if event["type"] == "charge.refunded"])

    second = await reply(client, token, two["id"], **DECISION, amount=3000)

    assert second.status_code == 201, second.text  # 5000 paid, 2000 refunded: 3000 left
    assert [r["amount"] for r in stripe_fake.all("refund")] == [2000, 3000]
    await deliver(new_events(stripe_fake, seen))
    assert await balance(app, "acc_pc") == 0
