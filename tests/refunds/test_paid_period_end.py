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


async def test_a_paid_period_has_ended_once_stripe_moved_on_before_the_renewal_is_charged(
    app: FastAPI,
    client: httpx.AsyncClient,
    token: TokenFactory,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    """At a period's end Stripe moves the subscription into the next period at once
    (`customer.subscription.updated`, `invoice.created` with a draft invoice) and finalizes
    and charges the renewal about an hour later. The period paid before has ended (its quote
    said so until then), yet once the subscription's event arrived its quote read its end from
    the new, unpaid period: eligible for a refund again for up to an hour after every renewal
    (longer when the invoice is not charged at once)."""
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=30, minutes=10)
    stripe_fake.set_time(start.timestamp())
    paid = await pay_subscription(
        app, stripe_fake, deliver, account_id="acc_mo", channel_id="ch_mo"
    )
    assert paid.subscription_id is not None
    quotes_url = "/v1/accounts/acc_mo/refund-eligibility"
    headers = bearer(token(account_id="acc_mo"))
    before = (await client.get(quotes_url, headers=headers)).json()["quotes"]
    assert [(q["eligible"], q["reasons"]) for q in before] == [(False, ["period_ended"])]
    stripe_fake.set_time((start + timedelta(days=30)).timestamp())  # its end, ten minutes ago
    renewal = stripe_fake.renew_subscription(paid.subscription_id)
    moved_on = [
        e for e in renewal if e["type"] in ("customer.subscription.updated", "invoice.created")
    ]
    await deliver(moved_on)  # the renewal's payment is not made yet

    quotes = (await client.get(quotes_url, headers=headers)).json()["quotes"]

    assert [(q["payment_id"], q["eligible"], q["reasons"]) for q in quotes] == [
        (paid.payment_id, False, ["period_ended"])
    ]
