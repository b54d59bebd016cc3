"""When a subscription payment's paid period ends, for the zero-usage refund right: a paid period
that ended without further payment is deemed fully rendered (policy section 1), even when
Stripe has already moved the subscription into a period nobody paid for."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from fastapi import FastAPI
from sqlalchemy import select

from app.models import Subscription
from tests.conftest import Deliver, TokenFactory, bearer
from tests.refunds.flows import pay_subscription
from tests.stripe_fake import StripeFake


async def test_a_paid_period_followed_by_a_declined_renewal_has_ended(
    app: FastAPI,
    client: httpx.AsyncClient,
    token: TokenFactory,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    # A month paid 35 days ago (the fake's month is 30 days); the renewal 5 days ago was
    # declined, so Stripe moved the subscription into a new period and marked it past_due.
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=35)
    stripe_fake.set_time(start.timestamp())
    paid = await pay_subscription(
        app, stripe_fake, deliver, account_id="acc_pd", channel_id="ch_pd"
    )
    assert paid.subscription_id is not None
    stripe_fake.set_time((start + timedelta(days=30)).timestamp())
    await deliver(stripe_fake.renew_subscription(paid.subscription_id, paid=False))
    async with app.state.session_factory() as session:
        subscription = await session.scalar(
            select(Subscription).where(Subscription.stripe_id == paid.subscription_id)
        )
    assert subscription is not None
    assert subscription.status == "past_due"
    assert subscription.current_period_end == start + timedelta(days=60)

    response = await client.get(
        "/v1/accounts/acc_pd/refund-eligibility", headers=bearer(token(account_id="acc_pd"))
    )

    quotes = {q["payment_id"]: q for q in response.json()["quotes"]}
    first = quotes[paid.payment_id]
    assert (first["eligible"], first["reasons"]) == (False, ["period_ended"])
