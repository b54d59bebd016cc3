"""Events recovered from Stripe's Events API (`billing reconcile-events`) are rendered in the
API version current when they were created (the account's default), not in the pinned one
that webhook deliveries use: their payloads cannot decide the state in the pinned shape."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI

from app.config import Settings
from app.webhooks.reconcile import reconcile
from tests.conftest import Deliver, TokenFactory, bearer
from tests.refunds.flows import pay_subscription
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import add_catalog, open_checkout

ACCOUNT, CHANNEL = "acc_versions", "chan_versions"
OLDER_VERSION = "2025-01-27.acacia"
"""Before 2025-03-31.basil: a subscription's period on the subscription, not on its items; an
invoice's subscription on the invoice, not under `parent.subscription_details`."""


def rendered_before_basil(event: dict[str, Any]) -> None:
    """`event` (a subscription or invoice event) as the Events API renders it for an account
    whose default API version predates basil."""
    event["api_version"] = OLDER_VERSION
    if event["type"].startswith("invoice."):
        invoice = event["data"]["object"]
        details = invoice.pop("parent")["subscription_details"]
        invoice["subscription"] = details["subscription"]
        invoice["subscription_details"] = {"metadata": details["metadata"]}
        return
    subscription = event["data"]["object"]
    item = subscription["items"]["data"][0]
    subscription["current_period_start"] = item.pop("current_period_start")
    subscription["current_period_end"] = item.pop("current_period_end")


async def test_a_recovered_subscription_event_of_another_api_version_keeps_the_paid_access(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    settings: Settings,
    token: TokenFactory,
) -> None:
    add_catalog(stripe_fake)
    session_id = await open_checkout(
        app, account_id=ACCOUNT, purpose="subscription", channel_id=CHANNEL
    )
    await deliver(stripe_fake.complete_checkout(session_id))
    subscription_id = str(stripe_fake.get("checkout.session", session_id)["subscription"])
    period_end = stripe_fake.get("subscription", subscription_id)["items"]["data"][0][
        "current_period_end"
    ]
    # a minute later the client cancels at period end; that delivery never arrives
    stripe_fake.set_time(time.time() + 60)
    [missed] = stripe_fake.update_subscription(subscription_id, cancel_at_period_end=True)
    stripe_fake.set_time(None)
    [listed] = [e for e in stripe_fake.events if e["id"] == missed["id"]]
    rendered_before_basil(listed)  # what the Events API lists for this account

    report = await reconcile(app.state.engine, app.state.stripe, settings)
    assert report.recovered_by_type["customer.subscription.updated"] == 1
    assert report.other_api_version == 1
    await app.state.event_processor.drain()

    response = await client.get(
        f"/v1/channels/{CHANNEL}/access", headers=bearer(token(scope="billing:read"))
    )
    assert response.status_code == 200, response.text
    access = response.json()
    assert access["has_access"] is True  # paid until the period ends
    assert access["reason"] == "cancelling"
    assert access["access_until"] is not None
    assert datetime.fromisoformat(access["access_until"]).timestamp() == period_end


async def test_a_recovered_invoice_of_another_api_version_still_ends_the_period_it_renewed(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    settings: Settings,
    token: TokenFactory,
) -> None:
    """A month paid 35 days ago, renewed (paid) 5 days ago; the renewal's `invoice.paid` was
    never delivered and the Events API lists it without `parent`: the invoice must still be
    the subscription's, or the first payment reads as paying for the current period (a
    refund right for a period deemed fully rendered)."""
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=35)
    stripe_fake.set_time(start.timestamp())
    first = await pay_subscription(
        app, stripe_fake, deliver, account_id=ACCOUNT, channel_id=CHANNEL
    )
    assert first.subscription_id is not None
    stripe_fake.set_time((start + timedelta(days=30)).timestamp())
    renewal = stripe_fake.renew_subscription(first.subscription_id, paid=True)
    stripe_fake.set_time(None)
    [missed] = [e for e in renewal if e["type"] == "invoice.paid"]
    await deliver([e for e in renewal if e is not missed])
    [listed] = [e for e in stripe_fake.events if e["id"] == missed["id"]]
    rendered_before_basil(listed)

    report = await reconcile(app.state.engine, app.state.stripe, settings)
    assert report.recovered_by_type["invoice.paid"] == 1
    await app.state.event_processor.drain()

    response = await client.get(
        f"/v1/accounts/{ACCOUNT}/refund-eligibility", headers=bearer(token(account_id=ACCOUNT))
    )
    assert response.status_code == 200, response.text
    quotes = {q["payment_id"]: q for q in response.json()["quotes"]}
    assert "period_ended" in quotes[first.payment_id]["reasons"]
