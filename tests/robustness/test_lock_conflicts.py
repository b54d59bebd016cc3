"""A request that Postgres aborts to break a deadlock (or a serialization failure) answers 503
`service_unavailable` with `Retry-After`, never a 500, and changes nothing: its transaction
was rolled back whole, so the same request sent again succeeds."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, text

from app.models import LedgerEntry, RefundRequest
from app.refunds import repository as repo
from tests.conftest import Deliver, TokenFactory, bearer, plain_dsn
from tests.refunds.flows import pay_subscription, pay_top_up
from tests.refunds.test_refund_workflow import file_request, reply
from tests.stripe_fake import StripeFake

CREDIT = {
    "kind": "decision",
    "message": "Credited.",
    "outcome": "approved",
    "remedy": "balance_credit",
    "amount": 700,
}


async def wait_for_a_lock_wait(admin: asyncpg.Connection) -> None:
    """Until another backend of this database waits for a row lock."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        waiting = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
        if waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the request never waited for the lock")


async def test_a_request_aborted_to_break_a_deadlock_answers_503_and_changes_nothing(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory, database_url: str
) -> None:
    filed = await client.post(
        "/v1/accounts/acc_d/refund-requests",
        json={"type": "compensation", "description": "Outage"},
        headers=bearer(token(account_id="acc_d")),
    )
    assert filed.status_code == 201, filed.text
    request_id = filed.json()["id"]
    url = f"/v1/finance/refund-requests/{request_id}/responses"
    finance = bearer(token(scope="finance", sub="bob@1msg.io"))

    admin = await asyncpg.connect(plain_dsn(database_url))
    try:
        other = admin.transaction()
        await other.start()
        # this side never looks for the deadlock first: the request's backend (waiting
        # longer, with the default 1 s) finds it and is the one aborted
        await admin.execute("SET LOCAL deadlock_timeout = '30s'")
        await admin.execute("SELECT 1 FROM refund_requests WHERE id = $1 FOR UPDATE", request_id)
        decision = asyncio.create_task(client.post(url, json=CREDIT, headers=finance))
        await wait_for_a_lock_wait(admin)  # it holds the account, waits for the request's row
        await admin.execute(  # and now this side waits for the account: a deadlock
            "SELECT 1 FROM accounts WHERE id = 'acc_d' FOR UPDATE"
        )
        response = await decision
        await other.rollback()
    finally:
        await admin.close()

    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "1"
    assert response.json()["code"] == "service_unavailable"
    async with app.state.session_factory() as session:
        request = await session.get(RefundRequest, request_id)
        assert request is not None and request.status == "received"
        credits = select(func.count()).where(LedgerEntry.account_id == "acc_d")
        assert await session.scalar(credits) == 0

    again = await client.post(url, json=CREDIT, headers=finance)
    assert again.status_code == 201, again.text
    assert again.json()["status"] == "approved"


async def test_a_filing_about_a_payment_and_an_approval_refunding_it_both_go_through(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
    database_url: str,
) -> None:
    """The approval locks the payment, then the account (the top-up's unspent balance); a
    filing naming the payment only references it (a foreign key): neither may make the other
    a deadlock's victim (503) just by referencing what the other locked."""
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_fk", amount=3000)
    first = await file_request(client, token, "acc_fk", payment_reference=paid.payment_intent)
    refund = {"kind": "decision", "message": "Refunded.", "outcome": "approved"}

    admin = await asyncpg.connect(plain_dsn(database_url))
    try:
        held = admin.transaction()
        await held.start()
        # The approval takes the payment's lock, then waits here for its request's
        await admin.execute("SELECT 1 FROM refund_requests WHERE id = $1 FOR UPDATE", first["id"])
        approval = asyncio.create_task(
            reply(client, token, first["id"], **refund, remedy="refund", amount=1000)
        )
        await wait_for_a_lock_wait(admin)
        filing = asyncio.create_task(
            client.post(
                "/v1/accounts/acc_fk/refund-requests",
                json={
                    "type": "refund",
                    "description": "Second",
                    "amount": 3000,
                    "payment_reference": paid.payment_intent,
                },
                headers=bearer(token(account_id="acc_fk")),
            )
        )
        # the filing need not wait for the approval (before, it waited for the payment's lock,
        # and the approval, once let go, for the account the filing had locked: a deadlock)
        await asyncio.wait({filing}, timeout=5)
        await held.rollback()
        approved, filed = await approval, await filing
    finally:
        await admin.close()

    assert approved.status_code == 201, approved.text
    assert approved.json()["status"] == "refund_pending"
    assert filed.status_code == 201, filed.text
    assert filed.json()["payment_id"] == paid.payment_id


@pytest.mark.parametrize("route", ["details", "credit"])
async def test_a_waiting_request_s_routes_never_deadlock_with_an_applying_batch(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory, route: str
) -> None:
    """A batch applying an account's top-up credits it (locking the account, as every ledger
    write does) and then identifies the account's requests waiting for their payment
    (`identify_waiting_requests`: it locks them). A client adding details to one of them at
    that moment (PATCH: the request locked, then its account written so the batch cannot miss
    it), or finance granting it a balance credit (the request locked, then the account for
    the ledger), closed a cycle with it: the route was the deadlock's victim (503 after
    `deadlock_timeout`). Both take the account first, as the batch does."""
    waiting = await file_request(client, token, "acc_dl_patch")
    assert waiting["status"] == "needs_information", waiting
    factory = app.state.session_factory
    async with factory() as batch, batch.begin():
        # the batch never looks for the deadlock first: the PATCH's backend would
        await batch.execute(text("SET LOCAL deadlock_timeout = '30s'"))
        await batch.execute(  # a top-up's credit (`ledger_entries_in_account_currency`)
            text("SELECT 1 FROM accounts WHERE id = 'acc_dl_patch' FOR NO KEY UPDATE")
        )
        patch = asyncio.create_task(
            client.patch(
                f"/v1/accounts/acc_dl_patch/refund-requests/{waiting['id']}",
                json={"payment_reference": "pi_not_yet_known"},
                headers=bearer(token(account_id="acc_dl_patch")),
            )
            if route == "details"
            else reply(client, token, waiting["id"], **CREDIT)
        )
        admin = await asyncpg.connect(plain_dsn(app.state.settings.database_url))
        try:
            await wait_for_a_lock_wait(admin)  # the PATCH waits for the account
        finally:
            await admin.close()
        # then its payment's requests waiting to be identified
        assert [r.id for r in await repo.waiting_requests(batch, ["acc_dl_patch"])] == [
            uuid.UUID(waiting["id"])
        ]
    response = await patch
    if route == "details":
        assert response.status_code == 200, response.text
        assert response.json()["payment_reference"] == "pi_not_yet_known"
    else:
        assert response.status_code == 201, response.text
        assert response.json()["status"] == "approved"


async def test_an_access_extension_never_deadlocks_with_an_applying_batch(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
    database_url: str,
) -> None:
    """A batch locks a subscription (its events, or a lost chargeback ending its access) and
    then the open refund requests about its payment (the chargeback closes them). Finance
    granting one of them an access extension locked the request, then the subscription: a
    cycle with the batch, whose victim was the decision (503 after `deadlock_timeout`). The
    decision takes the subscription first, as the batch does."""
    paid = await pay_subscription(
        app, stripe_fake, deliver, account_id="acc_dl_ext", channel_id="ch_dl_ext"
    )
    filed = await file_request(client, token, "acc_dl_ext", payment_reference=paid.payment_id)
    assert filed["status"] == "received", filed
    batch = await asyncpg.connect(plain_dsn(database_url))
    try:
        held = batch.transaction()
        await held.start()
        # the batch never looks for the deadlock first: the decision's backend would
        await batch.execute("SET LOCAL deadlock_timeout = '30s'")
        await batch.execute(  # `SUBSCRIPTIONS_TO_REVOKE` (or the subscription group's lock)
            "SELECT 1 FROM subscriptions WHERE stripe_id = $1 FOR UPDATE", paid.subscription_id
        )
        decision = asyncio.create_task(
            reply(
                client,
                token,
                filed["id"],
                kind="decision",
                message="Three extra days.",
                outcome="approved",
                remedy="access_extension",
                days=3,
            )
        )
        await wait_for_a_lock_wait(batch)
        await batch.execute(  # the chargeback's `OPEN_REQUESTS`
            "SELECT 1 FROM refund_requests WHERE id = $1 FOR UPDATE", uuid.UUID(filed["id"])
        )
        await held.commit()
    finally:
        await batch.close()
    response = await decision
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "approved"


@pytest.mark.parametrize("remedy", ["balance_credit", "refund"])
async def test_a_decision_never_deadlocks_with_a_batch_closing_requests_by_chargeback(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
    database_url: str,
    remedy: str,
) -> None:
    """A batch that has locked an account (a top-up's credit, a first payment) goes on to a
    chargeback of one of its payments, which locks the open refund requests about it (it
    closes them). Finance granting one of them a balance credit (the ledger) or a refund of
    the top-up (its unspent balance) locked the request and then the account: a cycle with
    the batch, whose victim was the decision (503 after `deadlock_timeout`). The decision
    takes the account first, as the batch does (the chargeback's own effects too: the
    accounts, then the requests)."""
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_dl_cb", amount=3000)
    filed = await file_request(client, token, "acc_dl_cb", payment_reference=paid.payment_intent)
    assert filed["status"] == "received", filed
    batch = await asyncpg.connect(plain_dsn(database_url))
    try:
        held = batch.transaction()
        await held.start()
        # the batch never looks for the deadlock first: the decision's backend would
        await batch.execute("SET LOCAL deadlock_timeout = '30s'")
        await batch.execute(  # an earlier group's ledger write
            "SELECT 1 FROM accounts WHERE id = 'acc_dl_cb' FOR NO KEY UPDATE"
        )
        decision = asyncio.create_task(
            reply(client, token, filed["id"], **{**CREDIT, "remedy": remedy})
        )
        await wait_for_a_lock_wait(batch)
        await batch.execute(  # the chargeback's `OPEN_REQUESTS`
            "SELECT 1 FROM refund_requests WHERE id = $1 FOR UPDATE", uuid.UUID(filed["id"])
        )
        await held.commit()
    finally:
        await batch.close()
    response = await decision
    assert response.status_code == 201, response.text
    assert response.json()["status"] == (
        "approved" if remedy == "balance_credit" else "refund_pending"
    )
