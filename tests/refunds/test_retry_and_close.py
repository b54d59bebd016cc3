"""Finance retries a refund Stripe reported failed (a new attempt, a new key, never two live
refunds for one decision, limits checked again) and closes requests with nothing left to do."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.models import RefundExecution
from app.refunds.repository import add_ledger_entry
from tests.conftest import Deliver, TokenFactory, bearer, plain_dsn
from tests.refunds.flows import (
    balance,
    ledger,
    new_events,
    outbox,
    pay_subscription,
    pay_top_up,
    subscription,
)
from tests.refunds.test_refund_workflow import FINANCE, file_request, reply
from tests.robustness.test_lock_conflicts import wait_for_a_lock_wait
from tests.stripe_fake import StripeFake

APPROVE = {"kind": "decision", "message": "Approved.", "outcome": "approved", "remedy": "refund"}


def finance(token: TokenFactory) -> dict[str, str]:
    return bearer(token(**FINANCE))


async def retry(
    client: httpx.AsyncClient, token: TokenFactory, request_id: str, **body: Any
) -> httpx.Response:
    return await client.post(
        f"/v1/finance/refund-requests/{request_id}/refund-attempts",
        json=body,
        headers=finance(token),
    )


async def close(
    client: httpx.AsyncClient, token: TokenFactory, request_id: str, **body: Any
) -> httpx.Response:
    return await client.post(
        f"/v1/finance/refund-requests/{request_id}/close",
        json={"reason": "withdrawn", "message": "Closed as you asked.", **body},
        headers=finance(token),
    )


async def finance_view(
    client: httpx.AsyncClient, token: TokenFactory, request_id: str
) -> dict[str, Any]:
    response = await client.get(f"/v1/finance/refund-requests/{request_id}", headers=finance(token))
    assert response.status_code == 200, response.text
    return dict(response.json())


async def quote(client: httpx.AsyncClient, token: TokenFactory, account_id: str) -> dict[str, Any]:
    response = await client.get(
        f"/v1/accounts/{account_id}/refund-eligibility",
        headers=bearer(token(account_id=account_id)),
    )
    assert response.status_code == 200, response.text
    [only] = response.json()["quotes"]
    return dict(only)


async def attempts(app: FastAPI, request_id: str) -> list[tuple[int, str, int]]:
    async with app.state.session_factory() as session:
        rows = await session.scalars(
            select(RefundExecution)
            .where(RefundExecution.request_id == uuid.UUID(request_id))
            .order_by(RefundExecution.attempt)
        )
        return [(r.attempt, r.status, r.amount) for r in rows]


async def failed_top_up_refund(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
    account_id: str,
) -> tuple[str, str]:
    """A top-up of 5000, an approved refund of 3000 that Stripe then reports failed.
    Returns (request id, Stripe refund id)."""
    paid = await pay_top_up(app, stripe_fake, deliver, account_id=account_id, amount=5000)
    created = await file_request(
        client, token, account_id, type="refund", payment_reference=paid.charge_id
    )
    seen = len(stripe_fake.events)
    approved = await reply(client, token, created["id"], **APPROVE, amount=3000)
    assert approved.status_code == 201, approved.text
    await deliver(new_events(stripe_fake, seen))
    refund_id = stripe_fake.all("refund")[0]["id"]
    await deliver(stripe_fake.fail_refund(refund_id))
    assert (await finance_view(client, token, created["id"]))["status"] == "refund_failed"
    assert await balance(app, account_id) == 5000
    return created["id"], refund_id


async def test_finance_retries_a_failed_refund_once_with_a_new_key(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    request_id, first_refund = await failed_top_up_refund(
        app, client, stripe_fake, deliver, token, "acc_rt"
    )

    # Stripe down: 502, the request stays refund_failed, no refund at Stripe.
    stripe_fake.fail_next(2, 500, path_prefix="/v1/refunds")
    down = await retry(client, token, request_id, note="client confirmed the card")
    assert (down.status_code, down.json()["code"]) == (502, "stripe_unavailable")
    assert (await finance_view(client, token, request_id))["status"] == "refund_failed"
    assert len(stripe_fake.all("refund")) == 1
    assert await attempts(app, request_id) == [(1, "failed", 3000), (2, "pending", 3000)]

    # Retried again, three times at once (a double click): the pending attempt and its key
    # are reused, Stripe makes one more refund.
    seen = len(stripe_fake.events)
    answers = await asyncio.gather(*(retry(client, token, request_id) for _ in range(3)))
    codes = sorted(a.status_code for a in answers)
    assert codes[0] == 201 and set(codes) <= {201, 409}, [a.text for a in answers]
    for conflict in (a for a in answers if a.status_code == 409):
        assert conflict.json()["code"] == "refund_not_failed"
    assert len(stripe_fake.all("refund")) == 2
    [attempt_two] = [a for a in await attempts(app, request_id) if a[0] == 2]
    assert attempt_two == (2, "submitted", 3000)
    async with app.state.session_factory() as session:
        second = await session.scalar(select(RefundExecution).where(RefundExecution.attempt == 2))
        assert second is not None
    keys = [r.idempotency_key for r in stripe_fake.requests_to("post", "/v1/refunds")]
    assert set(keys[1:]) == {f"billing:refund:{second.id}"} and keys[0] != keys[1]
    body = next(a.json() for a in answers if a.status_code == 201)
    assert body["status"] == "refund_pending"
    assert (body["refund"]["attempt"], body["refund"]["status"]) == (2, "submitted")

    # Stripe confirms: refunded; the ledger moved once per refund.
    await deliver(new_events(stripe_fake, seen))
    shown = (
        await client.get(
            f"/v1/accounts/acc_rt/refund-requests/{request_id}",
            headers=bearer(token(account_id="acc_rt")),
        )
    ).json()
    assert shown["status"] == "refunded"
    assert shown["refund"]["attempt"] == 2
    second_refund = shown["refund"]["stripe_refund_id"]
    assert [e for e in await ledger(app, "acc_rt") if e[0].startswith("refund")] == [
        ("refund", first_refund, -3000),
        ("refund_reversal", first_refund, 3000),
        ("refund", second_refund, -3000),
    ]
    assert await balance(app, "acc_rt") == 2000
    assert await attempts(app, request_id) == [(1, "failed", 3000), (2, "succeeded", 3000)]

    # Nothing more to retry.
    again = await retry(client, token, request_id)
    assert (again.status_code, again.json()["code"]) == (409, "refund_not_failed")
    assert len(stripe_fake.all("refund")) == 2

    subjects = [e.subject for e in await outbox(app, "billing@acc_rt.example")]
    assert subjects[-2:] == [
        f"Your refund has been submitted again [{request_id}]",
        f"Your refund has completed [{request_id}]",
    ]
    audit = [
        (a["action"], a["actor"]) for a in (await finance_view(client, token, request_id))["audit"]
    ]
    assert ("refund_retry_created", "alice@1msg.io") in audit
    assert ("refund_retried", "alice@1msg.io") in audit
    assert audit[-1] == ("refund_succeeded", "stripe")
    created_entry = next(
        a
        for a in (await finance_view(client, token, request_id))["audit"]
        if a["action"] == "refund_retry_created"
    )
    assert created_entry["details"]["note"] == "client confirmed the card"
    assert created_entry["details"]["attempt"] == 2


async def test_a_retry_is_still_bounded_by_what_may_be_refunded(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    request_id, _ = await failed_top_up_refund(app, client, stripe_fake, deliver, token, "acc_rb")
    # The client spent most of the balance since: 1000 unspent left.
    async with app.state.session_factory() as session, session.begin():
        await add_ledger_entry(
            session,
            account_id="acc_rb",
            kind="conversation",
            source_id="conv-rb",
            amount=-4000,
            currency="usd",
            description="usage",
            occurred_at=datetime.now(UTC),
        )

    over = await retry(client, token, request_id)

    assert (over.status_code, over.json()["code"]) == (422, "refund_exceeds_limit")
    assert over.headers["content-type"].startswith("application/problem+json")
    assert len(stripe_fake.all("refund")) == 1
    assert await attempts(app, request_id) == [(1, "failed", 3000)]
    assert (await finance_view(client, token, request_id))["status"] == "refund_failed"


async def test_retry_of_a_refund_that_did_not_fail_is_409_and_bad_input_is_422(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_subscription(
        app, stripe_fake, deliver, account_id="acc_rn", channel_id="ch_rn"
    )
    created = await file_request(client, token, "acc_rn", payment_reference=paid.charge_id)

    undecided = await retry(client, token, created["id"])
    assert (undecided.status_code, undecided.json()["code"]) == (409, "refund_not_failed")
    approved = await reply(client, token, created["id"], **APPROVE, amount=1000)
    assert approved.json()["status"] == "refund_pending"
    pending = await retry(client, token, created["id"])
    assert (pending.status_code, pending.json()["code"]) == (409, "refund_not_failed")
    unknown = await retry(client, token, str(uuid.uuid4()))
    assert (unknown.status_code, unknown.json()["code"]) == (404, "refund_request_not_found")
    bad = await retry(client, token, created["id"], amount=5)
    assert (bad.status_code, bad.json()["code"]) == (422, "validation_error")
    as_client = await client.post(
        f"/v1/finance/refund-requests/{created['id']}/refund-attempts",
        json={},
        headers=bearer(token(account_id="acc_rn")),
    )
    assert as_client.status_code == 403
    assert len(stripe_fake.all("refund")) == 1
    assert await attempts(app, created["id"]) == [(1, "submitted", 1000)]


async def test_the_database_refuses_a_second_live_refund_for_one_request(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_subscription(
        app, stripe_fake, deliver, account_id="acc_rl", channel_id="ch_rl"
    )
    created = await file_request(client, token, "acc_rl", payment_reference=paid.charge_id)
    await reply(client, token, created["id"], **APPROVE, amount=1000)
    async with app.state.session_factory() as session:
        first = await session.scalar(select(RefundExecution))
        assert first is not None
    with pytest.raises(IntegrityError):
        async with app.state.session_factory() as session, session.begin():
            session.add(
                RefundExecution(
                    request_id=first.request_id,
                    attempt=2,
                    payment_id=first.payment_id,
                    account_id=first.account_id,
                    amount=1000,
                    currency="usd",
                    status="pending",
                    requested_by="someone",
                )
            )
    assert await attempts(app, created["id"]) == [(1, "submitted", 1000)]


async def test_finance_closes_a_withdrawn_request_with_an_emailed_reply(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_subscription(
        app, stripe_fake, deliver, account_id="acc_cw", channel_id="ch_cw"
    )
    # Filed by finance from an email that arrived weeks ago: overdue now.
    filed = await client.post(
        "/v1/finance/refund-requests",
        json={
            "account_id": "acc_cw",
            "type": "refund",
            "description": "Refund please",
            "payment_reference": paid.charge_id,
            "received_at": (datetime.now(UTC) - timedelta(days=40)).isoformat(),
            "channel": "email",
        },
        headers=finance(token),
    )
    assert filed.status_code == 201, filed.text
    request_id = filed.json()["id"]
    overdue = await client.get("/v1/finance/refund-requests?overdue=true", headers=finance(token))
    assert [r["id"] for r in overdue.json()] == [request_id]

    bad = await close(client, token, request_id, reason="bored")
    assert (bad.status_code, bad.json()["code"]) == (422, "validation_error")
    assert (await finance_view(client, token, request_id))["status"] == "received"

    closed = await close(
        client, token, request_id, reason="withdrawn", message="Closed: you withdrew it."
    )

    assert closed.status_code == 200, closed.text
    body = closed.json()
    assert body["status"] == "closed" and body["overdue"] is False
    assert [(r["kind"], r["message"]) for r in body["responses"]] == [
        ("closing", "Closed: you withdrew it.")
    ]
    closed_step = body["audit"][-1]
    assert (closed_step["action"], closed_step["actor"], closed_step["status_after"]) == (
        "closed",
        "alice@1msg.io",
        "closed",
    )
    assert closed_step["details"]["reason"] == "withdrawn"
    assert closed_step["details"]["status_before"] == "received"
    [email] = await outbox(app, "billing@acc_cw.example")
    assert email.subject == f"Your billing request is closed [{request_id}]"
    assert "Closed: you withdrew it." in email.body
    overdue = await client.get("/v1/finance/refund-requests?overdue=true", headers=finance(token))
    assert overdue.json() == []

    # Closed is final: no second close, no reply, no client change.
    twice = await close(client, token, request_id)
    assert (twice.status_code, twice.json()["code"]) == (409, "request_not_closable")
    late = await reply(client, token, request_id, kind="initial", message="Hello")
    assert (late.status_code, late.json()["code"]) == (409, "request_already_decided")
    patched = await client.patch(
        f"/v1/accounts/acc_cw/refund-requests/{request_id}",
        json={"description": "more"},
        headers=bearer(token(account_id="acc_cw")),
    )
    assert patched.status_code == 409
    assert len(await outbox(app, "billing@acc_cw.example")) == 1
    shown = (
        await client.get(
            f"/v1/accounts/acc_cw/refund-requests/{request_id}",
            headers=bearer(token(account_id="acc_cw")),
        )
    ).json()
    assert shown["status"] == "closed"
    assert [r["kind"] for r in shown["responses"]] == ["closing"]


async def test_a_request_closes_after_its_final_reply_but_not_while_a_refund_is_on_its_way(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_subscription(
        app, stripe_fake, deliver, account_id="acc_cf", channel_id="ch_cf"
    )
    refund = await file_request(client, token, "acc_cf", payment_reference=paid.charge_id)
    seen = len(stripe_fake.events)
    await reply(client, token, refund["id"], **APPROVE, amount=1000)
    in_flight = await close(client, token, refund["id"], reason="resolved")
    assert (in_flight.status_code, in_flight.json()["code"]) == (409, "request_not_closable")
    assert (await finance_view(client, token, refund["id"]))["status"] == "refund_pending"

    await deliver(new_events(stripe_fake, seen))
    assert (await finance_view(client, token, refund["id"]))["status"] == "refunded"
    done = await close(client, token, refund["id"], reason="resolved", message="All done.")
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "closed"
    assert done.json()["refund"]["status"] == "succeeded"

    appeal = await file_request(client, token, "acc_cf", type="appeal", description="Why?")
    rejected = await reply(
        client, token, appeal["id"], kind="decision", message="No.", outcome="rejected"
    )
    assert rejected.json()["status"] == "rejected"
    closed = await close(client, token, appeal["id"], reason="resolved", message="Closing.")
    assert closed.json()["status"] == "closed"
    unknown = await close(client, token, str(uuid.uuid4()))
    assert (unknown.status_code, unknown.json()["code"]) == (404, "refund_request_not_found")
    as_client = await client.post(
        f"/v1/finance/refund-requests/{appeal['id']}/close",
        json={"reason": "withdrawn", "message": "x"},
        headers=bearer(token(account_id="acc_cf")),
    )
    assert as_client.status_code == 403


async def test_a_failed_refund_finance_settles_otherwise_can_be_closed_and_not_retried(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    request_id, _ = await failed_top_up_refund(app, client, stripe_fake, deliver, token, "acc_cx")
    closed = await close(
        client, token, request_id, reason="resolved", message="Kept as balance, as agreed."
    )
    assert closed.status_code == 200, closed.text
    assert closed.json()["status"] == "closed"
    after = await retry(client, token, request_id)
    assert (after.status_code, after.json()["code"]) == (409, "refund_not_failed")
    assert len(stripe_fake.all("refund")) == 1
    assert await balance(app, "acc_cx") == 5000


async def test_retrying_a_failed_subscription_refund_refunds_once_more_and_access_stays_ended(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_subscription(
        app, stripe_fake, deliver, account_id="acc_rs", channel_id="ch_rs"
    )
    created = await file_request(client, token, "acc_rs", payment_reference=paid.charge_id)
    seen = len(stripe_fake.events)
    await reply(client, token, created["id"], **APPROVE, amount=2000)
    await deliver(new_events(stripe_fake, seen))
    first_refund = stripe_fake.all("refund")[0]["id"]
    await deliver(stripe_fake.fail_refund(first_refund))
    assert (await finance_view(client, token, created["id"]))["status"] == "refund_failed"
    assert (await quote(client, token, "acc_rs"))["already_refunded"] == 0  # nothing went back

    seen = len(stripe_fake.events)
    retried = await retry(client, token, created["id"])
    assert retried.status_code == 201, retried.text
    await deliver(new_events(stripe_fake, seen))

    view = await finance_view(client, token, created["id"])
    assert view["status"] == "refunded"
    assert (view["refund"]["attempt"], view["refund"]["amount"]) == (2, 2000)
    refunds = stripe_fake.all("refund")
    assert sorted(r["status"] for r in refunds) == ["failed", "succeeded"]
    assert paid.subscription_id is not None
    at_stripe = stripe_fake.get("subscription", paid.subscription_id)
    assert at_stripe["status"] == "canceled"
    sub = await subscription(app, paid.subscription_id)
    assert sub.access_revoked_at is not None
    # Eligibility counts only the refund that went through.
    assert (await quote(client, token, "acc_rs"))["already_refunded"] == 2000


async def test_a_refund_that_fails_after_its_request_was_closed_reopens_it_for_a_retry(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    # Stripe may report a succeeded refund failed later (the bank sent it back): the approved
    # refund has not reached the client, so finance must see `refund_failed` and retry it,
    # even if the request was closed once the refund had succeeded.
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_fc", amount=5000)
    created = await file_request(
        client, token, "acc_fc", type="refund", payment_reference=paid.charge_id
    )
    seen = len(stripe_fake.events)
    approved = await reply(client, token, created["id"], **APPROVE, amount=3000)
    assert approved.status_code == 201, approved.text
    await deliver(new_events(stripe_fake, seen))
    assert (await finance_view(client, token, created["id"]))["status"] == "refunded"
    closed = await close(client, token, created["id"], reason="resolved", message="Done.")
    assert closed.json()["status"] == "closed"

    await deliver(stripe_fake.fail_refund(stripe_fake.all("refund")[0]["id"]))
    view = await finance_view(client, token, created["id"])
    assert view["status"] == "refund_failed"
    assert view["refund"]["status"] == "failed"
    assert await balance(app, "acc_fc") == 5000

    seen = len(stripe_fake.events)
    retried = await retry(client, token, created["id"])
    assert retried.status_code == 201, retried.text
    await deliver(new_events(stripe_fake, seen))
    assert (await finance_view(client, token, created["id"]))["status"] == "refunded"
    assert await balance(app, "acc_fc") == 2000


async def test_a_retry_never_deadlocks_with_a_batch_applying_the_failed_refund_s_events(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
    database_url: str,
) -> None:
    """A batch applying a top-up refund's events (another event of the failed refund, say)
    locks the account for its ledger entries (the reversal) and then the request and attempt
    of ours the refund names. A retry of that request locked the payment, the request and
    its attempt, and then the account (its unspent balance bounds the retry): a cycle with
    the batch, whose victim was the retry (503 after `deadlock_timeout`). The retry takes the
    account before the request, as the batch does."""
    request_id, _ = await failed_top_up_refund(app, client, stripe_fake, deliver, token, "acc_dlr")
    batch = await asyncpg.connect(plain_dsn(database_url))
    try:
        held = batch.transaction()
        await held.start()
        # the batch never looks for the deadlock first: the retry's backend would
        await batch.execute("SET LOCAL deadlock_timeout = '30s'")
        await batch.execute(  # `_adjust_ledger`'s `ledger_entries_in_account_currency`
            "SELECT 1 FROM accounts WHERE id = 'acc_dlr' FOR NO KEY UPDATE"
        )
        retried = asyncio.create_task(retry(client, token, request_id))
        await wait_for_a_lock_wait(batch)
        await batch.execute(  # `_apply_ours`: the request the refund's attempt is of
            "SELECT 1 FROM refund_requests WHERE id = $1 FOR UPDATE", uuid.UUID(request_id)
        )
        await held.commit()
    finally:
        await batch.close()
    response = await retried
    assert response.status_code == 201, response.text


async def test_the_ledger_documents_every_kind_it_shows(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    """A failed refund's `refund_reversal` credit is in the ledger the client reads: the
    contract's list of the ledger's kinds names it, so a reader can tell what it is."""
    await failed_top_up_refund(app, client, stripe_fake, deliver, token, "acc_kinds")
    response = await client.get(
        "/v1/accounts/acc_kinds/ledger", headers=bearer(token(account_id="acc_kinds"))
    )
    assert response.status_code == 200, response.text
    shown = {entry["kind"] for entry in response.json()["data"]}
    assert shown == {"top_up", "refund", "refund_reversal"}
    schema = app.openapi()["components"]["schemas"]["LedgerEntryOut"]
    documented = set(re.findall(r"[a-z_]+", schema["properties"]["kind"]["description"]))
    assert shown <= documented, shown - documented
