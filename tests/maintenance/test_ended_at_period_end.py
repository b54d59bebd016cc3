"""A subscription live during a maintenance window whose client had turned off renewal, and whose
paid period ended during the window (or before ops completed it), is still extended and
notified: the days it lost are added after its end (contract: "Clients with a subscription live
during the window are emailed; on completion each such subscription's access is extended")."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import select

from app.models import MaintenanceExtension, OutboxEmail
from app.subscriptions.access import access_until, subscription_access
from tests.conftest import Deliver, TokenFactory, bearer
from tests.maintenance.conftest import LiveSubscription
from tests.maintenance.test_completion import PERIOD_END, Factory, complete, subscription
from tests.stripe_fake import StripeFake

URL = "/v1/ops/maintenance-windows"
# 23:00 on Monday 30 March → 11:00 on Tuesday 31 March in Singapore (two calendar days); the
# paid period ends at 08:00 on 31 March local (00:00 UTC), inside the window.
OVER_THE_PERIOD_END = ("2026-03-30T15:00:00Z", "2026-03-31T03:00:00Z")


async def test_a_subscription_that_ended_at_its_period_end_during_the_window_is_extended(
    client: httpx.AsyncClient,
    token: TokenFactory,
    deliver: Deliver,
    factory: Factory,
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    ops = bearer(token(scope="ops", sub="ops-eve"))
    sub = await live_subscription("acc_end", "ch_end", email="end@client.example")
    # A non-renewing one that ended for non-payment before the window is not extended.
    unpaid = await live_subscription("acc_unpaid", "ch_unpaid", email="unpaid@client.example")
    # The client turns off auto-renewal in the Customer Portal.
    await deliver(stripe_fake.update_subscription(sub["id"], cancel_at_period_end=True))
    opened = await client.post(
        URL,
        json={
            "starts_at": OVER_THE_PERIOD_END[0],
            "ends_at": OVER_THE_PERIOD_END[1],
            "kind": "emergency",
            "reason": "Database failover",
        },
        headers=ops,
    )
    assert opened.status_code == 201, opened.text
    stripe_fake.set_time((PERIOD_END - timedelta(days=5)).timestamp())
    await deliver(stripe_fake.delete_subscription(unpaid["id"], reason="payment_failed"))
    # Stripe ends the subscription at its period end, in the middle of the outage.
    stripe_fake.set_time(PERIOD_END.timestamp())
    await deliver(stripe_fake.delete_subscription(sub["id"]))
    assert (await subscription(factory, "ch_end")).status == "canceled"

    done = await complete(client, ops, opened.json()["id"], OVER_THE_PERIOD_END[1])

    assert done.status_code == 200, done.text
    assert done.json()["subscriptions_extended"] == 1
    assert done.json()["accounts_notified"] == 1
    assert done.json()["stripe_updates"]["skipped"] == 1  # nothing to move at Stripe
    ended = await subscription(factory, "ch_end")
    assert ended.extension_days == 2
    assert access_until(ended) == PERIOD_END + timedelta(days=2)
    # The two lost days follow the end of the paid period, then access ends.
    during = subscription_access(ended, PERIOD_END + timedelta(days=1))
    assert (during.has_access, during.access_until) == (True, PERIOD_END + timedelta(days=2))
    after = subscription_access(ended, PERIOD_END + timedelta(days=2))
    assert after.has_access is False
    assert (await subscription(factory, "ch_unpaid")).extension_days == 0
    async with factory() as session:
        emails = list((await session.execute(select(OutboxEmail))).scalars())
        extensions = list((await session.execute(select(MaintenanceExtension))).scalars())
    assert [e.to_address for e in emails] == ["end@client.example"]
    assert "channel ch_end: +2 day(s) after the end of its paid period" in emails[0].body
    assert [(x.channel_id, x.days, x.stripe_status) for x in extensions] == [
        ("ch_end", 2, "skipped")
    ]
    assert datetime.now(UTC) > PERIOD_END  # the channel's feed entry is in the past already
