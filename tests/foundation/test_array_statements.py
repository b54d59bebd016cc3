"""app/db.py `ArrayInsert` and `ArrayUpdate`: one statement for many rows leaves the table as
one statement per row, in order, would (the `executemany` they replace), duplicate keys and
values too long for their column included."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from fastapi import FastAPI
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    Uuid,
    func,
)
from sqlalchemy.schema import CreateTable

from app.db import ArrayInsert, ArrayUpdate, driver_transaction

SCRATCH = Table(
    "scratch_array",
    MetaData(),
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("account", String(16), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("amount", Integer),
    Column("note", String(8)),
    Column("at", DateTime(timezone=True), server_default=func.now()),
    UniqueConstraint("account", "kind"),
)
ROW_BY_ROW = (  # what `DriverStatement(insert(...).on_conflict_do_nothing(...))` sent per row
    "INSERT INTO scratch_array (account, kind, amount, note) VALUES ($1::VARCHAR, $2::VARCHAR,"
    " $3::INTEGER, $4::VARCHAR) ON CONFLICT (account, kind) DO NOTHING"
)
COLUMNS = ("account", "kind", "amount", "note")


@pytest.fixture(autouse=True)
async def scratch_table(app: FastAPI) -> AsyncIterator[None]:
    """The tests' own table, dropped after each (the schema stays the migrations')."""
    async with driver_transaction(app.state.engine) as conn:
        await conn.execute(str(CreateTable(SCRATCH).compile(app.state.engine)))
    yield
    async with driver_transaction(app.state.engine) as conn:
        await conn.execute("DROP TABLE scratch_array")


async def rows_after(app: FastAPI, write: Any, rows: list[dict[str, Any]]) -> list[Any]:
    """The table's rows in insertion order (by id; the ids themselves are left out: a
    conflicting row uses one up) after one stored row and then `write(conn, rows)`."""
    async with driver_transaction(app.state.engine) as conn:
        await conn.execute("TRUNCATE scratch_array RESTART IDENTITY")
        await conn.execute(ROW_BY_ROW, "acc_0", "top_up", 5, "stored")
        await write(conn, rows)
        found = await conn.fetch(
            "SELECT account, kind, amount, note, at IS NOT NULL AS dated"
            " FROM scratch_array ORDER BY id"
        )
    return [tuple(row) for row in found]


async def test_array_insert_writes_what_one_insert_per_row_would(app: FastAPI) -> None:
    rows = [
        {"account": "acc_2", "kind": "top_up", "amount": 1, "note": "first"},
        {"account": "acc_0", "kind": "top_up", "amount": 2, "note": "stored"},  # conflicts
        {"account": "acc_1", "kind": "refund", "amount": -3, "note": None},
        {"account": "acc_2", "kind": "top_up", "amount": 4, "note": "second"},  # same key
        {"account": "acc_2", "kind": "refund", "amount": 5, "note": "x"},
    ]

    async def row_by_row(conn: Any, rows: list[dict[str, Any]]) -> None:
        await conn.executemany(ROW_BY_ROW, [[row[name] for name in COLUMNS] for row in rows])

    insert = ArrayInsert(SCRATCH, COLUMNS, on_conflict_do_nothing=["account", "kind"])
    one_statement = await rows_after(app, insert.execute, rows)

    assert one_statement == await rows_after(app, row_by_row, rows)
    assert [(row[0], row[1], row[3]) for row in one_statement] == [
        ("acc_0", "top_up", "stored"),
        ("acc_2", "top_up", "first"),  # the first of the key, as one INSERT per row keeps
        ("acc_1", "refund", None),
        ("acc_2", "refund", "x"),
    ]
    assert all(row[4] for row in one_statement)  # the server default applied


async def test_array_insert_without_a_conflict_key_fails_on_a_duplicate(app: FastAPI) -> None:
    insert = ArrayInsert(SCRATCH, COLUMNS)
    with pytest.raises(asyncpg.UniqueViolationError):
        await rows_after(
            app, insert.execute, [{"account": "acc_0", "kind": "top_up", "amount": 1, "note": ""}]
        )


async def test_a_value_too_long_for_its_column_fails_as_one_row_would(app: FastAPI) -> None:
    """Not cut to the column's length (as a cast of the array to `varchar(8)[]` would)."""
    too_long = {"account": "acc_1", "kind": "top_up", "amount": 1, "note": "nine char"}
    with pytest.raises(asyncpg.StringDataRightTruncationError):
        await rows_after(app, ArrayInsert(SCRATCH, COLUMNS).execute, [too_long])
    update = ArrayUpdate(SCRATCH, ["note"])
    with pytest.raises(asyncpg.StringDataRightTruncationError):
        await rows_after(app, update.execute, [{"id": 1, "note": "nine char"}])


async def test_array_update_with_values_and_where_updates_as_one_update_per_row(
    app: FastAPI,
) -> None:
    """`values` and `where` may use the stored row and `v`: here the smaller amount is kept
    and a note is set only where there was none."""
    update = ArrayUpdate(
        SCRATCH,
        ["amount", "note"],
        values={
            "amount": "LEAST(scratch_array.amount, v.amount)",
            "note": "COALESCE(scratch_array.note, v.note)",
        },
        where="(scratch_array.amount > v.amount OR scratch_array.note IS NULL)",
    )

    async def add_then_update(conn: Any, rows: list[dict[str, Any]]) -> None:
        await ArrayInsert(SCRATCH, COLUMNS).execute(
            conn, [{"account": "acc_1", "kind": "k", "amount": 7, "note": None}]
        )
        await update.execute(conn, rows)

    after = await rows_after(
        app,
        add_then_update,
        [{"id": 1, "amount": 9, "note": "later"}, {"id": 2, "amount": 3, "note": "set"}],
    )
    assert [(row[2], row[3]) for row in after] == [(5, "stored"), (3, "set")]


def test_array_insert_refuses_to_leave_out_a_column_sqlalchemy_computes() -> None:
    table = Table(
        "scratch_uuid",
        MetaData(),
        Column("id", Uuid, primary_key=True, default=uuid.uuid4),
        Column("name", String(8)),
    )
    with pytest.raises(ValueError, match="id"):
        ArrayInsert(table, ["name"])
    assert "INSERT INTO" in ArrayInsert(table, ["id", "name"]).sql
