"""Refund requests end to end: real payments mirrored from Stripe's events, finance replies,
one Stripe refund per approval whatever the retries, Stripe's refund events confirming it."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import select

from app.models import AccessChange, Activity, RefundExecution
from app.stripe_gateway import StripeGateway
from tests.conftest import Deliver, TokenFactory, bearer
from tests.refunds.flows import (
    balance,
    ledger,
    new_events,
    outbox,
    pay_subscription,
    pay_top_up,
    subscription,
)
from tests.stripe_fake import StripeFake

FINANCE = {"scope": "finance", "sub": "alice@1msg.io"}


async def file_request(
    client: httpx.AsyncClient, token: TokenFactory, account_id: str, **body: Any
) -> dict[str, Any]:
    response = await client.post(
        f"/v1/accounts/{account_id}/refund-requests",
        json={"type": "refund", "description": "I never used the service", **body},
        headers=bearer(token(account_id=account_id)),
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


async def reply(
    client: httpx.AsyncClient,
    token: TokenFactory,
    request_id: str,
    *,
    idempotency_key: str | None = None,
    **body: Any,
) -> httpx.Response:
    headers = bearer(token(**FINANCE))
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return await client.post(
        f"/v1/finance/refund-requests/{request_id}/responses", json=body, headers=headers
    )


async def test_eligibility_quotes_each_subscription_payment_from_mirrored_facts(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    await pay_subscription(
        app, stripe_fake, deliver, account_id="acc_q", channel_id="ch_q", fee=None
    )
    await pay_top_up(app, stripe_fake, deliver, account_id="acc_q", amount=5000)
    url, headers = "/v1/accounts/acc_q/refund-eligibility", bearer(token(account_id="acc_q"))

    pending = (await client.get(url, headers=headers)).json()
    assert pending["top_ups"] == "manual_review_only"
    assert pending["meta_fees"] == "never_refundable"
    [quote] = pending["quotes"]
    assert quote["reasons"] == ["fee_pending"]
    assert quote["processing_fee"] is None

    charge_id = stripe_fake.all("charge")[0]["id"]
    await deliver(stripe_fake.settle_charge(charge_id, fee=143))
    [quote] = (await client.get(url, headers=headers)).json()["quotes"]
    assert quote == {
        "payment_id": quote["payment_id"],
        "eligible": True,
        "reasons": [],
        "amount_paid": 3900,
        "already_refunded": 0,
        "setup_fee": 1500,
        "processing_fee": 143,
        "refundable_amount": 2257,
        "currency": "usd",
    }

    async with app.state.session_factory() as session, session.begin():
        session.add(
            Activity(
                account_id="acc_q",
                external_id="msg-1",
                kind="message_sent",
                occurred_at=stripe_fake_now(),
            )
        )
    [quote] = (await client.get(url, headers=headers)).json()["quotes"]
    assert quote["eligible"] is False
    assert quote["reasons"] == ["usage_detected"]

    other = await client.get(url, headers=bearer(token(account_id="acc_other")))
    assert other.status_code == 403


def stripe_fake_now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


async def test_a_usage_charge_or_an_activity_report_ends_the_zero_usage_right(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    """Policy section 3: no messages sent, no templates created, no numbers connected and no
    other activity. Either report, made the way other services make it, ends the right."""
    usage = bearer(token(scope="usage:write"))
    reports = {
        "acc_meta": (
            "usage-charges",
            {"amount": 7, "currency": "usd", "kind": "meta_fee"},
        ),
        "acc_number": ("activity", {"kind": "number_connected"}),
    }
    for account_id, (route, body) in reports.items():
        await pay_subscription(
            app, stripe_fake, deliver, account_id=account_id, channel_id=f"ch_{account_id}"
        )
        url = f"/v1/accounts/{account_id}/refund-eligibility"
        headers = bearer(token(account_id=account_id))
        [before] = (await client.get(url, headers=headers)).json()["quotes"]
        assert before["eligible"] is True

        reported = await client.post(
            f"/v1/accounts/{account_id}/{route}",
            json={"id": "u-1", "occurred_at": stripe_fake_now().isoformat(), **body},
            headers=usage,
        )
        assert reported.status_code == 201, reported.text

        [after] = (await client.get(url, headers=headers)).json()["quotes"]
        assert (after["eligible"], after["reasons"]) == (False, ["usage_detected"])


async def test_approved_subscription_refund_runs_once_and_cancels_the_subscription(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_subscription(app, stripe_fake, deliver, account_id="acc_r", channel_id="ch_r")
    created = await file_request(client, token, "acc_r", payment_reference=paid.charge_id)
    assert created["status"] == "received"
    assert created["payment_id"] == paid.payment_id
    assert created["first_response_due"] is not None and created["decision_due"] is not None

    first = await reply(client, token, created["id"], kind="initial", message="We are on it.")
    assert first.status_code == 201, first.text
    assert first.json()["status"] == "acknowledged"

    seen = len(stripe_fake.events)
    approval = {
        "kind": "decision",
        "message": "Approved: zero usage.",
        "outcome": "approved",
        "remedy": "refund",
        "amount": 2257,
    }
    answers = await asyncio.gather(
        *(reply(client, token, created["id"], **approval) for _ in range(3))
    )
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [201, 409, 409], [a.text for a in answers]
    assert len(stripe_fake.all("refund")) == 1
    keys = {r.idempotency_key for r in stripe_fake.requests_to("post", "/v1/refunds")}
    assert len(keys) == 1

    body = next(a.json() for a in answers if a.status_code == 201)
    assert body["status"] == "refund_pending"
    assert body["refund"]["status"] == "submitted"
    assert body["refund"]["amount"] == 2257

    await deliver(new_events(stripe_fake, seen))
    shown = (
        await client.get(
            f"/v1/accounts/acc_r/refund-requests/{created['id']}",
            headers=bearer(token(account_id="acc_r")),
        )
    ).json()
    assert shown["status"] == "refunded"
    assert [r["kind"] for r in shown["responses"]] == ["initial", "decision"]

    cancels = stripe_fake.requests_to("delete", f"/v1/subscriptions/{paid.subscription_id}")
    assert len(cancels) == 1
    assert cancels[0].params.get("prorate") in (False, "false")
    assert cancels[0].params.get("invoice_now") in (False, "false")
    assert paid.subscription_id is not None
    sub = await subscription(app, paid.subscription_id)
    assert sub.access_revoked_at is not None
    async with app.state.session_factory() as session:
        feed = (
            await session.scalars(
                select(AccessChange)
                .where(AccessChange.channel_id == "ch_r")
                .order_by(AccessChange.id.desc())
            )
        ).first()
    assert feed is not None
    assert feed.has_access is False

    # Replaying every refund event changes nothing more.
    await deliver([e for e in stripe_fake.events_since(seen) if e["type"].startswith("refund.")])
    assert len(stripe_fake.requests_to("delete", f"/v1/subscriptions/{paid.subscription_id}")) == 1

    emails = await outbox(app, "billing@acc_r.example")
    subjects = [e.subject for e in emails]
    assert subjects == [
        f"We have received your billing request [{created['id']}]",
        f"A decision on your billing request [{created['id']}]",
        f"Your refund has completed [{created['id']}]",
    ]
    assert "Approved: zero usage." in emails[1].body
    # amounts are written as a person reads them, from the payment's minor units
    assert "Remedy: a refund of 22.57 USD to your original payment method" in emails[1].body
    assert "Your refund of 22.57 USD has been sent" in emails[2].body

    audit = (
        await client.get(
            f"/v1/finance/refund-requests/{created['id']}", headers=bearer(token(**FINANCE))
        )
    ).json()["audit"]
    actions = [(a["action"], a["actor"]) for a in audit]
    assert actions[:3] == [
        ("filed", "tester"),
        ("reply_initial", "alice@1msg.io"),
        ("refund_execution_created", "alice@1msg.io"),
    ]
    assert ("reply_decision", "alice@1msg.io") in actions
    assert ("refund_succeeded", "stripe") in actions
    assert ("subscription_cancelled", "stripe") in actions


class EventsFirstGateway(StripeGateway):
    """Delivers Stripe's refund events to the service before the approval records Stripe's
    answer, as happens when the webhook beats the API response."""

    deliver: Deliver
    fake: StripeFake

    async def create_refund(self, **kwargs: Any) -> dict[str, Any]:
        seen = len(self.fake.events)
        refund = await super().create_refund(**kwargs)
        await self.deliver(self.fake.events_since(seen))
        return refund


async def test_refund_event_arriving_before_the_approval_recorded_it_completes_the_refund(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_subscription(app, stripe_fake, deliver, account_id="acc_e", channel_id="ch_e")
    created = await file_request(client, token, "acc_e", payment_reference=paid.payment_intent)
    gateway = EventsFirstGateway(api_key="sk_test_" + "c" * 32, api_base=stripe_fake.url)
    gateway.deliver, gateway.fake = deliver, stripe_fake
    original = app.state.stripe
    app.state.stripe = gateway
    try:
        answer = await reply(
            client,
            token,
            created["id"],
            kind="decision",
            message="Approved.",
            outcome="approved",
            remedy="refund",
            amount=1000,
        )
    finally:
        app.state.stripe = original
        await gateway.close()
    assert answer.status_code == 201, answer.text
    assert answer.json()["status"] == "refunded"
    assert answer.json()["refund"]["status"] == "succeeded"
    assert answer.json()["refund"]["stripe_refund_id"] == stripe_fake.all("refund")[0]["id"]
    assert len(stripe_fake.all("refund")) == 1


async def test_stripe_failure_leaves_no_decision_and_the_retry_reuses_the_same_refund_key(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_subscription(app, stripe_fake, deliver, account_id="acc_f", channel_id="ch_f")
    created = await file_request(client, token, "acc_f", payment_reference=paid.payment_id)
    decision = {
        "kind": "decision",
        "message": "Approved.",
        "outcome": "approved",
        "remedy": "refund",
        "amount": 1200,
    }
    stripe_fake.fail_next(path_prefix="/v1/refunds", status=500, count=2)
    failed = await reply(client, token, created["id"], **decision)
    assert failed.status_code == 502
    assert failed.json()["code"] == "stripe_unavailable"
    state = (
        await client.get(
            f"/v1/finance/refund-requests/{created['id']}", headers=bearer(token(**FINANCE))
        )
    ).json()
    assert state["status"] == "received"
    assert state["responses"] == []
    assert await outbox(app, "billing@acc_f.example") == []

    retried = await reply(client, token, created["id"], **decision)
    assert retried.status_code == 201, retried.text
    assert len(stripe_fake.all("refund")) == 1
    keys = {r.idempotency_key for r in stripe_fake.requests_to("post", "/v1/refunds")}
    async with app.state.session_factory() as session:
        execution = await session.scalar(select(RefundExecution))
        assert execution is not None
    assert keys == {f"billing:refund:{execution.id}"}


async def test_refund_is_bounded_by_what_was_paid_less_refunds_and_a_disputed_payment_is_not_refunded(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_subscription(app, stripe_fake, deliver, account_id="acc_b", channel_id="ch_b")
    first = await file_request(client, token, "acc_b", payment_reference=paid.payment_intent)
    seen = len(stripe_fake.events)
    ok = await reply(
        client,
        token,
        first["id"],
        kind="decision",
        message="Part.",
        outcome="approved",
        remedy="refund",
        amount=3000,
    )
    assert ok.status_code == 201, ok.text
    await deliver(new_events(stripe_fake, seen))

    second = await file_request(client, token, "acc_b", payment_reference=paid.payment_intent)
    too_much = await reply(
        client,
        token,
        second["id"],
        kind="decision",
        message="More.",
        outcome="approved",
        remedy="refund",
        amount=901,
    )
    assert too_much.status_code == 422
    assert too_much.json()["code"] == "refund_exceeds_limit"
    assert len(stripe_fake.all("refund")) == 1

    await deliver(stripe_fake.create_dispute(paid.charge_id, amount=900))
    disputed = await reply(
        client,
        token,
        second["id"],
        kind="decision",
        message="More.",
        outcome="approved",
        remedy="refund",
        amount=900,
    )
    assert disputed.status_code in (409,)
    assert len(stripe_fake.all("refund")) == 1


async def test_top_up_refund_is_bounded_by_the_unspent_balance_and_debits_the_ledger_once(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_t", amount=5000)
    assert await balance(app, "acc_t") == 5000
    async with app.state.session_factory() as session, session.begin():
        from app.refunds.repository import add_ledger_entry

        await add_ledger_entry(
            session,
            account_id="acc_t",
            kind="conversation",
            source_id="conv-1",
            amount=-1800,
            currency="usd",
            description="usage",
            occurred_at=stripe_fake_now(),
        )
    created = await file_request(
        client, token, "acc_t", type="refund", payment_reference=paid.charge_id
    )
    over = await reply(
        client,
        token,
        created["id"],
        kind="decision",
        message="x",
        outcome="approved",
        remedy="refund",
        amount=3201,
    )
    assert over.status_code == 422
    assert over.json()["code"] == "refund_exceeds_limit"

    seen = len(stripe_fake.events)
    ok = await reply(
        client,
        token,
        created["id"],
        kind="decision",
        message="Unspent balance refunded.",
        outcome="approved",
        remedy="refund",
        amount=3200,
    )
    assert ok.status_code == 201, ok.text
    events = new_events(stripe_fake, seen)
    await deliver(events)
    await deliver([e for e in events if e["type"].startswith("refund.")])
    refund_id = stripe_fake.all("refund")[0]["id"]
    assert [e for e in await ledger(app, "acc_t") if e[0] == "refund"] == [
        ("refund", refund_id, -3200)
    ]
    assert await balance(app, "acc_t") == 0

    await deliver(stripe_fake.fail_refund(refund_id))
    state = (
        await client.get(
            f"/v1/accounts/acc_t/refund-requests/{created['id']}",
            headers=bearer(token(account_id="acc_t")),
        )
    ).json()
    assert state["status"] == "refund_failed"
    assert await balance(app, "acc_t") == 3200
    subjects = [e.subject for e in await outbox(app, "billing@acc_t.example")]
    assert subjects[-1] == f"Your refund has failed [{created['id']}]"


async def test_access_extension_remedy_extends_the_paid_subscription(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_subscription(app, stripe_fake, deliver, account_id="acc_x", channel_id="ch_x")
    assert paid.subscription_id is not None
    before = await subscription(app, paid.subscription_id)
    created = await file_request(
        client, token, "acc_x", type="appeal", payment_reference=paid.payment_id
    )
    answer = await reply(
        client,
        token,
        created["id"],
        kind="decision",
        message="Three extra days for the outage.",
        outcome="approved",
        remedy="access_extension",
        days=3,
    )
    assert answer.status_code == 201, answer.text
    assert answer.json()["status"] == "approved"
    after = await subscription(app, paid.subscription_id)
    assert after.extension_days == before.extension_days + 3
    assert stripe_fake.all("refund") == []
    decision = (await outbox(app, "billing@acc_x.example"))[-1]
    assert "Remedy: your channel's access is extended by 3 days" in decision.body


async def test_access_extension_of_a_top_up_is_refused_as_not_applicable_not_as_missing_details(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    # The request is identified (it names the top-up), so "needs information" would send
    # finance asking the client for details that cannot help: no payment detail turns a
    # top-up into a subscription. The decision itself does not fit the request: 422.
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_xt", amount=5000)
    created = await file_request(
        client, token, "acc_xt", type="appeal", payment_reference=paid.payment_intent
    )
    assert created["status"] == "received" and created["payment_id"] == paid.payment_id
    extension = {
        "kind": "decision",
        "message": "Three extra days.",
        "outcome": "approved",
        "remedy": "access_extension",
        "days": 3,
    }
    refused = await reply(client, token, created["id"], **extension)
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["code"] == "remedy_not_applicable"
    assert "subscription" in refused.json()["detail"]

    shown = await client.get(
        f"/v1/finance/refund-requests/{created['id']}", headers=bearer(token(**FINANCE))
    )
    assert shown.json()["status"] == "received"
    assert shown.json()["responses"] == []
    assert [step["action"] for step in shown.json()["audit"]] == ["filed"]
    subjects = [e.subject for e in await outbox(app, "billing@acc_xt.example")]
    assert not any("decision" in subject for subject in subjects)

    # The request stays open for a remedy that fits a top-up.
    credited = await reply(
        client,
        token,
        created["id"],
        **{**extension, "remedy": "balance_credit", "days": None, "amount": 300},
    )
    assert credited.status_code == 201, credited.text
    assert credited.json()["status"] == "approved"


async def test_access_extension_of_a_subscription_that_ended_is_refused_not_approved_for_nothing(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    # Cancelled at once (not at its period end): extra days after its period end cannot give
    # the channel access. Approving would email the client "3 days" that never come.
    paid = await pay_subscription(
        app, stripe_fake, deliver, account_id="acc_xe", channel_id="ch_xe"
    )
    assert paid.subscription_id is not None
    await deliver(stripe_fake.delete_subscription(paid.subscription_id))
    before = await subscription(app, paid.subscription_id)
    created = await file_request(
        client, token, "acc_xe", type="appeal", payment_reference=paid.payment_id
    )
    refused = await reply(
        client,
        token,
        created["id"],
        kind="decision",
        message="Three extra days.",
        outcome="approved",
        remedy="access_extension",
        days=3,
    )
    assert refused.status_code == 422, refused.text
    assert refused.json()["code"] == "remedy_not_applicable"
    after = await subscription(app, paid.subscription_id)
    assert after.extension_days == before.extension_days
    shown = await client.get(
        f"/v1/finance/refund-requests/{created['id']}", headers=bearer(token(**FINANCE))
    )
    assert shown.json()["status"] == "received" and shown.json()["responses"] == []
    subjects = [e.subject for e in await outbox(app, "billing@acc_xe.example")]
    assert not any("decision" in subject for subject in subjects)
