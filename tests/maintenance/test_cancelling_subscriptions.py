"""A subscription whose client had turned off renewal (Stripe set to end it at its period end,
`cancel_at`) when a maintenance window is completed keeps the window's days: they follow the
end of its paid period (contract: "each such subscription's access is extended by the calendar
days ... on which the service was unavailable").

Moving Stripe's `trial_end` past `cancel_at` would not move the cancellation: Stripe still ends
the subscription at `cancel_at`, now before its (moved) period end, and such an end gives no
days after it; the extension is therefore kept in `access_until` only, as for a subscription
Stripe already ended at its period end."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from fastapi import FastAPI

from app.maintenance.service import retry_pending_extensions
from app.subscriptions.access import cancel_access_until, subscription_access
from tests.conftest import Deliver, TokenFactory, bearer
from tests.maintenance.conftest import LiveSubscription
from tests.maintenance.test_completion import (
    ACROSS_MIDNIGHT,
    PERIOD_END,
    Factory,
    complete,
    open_window,
    stripe_updates,
    subscription,
)
from tests.maintenance.test_extension_pushes import extension_row, pushes
from tests.stripe_fake import StripeFake


async def test_a_subscription_set_to_end_at_its_period_end_keeps_the_days_after_its_end(
    client: httpx.AsyncClient,
    token: TokenFactory,
    deliver: Deliver,
    factory: Factory,
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    ops = bearer(token(scope="ops", sub="ops-fay"))
    sub = await live_subscription("acc_off", "ch_off", email="off@client.example")
    # The client turns off auto-renewal in the Customer Portal before the outage.
    await deliver(stripe_fake.update_subscription(sub["id"], cancel_at_period_end=True))
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)

    done = await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])

    assert done.status_code == 200, done.text
    assert done.json()["subscriptions_extended"] == 1
    listed = await client.get(
        "/v1/accounts/acc_off/subscriptions", headers=bearer(token(account_id="acc_off"))
    )
    [shown] = listed.json()["data"]
    assert (shown["extension_days"], shown["access_until"]) == (2, "2026-04-02T00:00:00Z")
    # Stripe still ends the subscription at its `cancel_at`; the two days follow that end.
    at_stripe = stripe_fake.get("subscription", sub["id"])
    stripe_fake.set_time(at_stripe["cancel_at"])
    await deliver(stripe_fake.renew_subscription(sub["id"]))
    ended = await subscription(factory, "ch_off")
    assert ended.status == "canceled"
    during = subscription_access(ended, PERIOD_END + timedelta(days=1))
    assert (during.has_access, during.access_until) == (True, PERIOD_END + timedelta(days=2))
    assert subscription_access(ended, PERIOD_END + timedelta(days=2)).has_access is False
    assert stripe_updates(stripe_fake, sub["id"]) == []  # nothing Stripe would honour


@pytest.mark.parametrize("mirrored", [True, False], ids=["event-delivered", "event-not-yet"])
async def test_renewal_turned_off_before_a_retried_push_keeps_the_days(
    mirrored: bool,
    app: FastAPI,
    client: httpx.AsyncClient,
    token: TokenFactory,
    deliver: Deliver,
    factory: Factory,
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    ops = bearer(token(scope="ops", sub="ops-fay"))
    sub = await live_subscription("acc_off2", "ch_off2", email="off2@client.example")
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)
    stripe_fake.fail_next(2, 500, path_prefix=f"/v1/subscriptions/{sub['id']}", method="POST")
    await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])
    assert (await extension_row(factory)).stripe_status == "pending"
    turned_off = stripe_fake.update_subscription(sub["id"], cancel_at_period_end=True)
    if mirrored:
        await deliver(turned_off)

    await retry_pending_extensions(factory, app.state.stripe)

    assert (await extension_row(factory)).stripe_status == "skipped"
    assert [r.status for r in pushes(stripe_fake, sub["id"])] == [500, 500]
    if not mirrored:
        await deliver(turned_off)
    row = await subscription(factory, "ch_off2")
    assert cancel_access_until(row) == PERIOD_END + timedelta(days=2)
