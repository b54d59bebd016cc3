"""A request that Postgres aborts to break a deadlock (or a serialization failure) answers 503
`service_unavailable` with `Retry-After`, never a 500, and changes nothing: its transaction
was rolled back whole, so the same request sent again succeeds."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
from fastapi import FastAPI
from sqlalchemy import func, select

from app.models import LedgerEntry, RefundRequest
from tests.conftest import TokenFactory, bearer, plain_dsn

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
        await admin.execute("SELECT 1 FROM accounts WHERE id = 'acc_d' FOR UPDATE")
        decision = asyncio.create_task(client.post(url, json=CREDIT, headers=finance))
        await wait_for_a_lock_wait(admin)  # it holds the request's row, waits for the account
        await admin.execute(  # and now this side waits for the request's row: a deadlock
            "SELECT 1 FROM refund_requests WHERE id = $1 FOR UPDATE", request_id
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
