"""What a client does in the Customer Portal (or staff in Stripe's dashboard), as Stripe's
events report it: the subscription read model after each change."""

from __future__ import annotations

from typing import Any

import httpx

from tests.checkout.conftest import PostCheckout, subscription_body
from tests.conftest import Deliver, bearer
from tests.stripe_fake import StripeFake


async def _subscribe(
    post_checkout: PostCheckout, stripe_fake: StripeFake, deliver: Deliver, account: str = "acc_1"
) -> dict[str, Any]:
    created = (await post_checkout(account, subscription_body("ch_1"))).json()
    await deliver(stripe_fake.complete_checkout(created["stripe_checkout_session_id"]))
    [sub] = stripe_fake.all("subscription")
    return sub


async def _listed(client: httpx.AsyncClient, token: Any, account: str = "acc_1") -> Any:
    response = await client.get(
        f"/v1/accounts/{account}/subscriptions", headers=bearer(token(account_id=account))
    )
    assert response.status_code == 200, response.text
    [listed] = response.json()["data"]
    return listed


async def test_a_change_to_a_price_outside_the_catalog_does_not_show_the_old_plan(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    sub = await _subscribe(post_checkout, stripe_fake, deliver)
    item = sub["items"]["data"][0]["id"]
    await deliver(
        stripe_fake.update_subscription(
            sub["id"], items=[{"id": item, "price": "price_channel_yearly_usd"}]
        )
    )
    assert (await _listed(client, token))["plan"] == "channel_yearly"

    # staff move it to a custom price in Stripe's dashboard: not a plan of the catalog
    stripe_fake.add_price(
        id="price_custom_deal", unit_amount=1000, currency="usd", interval="month"
    )
    await deliver(
        stripe_fake.update_subscription(
            sub["id"], items=[{"id": item, "price": "price_custom_deal"}]
        )
    )
    listed = await _listed(client, token)
    assert listed["plan"] is None  # not channel_monthly, the plan its checkout named
    assert (listed["status"], listed["has_access"]) == ("active", True)
