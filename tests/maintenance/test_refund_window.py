"""A maintenance extension pushed to Stripe moves Stripe's period end, but never the end of the
paid period the zero-usage refund right lasts for (contract: a maintenance window never
creates a refund right)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.models import Payment, Subscription
from tests.conftest import Deliver, TokenFactory, bearer
from tests.maintenance.conftest import LiveSubscription
from tests.stripe_fake import StripeFake

URL = "/v1/ops/maintenance-windows"


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def test_extension_days_pushed_to_stripe_do_not_reopen_the_refund_window(
    client: httpx.AsyncClient,
    token: TokenFactory,
    factory: async_sessionmaker[AsyncSession],
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    # A month paid 31 days ago (the fake's month is 30 days): its paid period ended yesterday.
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=31)
    sub = await live_subscription("acc_mw", "ch_mw", email="mw@client.example", start=start)
    async with factory() as session:
        payment = (
            await session.execute(select(Payment).where(Payment.account_id == "acc_mw"))
        ).scalar_one()
    assert payment.stripe_charge_id is not None
    await deliver(stripe_fake.settle_charge(payment.stripe_charge_id, fee=150))
    quotes_url = "/v1/accounts/acc_mw/refund-eligibility"
    client_headers = bearer(token(account_id="acc_mw"))

    # An emergency outage in the middle of that period, touching three calendar days: the
    # subscription is extended by three days, pushed to Stripe as its new trial end.
    ops = bearer(token(scope="ops", sub="ops-bob"))
    outage_start = start + timedelta(days=10, hours=2)
    outage_end = outage_start + timedelta(days=2)
    opened = await client.post(
        URL,
        json={
            "starts_at": iso(outage_start),
            "ends_at": iso(outage_end),
            "kind": "emergency",
            "reason": "Data centre outage",
        },
        headers=ops,
    )
    assert opened.status_code == 201, opened.text
    completed = await client.post(
        f"{URL}/{opened.json()['id']}/complete", json={"ended_at": iso(outage_end)}, headers=ops
    )
    assert completed.status_code == 200, completed.text
    assert completed.json()["stripe_updates"]["applied"] == 1
    await deliver([e for e in stripe_fake.events if e["type"] == "customer.subscription.updated"])
    async with factory() as session:
        row = (
            await session.execute(select(Subscription).where(Subscription.stripe_id == sub["id"]))
        ).scalar_one()
    paid_period_end = start + timedelta(days=30)
    assert row.extension_days == row.extension_days_in_period == 3
    assert row.current_period_end == paid_period_end + timedelta(days=3)  # Stripe's, moved

    # The client still has access for the extra days, but the paid period is over.
    quotes = (await client.get(quotes_url, headers=client_headers)).json()["quotes"]
    assert [(q["eligible"], q["reasons"]) for q in quotes] == [(False, ["period_ended"])]


async def test_the_period_paid_after_an_extended_trial_keeps_its_whole_refund_window(
    client: httpx.AsyncClient,
    token: TokenFactory,
    factory: async_sessionmaker[AsyncSession],
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    # First month from 61 days ago, extended by three days; Stripe then renews at the moved
    # date for a full month, which ends in two days: that payment's period is still running.
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=61)
    sub = await live_subscription("acc_mr", "ch_mr", email="mr@client.example", start=start)
    ops = bearer(token(scope="ops"))
    outage_start = start + timedelta(days=10, hours=2)
    outage_end = outage_start + timedelta(days=2)
    opened = await client.post(
        URL,
        json={
            "starts_at": iso(outage_start),
            "ends_at": iso(outage_end),
            "kind": "emergency",
            "reason": "Data centre outage",
        },
        headers=ops,
    )
    completed = await client.post(
        f"{URL}/{opened.json()['id']}/complete", json={"ended_at": iso(outage_end)}, headers=ops
    )
    assert completed.json()["stripe_updates"]["applied"] == 1
    stripe_fake.set_time((start + timedelta(days=33)).timestamp())
    await deliver(stripe_fake.renew_subscription(sub["id"]))
    async with factory() as session:
        payments = (
            (
                await session.execute(
                    select(Payment)
                    .where(Payment.account_id == "acc_mr")
                    .order_by(Payment.paid_at.desc())
                )
            )
            .scalars()
            .all()
        )
        row = (
            await session.execute(select(Subscription).where(Subscription.stripe_id == sub["id"]))
        ).scalar_one()
    assert row.current_period_end == start + timedelta(days=63)
    for payment in payments:
        assert payment.stripe_charge_id is not None
        await deliver(stripe_fake.settle_charge(payment.stripe_charge_id, fee=150))

    quotes = (
        await client.get(
            "/v1/accounts/acc_mr/refund-eligibility", headers=bearer(token(account_id="acc_mr"))
        )
    ).json()["quotes"]
    assert [(q["payment_id"], q["eligible"], q["reasons"]) for q in quotes] == [
        (str(payments[0].id), True, []),
        (str(payments[1].id), False, ["period_ended"]),
    ]
