"""Stripe objects in shapes our own flows never make: fields Stripe leaves null, objects made
in the Dashboard rather than by this service. Each is delivered signed through the ASGI app,
from the Stripe fake, into real Postgres."""

from __future__ import annotations

import copy

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from app.models import Account, Payment
from tests.conftest import Deliver, TokenFactory, bearer
from tests.refunds.flows import pay_subscription
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import PRICE_ID


@pytest.mark.parametrize("invoice_events", ["as-sent", "after-the-payment"])
async def test_a_paid_invoice_without_a_subscription_is_no_subscription_payment(
    invoice_events: str,
    app: FastAPI,
    client: httpx.AsyncClient,
    token: TokenFactory,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    """An invoice made in Stripe's Dashboard for the client's customer (a one-off charge:
    `parent` null, no subscription) and paid: its invoice payment was recorded as a payment of
    purpose `subscription`, so the zero-usage refund right quoted it, with no paid period to
    end it, eligible forever. The policy's right is for a subscription's payment only. Either
    order: the invoice's own events in the batch of its payment's, or in a later one."""
    paid = await pay_subscription(
        app, stripe_fake, deliver, account_id="acc_oneoff", channel_id="ch_oneoff"
    )
    async with app.state.session_factory() as session:
        account = await session.get(Account, "acc_oneoff")
        assert account is not None and account.stripe_customer_id is not None
        customer = account.stripe_customer_id
    invoice = stripe_fake._build_invoice(
        customer,
        [{"price": PRICE_ID, "amount": 25000}],
        subscription=None,
        billing_reason="manual",
    )
    assert invoice["parent"] is None
    events = stripe_fake.pay_invoice(invoice["id"])
    if invoice_events == "after-the-payment":
        of_invoice = [e for e in events if e["type"].startswith("invoice.")]
        await deliver([e for e in events if e not in of_invoice])
        events = of_invoice
    await deliver(events)
    async with app.state.session_factory() as session:
        one_off = await session.scalar(
            select(Payment).where(Payment.stripe_invoice_id == invoice["id"])
        )
        assert one_off is not None and one_off.status == "succeeded"
        assert one_off.stripe_charge_id is not None
    await deliver(stripe_fake.settle_charge(one_off.stripe_charge_id, fee=755))

    response = await client.get(
        "/v1/accounts/acc_oneoff/refund-eligibility",
        headers=bearer(token(account_id="acc_oneoff")),
    )

    assert response.status_code == 200, response.text
    quoted = [quote["payment_id"] for quote in response.json()["quotes"]]
    assert quoted == [paid.payment_id]


async def test_a_subscription_with_an_added_item_keeps_its_plan(
    app: FastAPI,
    client: httpx.AsyncClient,
    token: TokenFactory,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    """A subscription with several items: an add-on price (not in the catalog, quantity 2)
    added to it in Stripe's Dashboard, listed before the plan's item. The plan was read from
    the first item only, so the subscription answered `plan: null` (the README's "the price
    was changed to one outside the catalog") while the catalog's price was still billed."""
    paid = await pay_subscription(
        app, stripe_fake, deliver, account_id="acc_items", channel_id="ch_items"
    )
    assert paid.subscription_id is not None
    addon = stripe_fake.add_price(unit_amount=500, currency="usd", product_name="Extra seat")
    stored = stripe_fake.get("subscription", paid.subscription_id)
    item = copy.deepcopy(stored["items"]["data"][0])
    item.update({"id": "si_addon", "price": copy.deepcopy(addon), "quantity": 1})
    stored["items"]["data"].insert(0, item)
    stored["items"]["total_count"] = 2
    await deliver(
        stripe_fake.update_subscription(
            paid.subscription_id, items=[{"id": "si_addon", "quantity": 2}]
        )
    )

    response = await client.get(
        "/v1/accounts/acc_items/subscriptions", headers=bearer(token(account_id="acc_items"))
    )

    assert response.status_code == 200, response.text
    [subscription] = response.json()["data"]
    assert subscription["plan"] == "channel_monthly"
