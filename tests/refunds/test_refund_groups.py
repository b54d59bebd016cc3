"""Several refunds of one account applied as one group (`on_refund_events`: their rows folded
together, their effects decided and written together) end as applying each of their events in
its own transaction does, every state a refund passed through included."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import select

from app.models import Refund, RefundExecution
from tests.conftest import Deliver, TokenFactory, bearer
from tests.refunds.flows import ledger, outbox, pay_subscription, pay_top_up, subscription
from tests.refunds.test_refund_workflow import file_request, reply
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import open_checkout

APPROVE = {"kind": "decision", "message": "Approved.", "outcome": "approved", "remedy": "refund"}


async def _four_refunds(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
    account_id: str,
) -> tuple[list[dict[str, Any]], dict[str, str], str, str]:
    """An account with two top-ups and a subscription, and the events, not delivered yet, of
    four refunds: a Dashboard refund of top-up A that succeeds and then fails at the bank; one
    of top-up B that succeeds; one of top-up B mirrored (and debited) earlier that now fails;
    and our approved refund of the subscription payment, which succeeds and then fails.
    Returns (events, role of each Stripe refund, subscription, refund request)."""
    subscribed = await pay_subscription(
        app, stripe_fake, deliver, account_id=account_id, channel_id=f"ch_{account_id}"
    )
    top_up_a = await pay_top_up(app, stripe_fake, deliver, account_id=account_id, amount=5000)
    top_up_b = await pay_top_up(app, stripe_fake, deliver, account_id=account_id, amount=3000)
    seen = len(stripe_fake.events)
    earlier = stripe_fake.create_refund({"payment_intent": top_up_b.payment_intent, "amount": 500})
    await deliver(stripe_fake.events_since(seen))
    request = await file_request(
        client, token, account_id, payment_reference=subscribed.payment_intent
    )
    seen = len(stripe_fake.events)
    approved = await reply(client, token, request["id"], **APPROVE, amount=1000)
    assert approved.status_code == 201, approved.text
    ours = approved.json()["refund"]["stripe_refund_id"]
    failing = stripe_fake.create_refund({"payment_intent": top_up_a.payment_intent, "amount": 2000})
    stripe_fake.fail_refund(failing["id"])
    kept = stripe_fake.create_refund({"payment_intent": top_up_b.payment_intent, "amount": 1000})
    stripe_fake.fail_refund(earlier["id"])
    stripe_fake.fail_refund(ours)
    roles = {
        failing["id"]: "top-up A, succeeded then failed",
        kept["id"]: "top-up B, succeeded",
        earlier["id"]: "top-up B, debited earlier, failed",
        ours: "ours, succeeded then failed",
    }
    assert subscribed.subscription_id is not None
    return stripe_fake.events_since(seen), roles, subscribed.subscription_id, request["id"]


async def _outcome(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    token: TokenFactory,
    account_id: str,
    roles: dict[str, str],
    subscription_id: str,
    request_id: str,
) -> dict[str, Any]:
    """What the refunds changed, by refund role (the same for two accounts alike)."""
    request = await client.get(
        f"/v1/accounts/{account_id}/refund-requests/{request_id}",
        headers=bearer(token(account_id=account_id)),
    )
    async with app.state.session_factory() as session:
        refunds = await session.scalars(select(Refund).where(Refund.stripe_id.in_(roles)))
        executions = await session.scalars(
            select(RefundExecution).where(RefundExecution.request_id == uuid.UUID(request_id))
        )
        refund_rows = {roles[r.stripe_id]: (r.status, r.amount) for r in refunds.all()}
        attempts = [(e.status, e.failure_reason) for e in executions.all()]
    cancels = stripe_fake.requests_to("delete", f"/v1/subscriptions/{subscription_id}")
    return {
        "ledger": sorted(
            (kind, roles[source], amount)
            for kind, source, amount in await ledger(app, account_id)
            if kind in ("refund", "refund_reversal")
        ),
        "refunds": refund_rows,
        "request": request.json()["status"],
        "attempts": attempts,
        "emails": [
            e.subject.replace(request_id, "<request>")
            for e in await outbox(app, f"billing@{account_id}.example")
        ],
        "cancelled_at_stripe": len(cancels),
        "access_revoked": (await subscription(app, subscription_id)).access_revoked_at is not None,
    }


async def test_refunds_of_one_account_in_one_group_end_as_one_event_per_transaction(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    outcomes = []
    for account_id, together in (("acc_refunds_one_by_one", False), ("acc_refunds_together", True)):
        events, roles, subscription_id, request_id = await _four_refunds(
            app, client, stripe_fake, deliver, token, account_id
        )
        if together:  # one batch: every refund event in one group
            await deliver(events)
        else:
            for event in events:
                await deliver([event])
        outcome = await _outcome(
            app, client, stripe_fake, token, account_id, roles, subscription_id, request_id
        )
        # Stripe sends the refund events again (new event ids), all in one batch: the rows
        # exist and every effect was made, so nothing changes.
        await deliver(
            [
                {**event, "id": f"{event['id']}_again"}
                for event in events
                if event["type"].startswith("refund.")
            ]
        )
        assert (
            await _outcome(
                app, client, stripe_fake, token, account_id, roles, subscription_id, request_id
            )
            == outcome
        )
        outcomes.append(outcome)
    one_by_one, together = outcomes
    assert together == one_by_one
    assert together["ledger"] == [
        ("refund", "top-up A, succeeded then failed", -2000),
        ("refund", "top-up B, debited earlier, failed", -500),
        ("refund", "top-up B, succeeded", -1000),
        ("refund_reversal", "top-up A, succeeded then failed", 2000),
        ("refund_reversal", "top-up B, debited earlier, failed", 500),
    ]
    assert together["refunds"] == {
        "top-up A, succeeded then failed": ("failed", 2000),
        "top-up B, succeeded": ("succeeded", 1000),
        "top-up B, debited earlier, failed": ("failed", 500),
        "ours, succeeded then failed": ("failed", 1000),
    }
    assert together["request"] == "refund_failed"
    assert together["attempts"] == [("failed", "failed")]
    assert together["emails"][-2:] == [
        "Your refund has completed [<request>]",
        "Your refund has failed [<request>]",
    ]
    # our refund was live in between: the subscription payment's subscription was cancelled
    assert together["cancelled_at_stripe"] == 1
    assert together["access_revoked"] is True


async def test_a_top_up_and_its_refund_that_fails_in_one_batch_debit_and_credit_back(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver
) -> None:
    """Refunds are applied after payments in a batch: a refund finds its payment mirrored
    by the same batch, as one event per transaction in Stripe's order finds it."""
    ledgers = []
    for account_id, together in (("acc_late_one_by_one", False), ("acc_late_together", True)):
        checkout = await open_checkout(app, account_id=account_id, purpose="top_up", amount=4000)
        seen = len(stripe_fake.events)
        stripe_fake.complete_checkout(checkout)
        payment_intent = stripe_fake.get("checkout.session", checkout)["payment_intent"]
        refund = stripe_fake.create_refund({"payment_intent": payment_intent, "amount": 1500})
        stripe_fake.fail_refund(refund["id"])
        events = stripe_fake.events_since(seen)
        if together:
            await deliver(events)
        else:
            for event in events:
                await deliver([event])
        ledgers.append([(kind, amount) for kind, source, amount in await ledger(app, account_id)])
    one_by_one, together = ledgers
    assert sorted(together) == sorted(one_by_one)
    assert sorted(together) == [("refund", -1500), ("refund_reversal", 1500), ("top_up", 4000)]
