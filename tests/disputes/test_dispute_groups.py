"""Several disputes of one account applied as one group (their effects decided and written
together) end as applying each of their events in its own transaction does."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI

from tests.conftest import Deliver, TokenFactory, bearer
from tests.disputes.test_disputes import disputes
from tests.refunds.flows import ledger, outbox, pay_subscription, pay_top_up, subscription
from tests.stripe_fake import StripeFake


async def _three_disputes(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
    account_id: str,
) -> tuple[list[dict[str, Any]], dict[str, str], str, str]:
    """An account with two top-ups and a subscription, an open refund request about the
    subscription payment, and the events of three disputes not delivered yet: a top-up
    dispute won after the funds were withdrawn, one lost, and the subscription payment's,
    lost. Returns (events, role of each dispute, subscription, refund request)."""
    subscribed = await pay_subscription(
        app, stripe_fake, deliver, account_id=account_id, channel_id=f"ch_{account_id}"
    )
    won = await pay_top_up(app, stripe_fake, deliver, account_id=account_id, amount=3000)
    lost = await pay_top_up(app, stripe_fake, deliver, account_id=account_id, amount=2000)
    filed = await client.post(
        f"/v1/accounts/{account_id}/refund-requests",
        json={
            "type": "refund",
            "description": "unused",
            "payment_reference": subscribed.payment_intent,
        },
        headers=bearer(token(account_id=account_id)),
    )
    assert filed.status_code == 201, filed.text
    events: list[dict[str, Any]] = []
    roles: dict[str, str] = {}
    for role, paid, outcome in (
        ("top-up won", won, True),
        ("top-up lost", lost, False),
        ("subscription lost", subscribed, False),
    ):
        opened = stripe_fake.create_dispute(paid.charge_id)
        dispute_id = opened[0]["data"]["object"]["id"]
        roles[dispute_id] = role
        events += opened
        events += stripe_fake.withdraw_dispute_funds(dispute_id)
        events += stripe_fake.close_dispute(dispute_id, won=outcome)
    assert subscribed.subscription_id is not None
    return events, roles, subscribed.subscription_id, filed.json()["id"]


async def _outcome(
    app: FastAPI,
    client: httpx.AsyncClient,
    token: TokenFactory,
    account_id: str,
    roles: dict[str, str],
    subscription_id: str,
    request_id: str,
) -> dict[str, Any]:
    """What the disputes changed, by dispute role (the same for two accounts alike)."""
    shown = [d for d in await disputes(client, token) if d["account_id"] == account_id]
    request = await client.get(
        f"/v1/accounts/{account_id}/refund-requests/{request_id}",
        headers=bearer(token(account_id=account_id)),
    )
    return {
        "ledger": sorted(
            (kind, roles[source], amount)
            for kind, source, amount in await ledger(app, account_id)
            if kind.startswith("dispute")
        ),
        "disputes": {
            roles[d["stripe_id"]]: (
                d["status"],
                d["access_ended"],
                [(c["kind"], c["amount"]) for c in d["changes"]],
            )
            for d in shown
        },
        "access_revoked": (await subscription(app, subscription_id)).access_revoked_at is not None,
        "request": request.json()["status"],
        "emails": [
            e.subject.replace(request_id, "<request>")
            for e in await outbox(app, f"billing@{account_id}.example")
        ],
    }


async def test_disputes_of_one_account_in_one_group_end_as_one_event_per_transaction(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    outcomes = []
    for account_id, together in (("acc_one_by_one", False), ("acc_together", True)):
        events, roles, subscription_id, request_id = await _three_disputes(
            app, client, stripe_fake, deliver, token, account_id
        )
        if together:  # one batch: every dispute event in one group
            await deliver(events)
            await deliver(events)  # redelivered: nothing changes
        else:
            for event in events:
                await deliver([event])
        outcomes.append(
            await _outcome(app, client, token, account_id, roles, subscription_id, request_id)
        )
    one_by_one, together = outcomes
    assert together == one_by_one
    assert together["ledger"] == [
        ("dispute_reinstatement", "top-up won", 3000),
        ("dispute_withdrawal", "top-up lost", -2000),
        ("dispute_withdrawal", "top-up won", -3000),
    ]
    assert together["disputes"] == {
        "top-up won": (
            "won",
            False,
            [("balance_withdrawn", -3000), ("balance_reinstated", 3000)],
        ),
        "top-up lost": ("lost", False, [("balance_withdrawn", -2000)]),
        "subscription lost": ("lost", True, [("access_ended", None)]),
    }
    assert together["access_revoked"] is True
    assert together["request"] == "closed"
    assert together["emails"] == ["Your refund request is closed [<request>]"]
