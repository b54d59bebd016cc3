"""Chargebacks from Stripe's dispute events: balance withdrawn and reinstated for top-ups,
access ended after a lost dispute on a subscription payment, never also refunded."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.subscriptions import cancels
from tests.conftest import Deliver, TokenFactory, bearer, plain_dsn
from tests.refunds.flows import balance, ledger, outbox, pay_subscription, pay_top_up, subscription
from tests.refunds.test_refund_workflow import file_request
from tests.robustness.test_lock_conflicts import wait_for_a_lock_wait
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import open_checkout

FINANCE = {"scope": "finance", "sub": "carol@1msg.io"}


async def disputes(client: httpx.AsyncClient, token: TokenFactory) -> list[dict[str, Any]]:
    response = await client.get("/v1/finance/disputes", headers=bearer(token(**FINANCE)))
    assert response.status_code == 200, response.text
    return list(response.json())


async def test_top_up_dispute_won_after_funds_were_withdrawn_restores_the_balance_once(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_d", amount=5000)
    opened = stripe_fake.create_dispute(paid.charge_id)
    await deliver(opened)
    assert await balance(app, "acc_d") == 5000  # nothing moves until Stripe takes the funds
    dispute_id = opened[0]["data"]["object"]["id"]

    withdrawn = stripe_fake.withdraw_dispute_funds(dispute_id)
    await deliver(withdrawn)
    assert await balance(app, "acc_d") == 0

    won = stripe_fake.close_dispute(dispute_id, won=True)
    await deliver(won)
    await deliver([*opened, *withdrawn, *won])  # redelivery changes nothing
    assert await balance(app, "acc_d") == 5000
    assert [e for e in await ledger(app, "acc_d") if e[0].startswith("dispute")] == [
        ("dispute_withdrawal", dispute_id, -5000),
        ("dispute_reinstatement", dispute_id, 5000),
    ]

    [shown] = await disputes(client, token)
    assert shown["stripe_id"] == dispute_id
    assert shown["account_id"] == "acc_d"
    assert shown["payment_id"] == paid.payment_id
    assert shown["payment_purpose"] == "top_up"
    assert shown["status"] == "won"
    assert shown["access_ended"] is False
    assert [(c["kind"], c["amount"]) for c in shown["changes"]] == [
        ("balance_withdrawn", -5000),
        ("balance_reinstated", 5000),
    ]


async def test_an_empty_filter_value_lists_every_dispute(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    # A finance tool's form sends `status=` for "any status": no filter, not "the disputes
    # whose status is empty" (none, which reads as "no chargebacks").
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_df", amount=2000)
    await deliver(stripe_fake.create_dispute(paid.charge_id))
    [dispute] = await disputes(client, token)
    response = await client.get(
        "/v1/finance/disputes?status=&account_id=", headers=bearer(token(**FINANCE))
    )
    assert response.status_code == 200, response.text
    assert [d["id"] for d in response.json()] == [dispute["id"]]


async def test_dispute_events_in_reverse_order_converge_to_the_same_balance(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver
) -> None:
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_o", amount=3000)
    opened = stripe_fake.create_dispute(paid.charge_id)
    dispute_id = opened[0]["data"]["object"]["id"]
    withdrawn = stripe_fake.withdraw_dispute_funds(dispute_id)
    won = stripe_fake.close_dispute(dispute_id, won=True)
    for event in reversed([*opened, *withdrawn, *won]):
        await deliver([event])
    assert await balance(app, "acc_o") == 3000
    kinds = [e[0] for e in await ledger(app, "acc_o") if e[0].startswith("dispute")]
    assert sorted(kinds) == ["dispute_reinstatement", "dispute_withdrawal"]


async def test_a_withdrawal_is_dated_when_the_dispute_opened_whatever_the_delivery_order(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    # Stripe takes the funds when the dispute opens; the bank rules an hour later. Delivered
    # in order, the withdrawal is dated at the opening: the ruling's events arriving first
    # must not date it at the ruling.
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_dt", amount=3000)
    stripe_fake.set_time(stripe_fake.now())
    opened = stripe_fake.create_dispute(paid.charge_id)
    dispute_id = opened[0]["data"]["object"]["id"]
    withdrawn = stripe_fake.withdraw_dispute_funds(dispute_id)
    stripe_fake.set_time(stripe_fake.now() + 3600)
    won = stripe_fake.close_dispute(dispute_id, won=True)
    await deliver(won)
    await deliver([*opened, *withdrawn])
    response = await client.get(
        "/v1/accounts/acc_dt/ledger", headers=bearer(token(account_id="acc_dt"))
    )
    assert response.status_code == 200, response.text
    dated = {e["kind"]: e["occurred_at"] for e in response.json()["data"]}
    opened_at = datetime.fromtimestamp(opened[0]["data"]["object"]["created"], UTC)
    ruled_at = datetime.fromtimestamp(won[0]["created"], UTC)
    assert datetime.fromisoformat(dated["dispute_withdrawal"]) == opened_at
    assert datetime.fromisoformat(dated["dispute_reinstatement"]) == ruled_at


async def test_lost_top_up_dispute_keeps_the_amount_withdrawn(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver
) -> None:
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_l", amount=2000)
    opened = stripe_fake.create_dispute(paid.charge_id)
    dispute_id = opened[0]["data"]["object"]["id"]
    await deliver([*opened, *stripe_fake.withdraw_dispute_funds(dispute_id)])
    await deliver(stripe_fake.close_dispute(dispute_id, won=False))
    assert await balance(app, "acc_l") == 0


async def test_lost_subscription_dispute_ends_access_and_closes_the_refund_request(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_subscription(app, stripe_fake, deliver, account_id="acc_s", channel_id="ch_s")
    user = bearer(token(account_id="acc_s"))
    filed = await client.post(
        "/v1/accounts/acc_s/refund-requests",
        json={"type": "refund", "description": "unused", "payment_reference": paid.payment_intent},
        headers=user,
    )
    request_id = filed.json()["id"]

    opened = stripe_fake.create_dispute(paid.charge_id)
    dispute_id = opened[0]["data"]["object"]["id"]
    await deliver(opened)
    [quote] = (await client.get("/v1/accounts/acc_s/refund-eligibility", headers=user)).json()[
        "quotes"
    ]
    assert "disputed" in quote["reasons"]
    assert quote["eligible"] is False
    closed = (
        await client.get(f"/v1/accounts/acc_s/refund-requests/{request_id}", headers=user)
    ).json()
    assert closed["status"] == "closed"
    refused = await client.post(
        f"/v1/finance/refund-requests/{request_id}/responses",
        json={
            "kind": "decision",
            "message": "x",
            "outcome": "approved",
            "remedy": "refund",
            "amount": 100,
        },
        headers=bearer(token(**FINANCE)),
    )
    assert refused.status_code == 409
    assert stripe_fake.all("refund") == []
    assert [e.subject for e in await outbox(app, "billing@acc_s.example")] == [
        f"Your refund request is closed [{request_id}]"
    ]

    assert paid.subscription_id is not None
    assert (await subscription(app, paid.subscription_id)).access_revoked_at is None
    await deliver(stripe_fake.withdraw_dispute_funds(dispute_id))
    await deliver(stripe_fake.close_dispute(dispute_id, won=False))
    assert (await subscription(app, paid.subscription_id)).access_revoked_at is not None
    [shown] = await disputes(client, token)
    assert shown["status"] == "lost"
    assert shown["access_ended"] is True
    assert [c["kind"] for c in shown["changes"]] == ["access_ended"]
    assert await balance(app, "acc_s") == 0  # a subscription payment never touches the balance


async def test_lost_dispute_keeps_access_when_the_setting_says_so(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
    settings: Settings,
) -> None:
    settings.dispute_lost_ends_access = False
    paid = await pay_subscription(app, stripe_fake, deliver, account_id="acc_k", channel_id="ch_k")
    opened = stripe_fake.create_dispute(paid.charge_id)
    await deliver(opened)
    await deliver(stripe_fake.close_dispute(opened[0]["data"]["object"]["id"], won=False))
    assert paid.subscription_id is not None
    assert (await subscription(app, paid.subscription_id)).access_revoked_at is None
    [shown] = await disputes(client, token)
    assert shown["access_ended"] is False
    assert shown["changes"] == []


async def test_a_lost_dispute_that_ends_access_stops_the_billing_at_stripe(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    """Access ended for good must not leave Stripe renewing (and charging) the subscription:
    it is cancelled at Stripe at once, without proration or a final invoice, once."""
    paid = await pay_subscription(app, stripe_fake, deliver, account_id="acc_l", channel_id="ch_l")
    assert paid.subscription_id is not None
    opened = stripe_fake.create_dispute(paid.charge_id)
    dispute_id = opened[0]["data"]["object"]["id"]
    seen = len(stripe_fake.events)
    lost = [
        *opened,
        *stripe_fake.withdraw_dispute_funds(dispute_id),
        *stripe_fake.close_dispute(dispute_id, won=False),
    ]
    await deliver(lost)
    await deliver(lost)  # redelivered: nothing more happens

    assert stripe_fake.get("subscription", paid.subscription_id)["status"] == "canceled"
    cancels = stripe_fake.requests_to("DELETE", f"/v1/subscriptions/{paid.subscription_id}")
    assert len(cancels) == 1
    assert cancels[0].params == {"prorate": False, "invoice_now": False}
    await deliver([e for e in stripe_fake.events[seen:] if e not in lost])
    [shown] = (
        await client.get(
            "/v1/accounts/acc_l/subscriptions", headers=bearer(token(account_id="acc_l"))
        )
    ).json()["data"]
    assert (shown["status"], shown["has_access"]) == ("canceled", False)


async def test_stripe_failing_delays_the_cancellation_of_a_lost_dispute_and_no_event(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cancellation is sent after the events are applied (app/disputes/cancels.py): Stripe
    failing it leaves the events applied and access ended, and it is sent once Stripe answers
    again, after the backoff."""
    paid = await pay_subscription(app, stripe_fake, deliver, account_id="acc_m", channel_id="ch_m")
    assert paid.subscription_id is not None
    delete = f"/v1/subscriptions/{paid.subscription_id}"
    opened = stripe_fake.create_dispute(paid.charge_id)
    dispute_id = opened[0]["data"]["object"]["id"]
    stripe_fake.fail_next(2, 500, path_prefix=delete, method="DELETE")  # one SDK retry
    await deliver([*opened, *stripe_fake.close_dispute(dispute_id, won=False)])

    events = (await client.get("/v1/ops/stripe-events", headers=bearer(token(scope="ops")))).json()[
        "data"
    ]
    assert {event["status"] for event in events} <= {"processed", "ignored"}
    access = await client.get(
        "/v1/channels/ch_m/access", headers=bearer(token(scope="billing:read"))
    )
    assert (access.json()["has_access"], access.json()["reason"]) == (False, "revoked")
    assert stripe_fake.get("subscription", paid.subscription_id)["status"] == "active"
    failed = len(stripe_fake.requests_to("DELETE", delete))
    assert failed == 2

    await app.state.event_processor.drain()  # the backoff has not passed: nothing sent
    assert len(stripe_fake.requests_to("DELETE", delete)) == failed

    later = cancels.monotonic() + cancels.FAILURE_BACKOFF_SECONDS + 1
    monkeypatch.setattr(cancels, "monotonic", lambda: later)
    await app.state.event_processor.drain()
    assert stripe_fake.get("subscription", paid.subscription_id)["status"] == "canceled"
    await app.state.event_processor.drain()  # sent once
    assert len(stripe_fake.requests_to("DELETE", delete)) == failed + 1


async def test_funds_withdrawn_in_another_settlement_currency_are_in_the_disputes_minor_units(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    """A ¥10,000 top-up disputed on a USD-settled Stripe account: the withdrawal's balance
    transaction is $67.00 (6700 cents) at `exchange_rate` 0.0067, which converts major units;
    the dispute's currency (JPY) has no minor unit, so that is 10,000 yen, not 1,000,000."""
    session_id = await open_checkout(
        app, account_id="acc_jpy", purpose="top_up", amount=10_000, currency="jpy"
    )
    await deliver(stripe_fake.complete_checkout(session_id))
    payment_intent = str(stripe_fake.get("checkout.session", session_id)["payment_intent"])
    charge = str(stripe_fake.get("payment_intent", payment_intent)["latest_charge"])
    opened = stripe_fake.create_dispute(charge)
    dispute_id = opened[0]["data"]["object"]["id"]
    withdrawn = stripe_fake.withdraw_dispute_funds(dispute_id, fee=1500)
    for transaction in withdrawn[-1]["data"]["object"]["balance_transactions"]:
        transaction.update(amount=-6700, currency="usd", exchange_rate=0.0067)
    await deliver([*opened, *withdrawn])
    assert await balance(app, "acc_jpy") == 0  # ¥10,000 credited, ¥10,000 withdrawn

    [shown] = await disputes(client, token)
    assert (shown["amount"], shown["currency"]) == (10_000, "jpy")
    assert shown["funds_withdrawn"] == 10_000


async def test_a_refund_request_filed_while_its_payments_chargeback_is_applied_is_closed(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
    database_url: str,
) -> None:
    """The chargeback's events are being applied (their snapshot taken, not yet committed)
    when a refund request about the payment is filed: it is closed like any open one."""
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_dr", amount=5000)
    await deliver(stripe_fake.create_dispute(paid.charge_id), process=False)

    admin = await asyncpg.connect(plain_dsn(database_url))
    try:
        # another replica holds the payment's lock (dispute events are keyed by it): the
        # processor has claimed the events and waits for it before applying them
        await admin.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", paid.payment_intent)
        applying = asyncio.create_task(app.state.event_processor.drain())
        await wait_for_a_lock_wait(admin)
        filed = await file_request(client, token, "acc_dr", payment_reference=paid.payment_intent)
        assert filed["status"] == "received"
        await admin.execute(
            "SELECT pg_advisory_unlock(hashtextextended($1, 0))", paid.payment_intent
        )
        await applying
    finally:
        await admin.close()
    await app.state.event_processor.drain()

    shown = await client.get(
        f"/v1/accounts/acc_dr/refund-requests/{filed['id']}",
        headers=bearer(token(account_id="acc_dr")),
    )
    assert shown.json()["status"] == "closed", shown.json()


async def test_a_refund_request_identified_while_its_payments_chargeback_is_applied_is_closed(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
    database_url: str,
) -> None:
    """As a filing, so the PATCH that identifies the payment of a waiting request."""
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_dp", amount=5000)
    waiting = await file_request(client, token, "acc_dp", amount=5000)
    assert waiting["status"] == "needs_information"
    await deliver(stripe_fake.create_dispute(paid.charge_id), process=False)

    admin = await asyncpg.connect(plain_dsn(database_url))
    try:
        await admin.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", paid.payment_intent)
        applying = asyncio.create_task(app.state.event_processor.drain())
        await wait_for_a_lock_wait(admin)
        patched = await client.patch(
            f"/v1/accounts/acc_dp/refund-requests/{waiting['id']}",
            json={"payment_reference": paid.payment_intent},
            headers=bearer(token(account_id="acc_dp")),
        )
        assert patched.json()["status"] == "received", patched.text
        await admin.execute(
            "SELECT pg_advisory_unlock(hashtextextended($1, 0))", paid.payment_intent
        )
        await applying
    finally:
        await admin.close()
    await app.state.event_processor.drain()

    shown = await client.get(
        f"/v1/accounts/acc_dp/refund-requests/{waiting['id']}",
        headers=bearer(token(account_id="acc_dp")),
    )
    assert shown.json()["status"] == "closed", shown.json()


async def test_a_lost_disputes_cancellation_stripe_refuses_does_not_hold_up_the_others(
    app: FastAPI,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    """Stripe refusing one cancellation (`StripeRequestRejected`) leaves the others sent in the
    same round; only an outage stops the round."""
    paid = [
        await pay_subscription(app, stripe_fake, deliver, account_id=name, channel_id=name)
        for name in ("acc_d1", "acc_d2")
    ]
    refused, other = (f"/v1/subscriptions/{p.subscription_id}" for p in paid)
    stripe_fake.fail_next(1, 400, path_prefix=refused, method="DELETE")
    lost = []
    for payment in paid:
        opened = stripe_fake.create_dispute(payment.charge_id)
        dispute_id = opened[0]["data"]["object"]["id"]
        lost += [*opened, *stripe_fake.close_dispute(dispute_id, won=False)]
    await deliver(lost)
    assert [r.status for r in stripe_fake.requests_to("DELETE", refused)] == [400]
    assert [r.status for r in stripe_fake.requests_to("DELETE", other)] == [200]


@pytest.mark.parametrize("batch_holds", ["first", "last"])
async def test_recording_lost_disputes_cancellations_never_deadlocks_with_an_applying_batch(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver, database_url: str, batch_holds: str
) -> None:
    """The round that records accepted cancellations runs beside the event processor, whose
    batch updates subscriptions in its own order: holding one recorded subscription's row
    while waiting for another's would close a cycle with a batch that holds the second and
    then writes the first (Postgres breaks it after `deadlock_timeout`, ~1 s of stalled
    events, and fails one side). Each is recorded on its own, so the batch goes on, whichever
    of the two rows it holds first."""
    from app.disputes.cancels import DisputeCancels

    paid = [
        await pay_subscription(app, stripe_fake, deliver, account_id=name, channel_id=name)
        for name in ("acc_k1", "acc_k2")
    ]
    first, last = [(await subscription(app, str(p.subscription_id))).id for p in paid]
    held, other = (first, last) if batch_holds == "first" else (last, first)
    batch = await asyncpg.connect(plain_dsn(database_url))
    admin = await asyncpg.connect(plain_dsn(database_url))
    try:
        await batch.execute("BEGIN")
        await batch.execute("UPDATE subscriptions SET updated_at = now() WHERE id = $1", held)
        recording = asyncio.create_task(
            DisputeCancels(app.state.session_factory, app.state.stripe).record([first, last])
        )
        await wait_for_a_lock_wait(admin)  # the round waits for `held`
        await batch.execute("UPDATE subscriptions SET updated_at = now() WHERE id = $1", other)
        await batch.execute("COMMIT")
        assert await recording == 2
        sent = await admin.fetch(
            "SELECT dispute_cancel_sent_at FROM subscriptions WHERE id = ANY($1)", [first, last]
        )
        assert len(sent) == 2 and all(row["dispute_cancel_sent_at"] for row in sent)
    finally:
        await batch.close()
        await admin.close()


async def test_a_request_closed_by_a_bank_inquiry_is_not_told_of_a_chargeback(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    """An inquiry (`warning_needs_response`) is the bank asking about the payment, not a
    chargeback: the refund request it closes is emailed as closed by an inquiry, with what the
    client can do once it closes without one (file again), never that the payment is charged
    back and the bank's decision replaces the request."""
    paid = await pay_subscription(app, stripe_fake, deliver, account_id="acc_q", channel_id="ch_q")
    request_id = (
        await file_request(client, token, "acc_q", payment_reference=paid.payment_intent)
    )["id"]

    await deliver(stripe_fake.create_dispute(paid.charge_id, status="warning_needs_response"))

    [email] = await outbox(app, "billing@acc_q.example")
    assert email.subject == f"Your refund request is closed [{request_id}]"
    assert "chargeback)" not in email.body and "bank's decision replaces" not in email.body
    assert "inquiry" in email.body
