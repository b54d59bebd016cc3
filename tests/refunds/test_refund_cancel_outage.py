"""Stripe down when an approved refund of a subscription payment is confirmed: the refund's
events are applied (request `refunded`, access ended at once) and only the cancellation at
Stripe waits for Stripe, sent once it answers, with one key."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from sqlalchemy import select

from app.models import AccessChange, RefundExecution, StripeEvent
from tests.conftest import Deliver, TokenFactory, bearer
from tests.refunds.flows import new_events, pay_subscription, subscription
from tests.refunds.test_refund_workflow import FINANCE, file_request, reply
from tests.stripe_fake import StripeFake


async def test_stripe_down_delays_only_the_cancellation_of_a_refunded_subscription(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_subscription(
        app, stripe_fake, deliver, account_id="acc_co", channel_id="ch_co"
    )
    assert paid.subscription_id is not None
    created = await file_request(client, token, "acc_co", payment_reference=paid.charge_id)
    seen = len(stripe_fake.events)
    approved = await reply(
        client,
        token,
        created["id"],
        kind="decision",
        message="Approved.",
        outcome="approved",
        remedy="refund",
        amount=2000,
    )
    assert approved.status_code == 201, approved.text

    # Stripe goes down (every cancel answered 500) as the refund's events arrive.
    cancel_path = f"/v1/subscriptions/{paid.subscription_id}"
    stripe_fake.fail_next(1000, 500, path_prefix=cancel_path, method="DELETE")
    await deliver(new_events(stripe_fake, seen))

    async with app.state.session_factory() as session:
        unapplied = (
            await session.scalars(select(StripeEvent).where(StripeEvent.status != "processed"))
        ).all()
        assert [(e.type, e.status, e.last_error) for e in unapplied] == []
    view = await client.get(
        f"/v1/finance/refund-requests/{created['id']}", headers=bearer(token(**FINANCE))
    )
    assert view.json()["status"] == "refunded", view.text
    sub = await subscription(app, paid.subscription_id)
    assert sub.access_revoked_at is not None
    async with app.state.session_factory() as session:
        feed = (
            await session.scalars(
                select(AccessChange)
                .where(AccessChange.channel_id == "ch_co")
                .order_by(AccessChange.id.desc())
            )
        ).first()
    assert feed is not None and feed.has_access is False
    failed = stripe_fake.requests_to("DELETE", cancel_path)
    assert failed and all(r.status == 500 for r in failed)

    # Stripe recovers: the next round sends the cancellation, with the same key, once.
    stripe_fake.clear_failures()
    processor = app.state.event_processor
    processor._refund_cancels._next_round_at = 0.0  # the minute's wait after a failure, elapsed
    await processor.drain()
    await processor.drain()
    cancels = stripe_fake.requests_to("DELETE", cancel_path)
    assert [r.status for r in cancels if r.status == 200] == [200]
    async with app.state.session_factory() as session:
        execution = await session.scalar(select(RefundExecution))
        assert execution is not None and execution.subscription_cancelled_at is not None
    assert {r.idempotency_key for r in cancels} == {f"billing:refund-cancel:{execution.id}"}
    audit = (
        await client.get(
            f"/v1/finance/refund-requests/{created['id']}", headers=bearer(token(**FINANCE))
        )
    ).json()["audit"]
    assert [a["action"] for a in audit].count("subscription_cancelled") == 1


async def test_a_cancellation_stripe_refuses_does_not_hold_up_the_others(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    seen = len(stripe_fake.events)
    paid = []
    for name in ("acc_c1", "acc_c2"):
        payment = await pay_subscription(
            app, stripe_fake, deliver, account_id=name, channel_id=name
        )
        created = await file_request(client, token, name, payment_reference=payment.charge_id)
        approved = await reply(
            client,
            token,
            created["id"],
            kind="decision",
            message="Approved.",
            outcome="approved",
            remedy="refund",
            amount=1000,
        )
        assert approved.status_code == 201, approved.text
        paid.append(payment)
    refused, other = (f"/v1/subscriptions/{p.subscription_id}" for p in paid)
    stripe_fake.fail_next(1, 400, path_prefix=refused, method="DELETE", message="Refused.")
    await deliver(new_events(stripe_fake, seen))
    assert [r.status for r in stripe_fake.requests_to("DELETE", refused)] == [400]
    assert [r.status for r in stripe_fake.requests_to("DELETE", other)] == [200]
