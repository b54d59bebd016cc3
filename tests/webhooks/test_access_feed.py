"""The access feed records access that ends by time alone, with no Stripe event."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from fastapi import FastAPI
from sqlalchemy import select, update

from app.models import AccessChange, Subscription
from app.subscriptions.service import record_expired_access
from tests.conftest import Deliver, TokenFactory, bearer
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import add_catalog, open_checkout
from tests.webhooks.test_processing import cli


async def test_an_ended_period_appears_in_the_feed_once(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    add_catalog(stripe_fake)
    session_id = await open_checkout(
        app, account_id="acc_t", purpose="subscription", channel_id="ch_t"
    )
    await deliver(stripe_fake.complete_checkout(session_id))
    async with app.state.session_factory() as session:
        subscription = await session.scalar(select(Subscription))
    assert subscription is not None
    assert subscription.current_period_end is not None
    period_end = subscription.current_period_end
    reader = bearer(token(scope="billing:read"))
    before = (await client.get("/v1/access-changes", headers=reader)).json()["data"]
    assert [(c["channel_id"], c["has_access"]) for c in before] == [("ch_t", True)]

    factory, settings = app.state.session_factory, app.state.settings
    assert await record_expired_access(factory, settings, period_end - timedelta(seconds=1)) == 0
    # Stripe's renewal never came: at the period end access stops
    assert await record_expired_access(factory, settings, period_end) == 1
    assert await record_expired_access(factory, settings, period_end + timedelta(days=1)) == 0
    after = (await client.get("/v1/access-changes", headers=reader)).json()["data"]
    assert [(c["channel_id"], c["has_access"]) for c in after] == [("ch_t", True), ("ch_t", False)]
    assert after[1]["reason"] == "period_ended"


async def test_expire_access_command_records_ended_access(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
    database_url: str,
) -> None:
    """`billing expire-access`, for deployments whose web processes run no background work."""
    add_catalog(stripe_fake)
    session_id = await open_checkout(
        app, account_id="acc_c", purpose="subscription", channel_id="ch_c"
    )
    await deliver(stripe_fake.complete_checkout(session_id))
    # a month later, with no renewal event: the period end (and what the feed recorded as
    # access_until) has passed
    ended = datetime.now(UTC) - timedelta(minutes=1)
    async with app.state.session_factory() as session, session.begin():
        subscription = await session.scalar(select(Subscription))
        assert subscription is not None
        subscription.current_period_end = ended
        await session.execute(update(AccessChange).values(access_until=ended))
    result = cli("expire-access", stripe_fake=stripe_fake, database_url=database_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "recorded 1 access ends in the access feed"
    feed = await client.get("/v1/access-changes", headers=bearer(token(scope="billing:read")))
    assert [c["has_access"] for c in feed.json()["data"]] == [True, False]
