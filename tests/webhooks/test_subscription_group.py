"""Subscription events applied as one group (`on_subscription_events`): the rules that decide
between several events of one subscription in one batch, and links made within the group."""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from sqlalchemy import select, update

from app.models import Account, Subscription
from tests.conftest import Deliver
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import add_catalog, open_checkout

ACCOUNT, CHANNEL = "acc_group", "chan_group"


async def _subscribed(app: FastAPI, fake: StripeFake) -> dict[str, Any]:
    """A paid subscription checkout at Stripe; its `customer.subscription.created` event."""
    add_catalog(fake)
    session_id = await open_checkout(
        app, account_id=ACCOUNT, purpose="subscription", channel_id=CHANNEL
    )
    start = len(fake.events)
    fake.complete_checkout(session_id)
    return next(
        dict(e) for e in fake.events[start:] if e["type"] == "customer.subscription.created"
    )


def _variant(event: dict[str, Any], suffix: str, **changes: Any) -> dict[str, Any]:
    """Another event about the same object (a new event id), its object changed."""
    other = copy.deepcopy(event)
    other["id"] = f"{event['id']}_{suffix}"
    other["data"]["object"].update(changes)
    return other


async def _subscription(app: FastAPI, stripe_id: str) -> Subscription:
    async with app.state.session_factory() as session:
        row = await session.scalar(select(Subscription).where(Subscription.stripe_id == stripe_id))
        assert row is not None
        return row


async def test_two_events_of_the_same_second_apply_stripes_current_state(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver
) -> None:
    created = await _subscribed(app, stripe_fake)
    sub_id = created["data"]["object"]["id"]
    # same `created`, a payload Stripe no longer holds: the order cannot be told apart
    stale = _variant(created, "same_second", cancel_at_period_end=True)
    await deliver([stale, created])  # one batch
    row = await _subscription(app, sub_id)
    assert row.cancel_at_period_end is False  # Stripe's state, whatever came last
    assert stripe_fake.get("subscription", sub_id)["cancel_at_period_end"] is False
    assert len(stripe_fake.requests_to("GET", f"/v1/subscriptions/{sub_id}")) == 1


async def test_an_older_event_is_ignored_and_a_canceled_subscription_stays_canceled(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver
) -> None:
    created = await _subscribed(app, stripe_fake)
    sub_id = created["data"]["object"]["id"]
    deleted = _variant(created, "deleted", status="canceled")
    deleted.update(type="customer.subscription.deleted", created=created["created"] + 10)
    older = _variant(created, "older", cancel_at_period_end=True)
    older["created"] = created["created"] - 10
    revived = _variant(created, "revived", status="active")
    revived.update(type="customer.subscription.updated", created=created["created"] + 20)
    await deliver([created, deleted, older, revived])  # one batch
    row = await _subscription(app, sub_id)
    assert row.status == "canceled"  # the newer `active` snapshot does not revive it
    assert row.cancel_at_period_end is False  # the older event changed nothing
    assert int(row.source_event_created.timestamp()) == revived["created"]


async def test_a_subscription_without_our_metadata_finds_the_account_its_group_linked(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver
) -> None:
    created = await _subscribed(app, stripe_fake)
    async with app.state.session_factory() as session, session.begin():
        # the account has not learnt its Stripe customer yet: this group's first event links it
        await session.execute(
            update(Account).where(Account.id == ACCOUNT).values(stripe_customer_id=None)
        )
    foreign = _variant(
        created, "foreign", id="sub_made_in_dashboard", metadata={"channel_id": "chan_dashboard"}
    )
    await deliver([created, foreign])  # one batch
    row = await _subscription(app, "sub_made_in_dashboard")
    assert (row.account_id, row.channel_id) == (ACCOUNT, "chan_dashboard")
    async with app.state.session_factory() as session:
        account = await session.get(Account, ACCOUNT)
        assert account is not None
        assert account.stripe_customer_id == created["data"]["object"]["customer"]
