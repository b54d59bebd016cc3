"""A pending extension push retried after its subscription ended never extends it at Stripe.

The push is retried (`retry_pending_extensions`) with the row's own key once Stripe recovers;
by then the client may have cancelled. Stripe refuses to update a cancelled subscription
(only its metadata and cancellation details may change), so the retry records the row as
`rejected` and Stripe's subscription stays as it ended, whether or not our mirror has heard of
the cancellation yet.
"""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.maintenance.service import retry_pending_extensions
from tests.conftest import Deliver, TokenFactory, bearer
from tests.maintenance.conftest import LiveSubscription
from tests.maintenance.test_completion import (
    ACROSS_MIDNIGHT,
    PERIOD_END,
    Factory,
    complete,
    open_window,
    subscription,
)
from tests.maintenance.test_extension_pushes import extension_row, pushes
from tests.robustness.test_cli_failures import billing, log_entries
from tests.stripe_fake import StripeFake


@pytest.fixture
def ops(token: TokenFactory) -> dict[str, str]:
    return bearer(token(scope="ops", sub="ops-dave"))


@pytest.mark.parametrize("mirrored", [True, False], ids=["event-delivered", "event-not-yet"])
async def test_a_retried_push_never_extends_a_subscription_cancelled_since(
    mirrored: bool,
    app: FastAPI,
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    sub = await live_subscription("acc_c1", "ch_c1", email="c1@client.example")
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)
    stripe_fake.fail_next(2, 500, path_prefix=f"/v1/subscriptions/{sub['id']}", method="POST")
    await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])
    assert (await extension_row(factory)).stripe_status == "pending"

    ended = stripe_fake.delete_subscription(sub["id"])  # the client cancels meanwhile
    if mirrored:
        await deliver(ended)
        assert (await subscription(factory, "ch_c1")).status == "canceled"

    assert await retry_pending_extensions(factory, app.state.stripe) == 1

    extension = await extension_row(factory)
    assert extension.stripe_status == "rejected"
    assert extension.last_error and "canceled subscription" in extension.last_error
    at_stripe = stripe_fake.get("subscription", sub["id"])
    assert at_stripe["status"] == "canceled"
    assert at_stripe["trial_end"] is None
    assert at_stripe["items"]["data"][0]["current_period_end"] == int(PERIOD_END.timestamp())
    assert [r.status for r in pushes(stripe_fake, sub["id"])][-1] == 400


async def test_billing_push_extensions_logs_a_refused_push_as_an_outcome_not_an_error(
    settings: Settings,
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    """Stripe refusing to move a subscription that has ended is an outcome README names (the
    row is `rejected`, the days stay in `access_until`): `billing push-extensions` run by cron
    logs it at warning with the extension's id, and nothing at error (which pages someone)."""
    sub = await live_subscription("acc_c2", "ch_c2", email="c2@client.example")
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)
    stripe_fake.fail_next(2, 500, path_prefix=f"/v1/subscriptions/{sub['id']}")
    await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])
    stripe_fake.delete_subscription(sub["id"])  # the client cancels meanwhile

    result = billing(
        "push-extensions",
        database_url=settings.database_url,
        stripe_url=stripe_fake.url,
        log_level="INFO",
    )

    assert result.returncode == 0, result.stderr
    extension = await extension_row(factory)
    assert extension.stripe_status == "rejected"
    entries = log_entries(result.stdout + result.stderr)
    [rejected] = [e for e in entries if e["event"] == "maintenance.stripe_push_rejected"]
    assert (rejected["level"], rejected["extension_id"]) == ("warning", extension.id)
    errors = [e for e in entries if e.get("level") == "error"]
    assert errors == [], errors
