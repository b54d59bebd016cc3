"""What a client does in the Customer Portal (or staff in Stripe's dashboard), as Stripe's
events report it: the subscription read model after each change."""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.checkout.conftest import APP_URL, PostCheckout, subscription_body, top_up_body
from tests.conftest import Deliver, bearer
from tests.stripe_fake import StripeFake


async def _subscribe(
    post_checkout: PostCheckout,
    stripe_fake: StripeFake,
    deliver: Deliver,
    account: str = "acc_1",
    plan: str = "channel_monthly",
) -> dict[str, Any]:
    created = (await post_checkout(account, subscription_body("ch_1", plan=plan))).json()
    await deliver(stripe_fake.complete_checkout(created["stripe_checkout_session_id"]))
    [sub] = stripe_fake.all("subscription")
    return sub


async def _settle_fees(stripe_fake: StripeFake, deliver: Deliver) -> None:
    for payment in stripe_fake.all("invoice_payment"):
        intent = stripe_fake.get("payment_intent", payment["payment"]["payment_intent"])
        charge = stripe_fake.get("charge", intent["latest_charge"])
        if not isinstance(charge["balance_transaction"], str):
            await deliver(stripe_fake.settle_charge(charge["id"], fee=100))


async def _quotes(client: httpx.AsyncClient, token: Any) -> list[tuple[int, bool, list[str]]]:
    response = await client.get(
        "/v1/accounts/acc_1/refund-eligibility", headers=bearer(token(account_id="acc_1"))
    )
    assert response.status_code == 200, response.text
    return [(q["amount_paid"], q["eligible"], q["reasons"]) for q in response.json()["quotes"]]


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


async def test_a_downgrade_paid_from_the_yearly_payments_credit_ends_its_refund_right(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    """Yearly to monthly in the portal, three days in, nothing used: Stripe resets the cycle and
    turns the unused year into the customer's credit at Stripe, which pays the new month (the
    proration invoice is paid with nothing due). The year's payment is then quoted
    `period_ended`: its value now sits in Stripe's credit, which this service does not track
    and a refund (cancelling without proration) would not clear, so refunding it as well would
    pay the client twice; finance can still decide such a case by hand. The credit never
    reaches the prepaid balance."""
    real = time.time()
    stripe_fake.set_time(real - 3 * 86400)
    sub = await _subscribe(post_checkout, stripe_fake, deliver, plan="channel_yearly")
    await _settle_fees(stripe_fake, deliver)
    assert await _quotes(client, token) == [(39000, True, [])]
    stripe_fake.set_time(real)

    await deliver(stripe_fake.switch_interval(sub["id"], "price_channel_monthly_usd"))

    listed = await _listed(client, token)
    assert (listed["plan"], listed["status"], listed["has_access"]) == (
        "channel_monthly",
        "active",
        True,
    )
    assert listed["current_period_end"] == listed["access_until"]
    balance = await client.get(
        "/v1/accounts/acc_1/balance", headers=bearer(token(account_id="acc_1"))
    )
    assert (balance.json()["balance"], balance.json()["debt"]) == (0, 0)
    assert await _quotes(client, token) == [(39000, False, ["period_ended"])]


async def test_an_upgrade_is_paid_by_its_proration_payment_and_the_month_before_has_ended(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    """Monthly to yearly in the portal, three days in: Stripe resets the cycle and charges the
    year less the unused month at once. The proration payment pays the new yearly period;
    the month's payment paid the days before it (its rest was credited into the proration)."""
    real = time.time()
    stripe_fake.set_time(real - 3 * 86400)
    sub = await _subscribe(post_checkout, stripe_fake, deliver)
    stripe_fake.set_time(real)

    await deliver(stripe_fake.switch_interval(sub["id"], "price_channel_yearly_usd"))
    await _settle_fees(stripe_fake, deliver)

    listed = await _listed(client, token)
    assert (listed["plan"], listed["status"], listed["has_access"]) == (
        "channel_yearly",
        "active",
        True,
    )
    [item] = stripe_fake.get("subscription", sub["id"])["items"]["data"]
    assert listed["current_period_end"] == listed["access_until"]
    assert listed["current_period_end"].startswith(
        time.strftime("%Y-%m-%d", time.gmtime(item["current_period_end"]))
    )
    balance = await client.get(
        "/v1/accounts/acc_1/balance", headers=bearer(token(account_id="acc_1"))
    )
    assert (balance.json()["balance"], balance.json()["debt"]) == (0, 0)
    [(prorated, eligible, reasons), month] = await _quotes(client, token)
    assert 39000 - 3900 < prorated < 39000
    assert (eligible, reasons) == (True, [])
    assert month == (3900, False, ["period_ended"])


async def test_who_gets_a_portal_link(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    body = {"return_url": f"{APP_URL}/billing"}

    async def portal(account: str, tok: str) -> httpx.Response:
        return await client.post(
            f"/v1/accounts/{account}/portal-sessions", json=body, headers=bearer(tok)
        )

    # declined only: never paid
    declined = (await post_checkout("acc_d", subscription_body("ch_d"))).json()
    await deliver(stripe_fake.decline_checkout(declined["stripe_checkout_session_id"]))
    refused = await portal("acc_d", token(account_id="acc_d"))
    assert (refused.status_code, refused.json()["code"]) == (409, "portal_unavailable")

    # a top-up is a successful Stripe payment (README)
    top_up = (await post_checkout("acc_t", top_up_body())).json()
    await deliver(stripe_fake.complete_checkout(top_up["stripe_checkout_session_id"]))
    assert (await portal("acc_t", token(account_id="acc_t"))).status_code == 201

    # another account's user, or a service that may only read: 403, nothing made at Stripe
    made = len(stripe_fake.all("billing_portal.session"))
    assert (await portal("acc_t", token(account_id="acc_d"))).status_code == 403
    assert (await portal("acc_t", token(scope="billing:read"))).status_code == 403
    assert (await portal("acc_t", token(scope="billing:write"))).status_code == 201
    assert len(stripe_fake.all("billing_portal.session")) == made + 1
