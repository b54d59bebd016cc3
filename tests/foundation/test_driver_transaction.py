"""app/db.py `driver_transaction`: commits when its block ends, rolls back when it raises,
and never hands the next user a connection left inside a transaction or mid-statement; and
`session_driver`: statements sent on a session's asyncpg connection are part of its
transaction."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from fastapi import FastAPI
from sqlalchemy import literal, select

from app.db import DriverStatement, driver_transaction, flush_on_commit, session_driver
from app.models import Account


@pytest.fixture(autouse=True)
async def scratch_table(app: FastAPI) -> AsyncIterator[None]:
    """The tests' own table, dropped after each (the schema stays the migrations')."""
    async with driver_transaction(app.state.engine) as conn:
        await conn.execute("CREATE TABLE scratch_tx (n int PRIMARY KEY)")
    yield
    async with driver_transaction(app.state.engine) as conn:
        await conn.execute("DROP TABLE scratch_tx")


async def insert(app: FastAPI, *values: int, then: Exception | None = None) -> None:
    """Insert `values` into the scratch table in one transaction, then raise `then`."""
    async with driver_transaction(app.state.engine) as conn:
        for value in values:
            await conn.execute("INSERT INTO scratch_tx VALUES ($1)", value)
        if then is not None:
            raise then


async def stored(app: FastAPI) -> set[int]:
    async with driver_transaction(app.state.engine) as conn:
        return {r["n"] for r in await conn.fetch("SELECT n FROM scratch_tx")}


async def test_the_block_commits_and_a_raising_block_rolls_back(app: FastAPI) -> None:
    await insert(app, 1)
    with pytest.raises(LookupError):
        await insert(app, 2, then=LookupError("refused after writing"))
    assert await stored(app) == {1}
    # more than the pool holds: had a connection come back inside the rolled-back
    # transaction, its next BEGIN would be ignored and row 2 would be seen through it
    for _ in range(12):
        assert await stored(app) == {1}


async def test_a_failed_statement_rolls_back_and_the_connection_serves_again(
    app: FastAPI,
) -> None:
    with pytest.raises(asyncpg.UniqueViolationError):
        await insert(app, 5, 5)
    assert 5 not in await stored(app)


async def test_a_transaction_cancelled_mid_statement_leaves_no_connection_behind(
    app: FastAPI,
) -> None:
    async def slow() -> None:
        async with driver_transaction(app.state.engine) as conn:
            await conn.execute("INSERT INTO scratch_tx VALUES (7)")
            await conn.execute("SELECT pg_sleep(30)")

    task = asyncio.create_task(slow())
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(12):  # nothing committed, and every pooled connection answers
        assert 7 not in await stored(app)


async def test_without_flush_wait_the_commit_does_not_wait_unless_turned_back_on(
    app: FastAPI,
) -> None:
    async with driver_transaction(app.state.engine, wait_for_flush=False) as conn:
        assert await conn.fetchval("SHOW synchronous_commit") == "off"
        await flush_on_commit(conn)
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
    async with driver_transaction(app.state.engine) as conn:
        assert await conn.fetchval("SHOW synchronous_commit") == "on"


async def test_statements_sent_through_session_driver_belong_to_the_session_transaction(
    app: FastAPI,
) -> None:
    """`session_driver` on a session that has sent nothing yet begins its transaction first:
    what is sent on the driver is rolled back with the session, and committed with it."""
    factory = app.state.session_factory

    async def insert_then_fail() -> None:
        async with factory() as session, session.begin():
            driver = await session_driver(session)
            await driver.execute("INSERT INTO scratch_tx VALUES (41)")
            raise LookupError("rolled back after writing")

    with pytest.raises(LookupError):
        await insert_then_fail()
    assert 41 not in await stored(app)
    async with factory() as session, session.begin():
        await (await session_driver(session)).execute("INSERT INTO scratch_tx VALUES (42)")
    assert 42 in await stored(app)


async def test_session_driver_flushes_pending_orm_changes_first(app: FastAPI) -> None:
    factory = app.state.session_factory
    async with factory() as session, session.begin():
        session.add(Account(id="acc_driver_flush"))
        driver = await session_driver(session)
        found = await driver.fetchval("SELECT count(*) FROM accounts WHERE id = 'acc_driver_flush'")
        assert found == 1
        await session.rollback()


async def test_named_driver_statements_give_rows_with_the_selected_keys(app: FastAPI) -> None:
    statement = DriverStatement(
        select(literal(7).label("seven"), literal("x").label("letter")), named=True
    )
    async with app.state.session_factory() as session, session.begin():
        rows = await statement.fetch(await session_driver(session))
    assert [(row.seven, row.letter) for row in rows] == [(7, "x")]
