"""A channel whose subscription checkout Stripe has completed already has a subscription at
Stripe, even before `customer.subscription.created` reaches us (a late webhook, events out of
order): a second subscription checkout for it would be a second subscription billed for one
channel. It is 409 `subscription_exists`, as for a mirrored live subscription; once that
subscription has ended, the channel can be bought again."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.checkout.conftest import PostCheckout, subscription_body
from tests.conftest import Deliver, bearer
from tests.stripe_fake import StripeFake


@pytest.mark.parametrize("learnt_from", ["the browser's read", "checkout.session.completed"])
async def test_a_channel_whose_checkout_was_paid_cannot_be_bought_again_before_its_events(
    learnt_from: str,
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    first = (await post_checkout("acc_1", subscription_body("ch_1"))).json()
    events = stripe_fake.complete_checkout(first["stripe_checkout_session_id"])
    if learnt_from == "the browser's read":  # the client is back from Checkout, no event yet
        read = await client.get(
            f"/v1/accounts/acc_1/checkout-sessions/{first['id']}",
            headers=bearer(token(account_id="acc_1")),
        )
        assert (read.json()["status"], read.json()["fulfilled"]) == ("complete", False)
    else:  # only the session's event has arrived, the subscription's are late
        await deliver([e for e in events if e["type"] == "checkout.session.completed"])

    for plan in ("channel_monthly", "channel_yearly"):
        again = await post_checkout("acc_1", subscription_body("ch_1", plan=plan))
        assert again.status_code == 409, again.text
        assert again.json()["code"] == "subscription_exists"
    assert len(stripe_fake.all("checkout.session")) == 1

    # The subscription's events arrive; once Stripe has ended it, the channel is for sale.
    await deliver(events)
    subscription_id = stripe_fake.get("checkout.session", first["stripe_checkout_session_id"])[
        "subscription"
    ]
    await deliver(stripe_fake.delete_subscription(subscription_id))
    assert (await post_checkout("acc_1", subscription_body("ch_1"))).status_code == 201
