"""What operators see when a lost chargeback's cancellation finds the subscription already gone
at Stripe: an expected answer (`resource_missing`: cancelled before), recorded as sent, and no
error in the logs (an error-level line pages someone, and nothing here needs anyone)."""

from __future__ import annotations

import asyncpg
from fastapi import FastAPI

from app.config import Settings
from tests.conftest import Deliver, plain_dsn
from tests.refunds.flows import pay_subscription
from tests.robustness.test_cli_failures import billing, log_entries
from tests.stripe_fake import StripeFake


async def test_a_lost_disputes_cancellation_of_a_subscription_already_gone_logs_no_error(
    app: FastAPI, settings: Settings, stripe_fake: StripeFake, deliver: Deliver
) -> None:
    paid = await pay_subscription(app, stripe_fake, deliver, account_id="acc_g", channel_id="ch_g")
    assert paid.subscription_id is not None
    opened = stripe_fake.create_dispute(paid.charge_id)
    dispute_id = opened[0]["data"]["object"]["id"]
    lost = [*opened, *stripe_fake.close_dispute(dispute_id, won=False)]
    stripe_fake.objects["subscription"].pop(paid.subscription_id)  # gone at Stripe
    await deliver(lost, process=False)

    # applied by `billing reconcile-events --apply`, as cron would run it (its drain sends
    # the cancellations the events asked for)
    result = billing(
        "reconcile-events",
        "--apply",
        database_url=settings.database_url,
        stripe_url=stripe_fake.url,
        log_level="INFO",
    )

    assert result.returncode == 0, result.stderr
    delete = f"/v1/subscriptions/{paid.subscription_id}"
    assert [r.status for r in stripe_fake.requests_to("DELETE", delete)] == [404]
    conn = await asyncpg.connect(plain_dsn(settings.database_url))
    try:
        sent = await conn.fetchval(
            "SELECT dispute_cancel_sent_at FROM subscriptions WHERE stripe_id = $1",
            paid.subscription_id,
        )
    finally:
        await conn.close()
    assert sent is not None  # taken as done, never sent again
    entries = log_entries(result.stdout + result.stderr)
    assert any(e["event"] == "stripe.request_rejected" for e in entries), entries
    errors = [e for e in entries if e.get("level") == "error"]
    assert errors == [], errors
