"""Events recovered from Stripe's Events API (`billing reconcile-events`) are rendered in the
API version current when they were created (the account's default), not in the pinned one
that webhook deliveries use: their payloads cannot decide the state in the pinned shape."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import httpx
from fastapi import FastAPI

from app.config import Settings
from app.webhooks.reconcile import reconcile
from tests.conftest import Deliver, TokenFactory, bearer
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import add_catalog, open_checkout

ACCOUNT, CHANNEL = "acc_versions", "chan_versions"
OLDER_VERSION = "2025-01-27.acacia"
"""Before 2025-03-31.basil: a subscription's period on the subscription, not on its items."""


def rendered_before_basil(event: dict[str, Any]) -> None:
    """`event` (a subscription event) as the Events API renders it for an account whose
    default API version predates basil."""
    subscription = event["data"]["object"]
    item = subscription["items"]["data"][0]
    subscription["current_period_start"] = item.pop("current_period_start")
    subscription["current_period_end"] = item.pop("current_period_end")
    event["api_version"] = OLDER_VERSION


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
