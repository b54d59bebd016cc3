"""How a checkout commits: the Idempotency-Key claimed in the first transaction, one durable
commit per request except the one recording a new Stripe customer, and what a retry after a
crash between Stripe's answer and our record does."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import event, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.checkout import service
from app.models import Account, CheckoutSession, IdempotencyRecord
from tests.checkout.conftest import PostCheckout, subscription_body, top_up_body
from tests.stripe_fake import StripeFake

URLS = ("success_url", "cancel_url")


@dataclass
class Transaction:
    statements: list[str] = field(default_factory=list)
    synchronous_commit: str = ""
    """The setting its COMMIT runs under."""


class Recording:
    """Records the statements of a driver connection."""

    def __init__(self, conn: Any, tx: Transaction) -> None:
        self._conn, self._tx = conn, tx

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._conn, name)

        async def recorded(sql: str, *args: Any) -> Any:
            self._tx.statements.append(sql)
            return await method(sql, *args)

        return recorded


class Autocommit:
    """Records the statements of a driver connection outside any transaction: each commits
    on its own (with the `synchronous_commit` the connection has)."""

    def __init__(self, conn: Any, done: list[Transaction]) -> None:
        self._conn, self._done = conn, done

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._conn, name)

        async def recorded(sql: str, *args: Any) -> Any:
            setting = await self._conn.fetchval("SHOW synchronous_commit")
            result = await method(sql, *args)
            self._done.append(Transaction([sql], setting))
            return result

        return recorded


@pytest.fixture
def committed(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Transaction]]:
    """Every transaction the app commits, in commit order: the checkout's driver transactions
    (with the `synchronous_commit` their COMMIT runs under), its statements committed on their
    own, and the SQLAlchemy transactions."""
    done: list[Transaction] = []
    real = service.driver_transaction

    @contextlib.asynccontextmanager
    async def recording(engine: Any, **options: Any) -> AsyncIterator[Any]:
        tx = Transaction()
        async with real(engine, **options) as conn:
            yield Recording(conn, tx)
            tx.synchronous_commit = await conn.fetchval("SHOW synchronous_commit")
        done.append(tx)

    monkeypatch.setattr(service, "driver_transaction", recording)
    real_connection = service.driver_connection

    @contextlib.asynccontextmanager
    async def autocommit(engine: Any) -> AsyncIterator[Any]:
        async with real_connection(engine) as conn:
            yield Autocommit(conn, done)

    monkeypatch.setattr(service, "driver_connection", autocommit)
    engine = app.state.engine.sync_engine
    open_transactions: dict[int, Transaction] = {}

    def before_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        key = id(conn.connection.dbapi_connection)
        open_transactions.setdefault(key, Transaction()).statements.append(statement)

    def on_commit(conn: Any) -> None:
        tx = open_transactions.pop(id(conn.connection.dbapi_connection), None)
        if tx is not None:
            tx.synchronous_commit = "on"  # no SET LOCAL on the SQLAlchemy path
            done.append(tx)

    def on_rollback(conn: Any) -> None:
        open_transactions.pop(id(conn.connection.dbapi_connection), None)

    event.listen(engine, "before_cursor_execute", before_execute)
    event.listen(engine, "commit", on_commit)
    event.listen(engine, "rollback", on_rollback)
    yield done
    event.remove(engine, "before_cursor_execute", before_execute)
    event.remove(engine, "commit", on_commit)
    event.remove(engine, "rollback", on_rollback)


def has(tx: Transaction, fragment: str) -> bool:
    return any(fragment in statement for statement in tx.statements)


async def test_only_the_final_commit_waits_for_the_disk_once_the_account_has_its_customer(
    post_checkout: PostCheckout, committed: list[Transaction]
) -> None:
    assert (await post_checkout("acc_1", top_up_body(), key="first")).status_code == 201
    [customer_tx] = [t for t in committed if has(t, "UPDATE accounts SET stripe_customer_id")]
    assert customer_tx.synchronous_commit == "on"  # the customer's record is durable at once
    assert has(customer_tx, "INSERT INTO idempotency_records")
    assert has(customer_tx, "INSERT INTO checkout_sessions")
    committed.clear()

    assert (await post_checkout("acc_1", top_up_body(), key="second")).status_code == 201
    pending_tx, final_tx = committed
    assert has(pending_tx, "INSERT INTO idempotency_records")
    assert has(pending_tx, "INSERT INTO checkout_sessions")
    assert pending_tx.synchronous_commit == "off"
    assert has(final_tx, "UPDATE checkout_sessions")
    assert has(final_tx, "UPDATE idempotency_records")
    assert final_tx.synchronous_commit == "on"  # the response is sent after a durable commit
    assert not has(final_tx, "synchronous_commit")


async def test_a_refused_request_leaves_its_idempotency_key_unclaimed(
    post_checkout: PostCheckout,
    stripe_fake: StripeFake,
    db: async_sessionmaker[AsyncSession],
) -> None:
    repay = {"purpose": "debt_repayment", **{k: top_up_body()[k] for k in URLS}}
    refused = await post_checkout("acc_1", repay, key="k")
    assert refused.status_code == 409
    assert refused.json()["code"] == "no_debt"
    async with db() as session:
        assert (await session.scalars(select(IdempotencyRecord))).all() == []
        assert (await session.scalars(select(CheckoutSession))).all() == []
    # the key is free: another body under it runs, once
    created = await post_checkout("acc_1", top_up_body(), key="k")
    assert created.status_code == 201, created.text
    replayed = await post_checkout("acc_1", top_up_body(), key="k")
    assert replayed.json() == created.json()
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert len(stripe_fake.all("checkout.session")) == 1


async def test_a_crash_before_the_result_is_recorded_leaves_a_pending_row_whose_key_the_retry_reuses(
    post_checkout: PostCheckout,
    stripe_fake: StripeFake,
    db: async_sessionmaker[AsyncSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def crash(*args: Any) -> None:
        raise RuntimeError("the process died after Stripe answered")

    monkeypatch.setattr(service, "_created_values", crash)
    with pytest.raises(RuntimeError):
        await post_checkout("acc_1", subscription_body("ch_1"), key="buy")
    monkeypatch.undo()
    async with db() as session:
        [pending] = (await session.scalars(select(CheckoutSession))).all()
        assert pending.status == "pending" and pending.stripe_id is None

    retry = await post_checkout("acc_1", subscription_body("ch_1"), key="buy")
    assert retry.status_code == 201, retry.text
    assert retry.json()["id"] == str(pending.id)
    keys = [r.idempotency_key for r in stripe_fake.requests_to("POST", "/v1/checkout/sessions")]
    assert keys == [f"billing:checkout:{pending.id}"] * 2
    [created] = stripe_fake.all("checkout.session")
    assert retry.json()["stripe_checkout_session_id"] == created["id"]
    assert len(stripe_fake.all("customer")) == 1


async def test_concurrent_first_checkouts_of_many_accounts_make_one_customer_each(
    post_checkout: PostCheckout,
    stripe_fake: StripeFake,
    db: async_sessionmaker[AsyncSession],
) -> None:
    accounts = [f"acc_{i}" for i in range(4)]
    responses = await asyncio.gather(
        *[post_checkout(a, top_up_body(), key=f"k{n}") for a in accounts for n in range(3)]
    )
    assert {r.status_code for r in responses} == {201}
    customers = stripe_fake.all("customer")
    assert sorted(c["metadata"]["account_id"] for c in customers) == accounts
    async with db() as session:
        recorded = {a.id: a.stripe_customer_id for a in await session.scalars(select(Account))}
    assert recorded == {c["metadata"]["account_id"]: c["id"] for c in customers}
    by_account = {r.json()["id"]: r for r in responses}
    assert len(by_account) == 12


async def test_a_value_the_database_cannot_store_is_a_422_and_creates_nothing(
    post_checkout: PostCheckout,
    token: Any,
    stripe_fake: StripeFake,
    db: async_sessionmaker[AsyncSession],
) -> None:
    """The first transaction runs on the asyncpg connection: its database errors are answered
    as the SQLAlchemy path's (app/errors.py), here a NUL character in the token's `sub` (which
    the key claim stores; an email like that is ignored: test_auth.py)."""
    tok = token(account_id="acc_nul", sub="nul\x00user", email="nul@example.com")
    response = await post_checkout("acc_nul", top_up_body(), key="nul", tok=tok)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "validation_error"
    async with db() as session:
        assert await session.get(Account, "acc_nul") is None
        assert (await session.scalars(select(CheckoutSession))).all() == []
        assert (await session.scalars(select(IdempotencyRecord))).all() == []
    assert stripe_fake.all("customer") == []


async def test_a_payment_event_applied_before_the_result_is_recorded_is_what_the_answer_says(
    app: FastAPI,
    post_checkout: PostCheckout,
    db: async_sessionmaker[AsyncSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The answer is stored with the result in one statement only when the row is as the
    answer says; here an event completed the session between Stripe's answer and our record,
    so the answer (and its replay) says what the row says."""
    gateway = app.state.stripe
    create = gateway.create_checkout_session

    async def created_then_paid(params: dict[str, Any], *, key: str) -> Any:
        created = await create(params, key=key)
        async with db() as session, session.begin():
            await session.execute(
                update(CheckoutSession)
                .where(CheckoutSession.id == uuid.UUID(params["metadata"]["checkout_session_id"]))
                .values(status="complete", payment_status="paid", fulfilled_at=func.now())
            )
        return created

    monkeypatch.setattr(gateway, "create_checkout_session", created_then_paid)
    answer = await post_checkout("acc_1", top_up_body(), key="k-race")
    assert answer.status_code == 201, answer.text
    assert answer.json()["status"] == "complete"
    assert answer.json()["fulfilled"] is True
    assert answer.json()["url"] is None
    replay = await post_checkout("acc_1", top_up_body(), key="k-race")
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == answer.json()
