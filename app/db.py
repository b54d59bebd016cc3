"""Database: declarative Base, engine, the one-session-per-request dependency, the
read-only reader, and the driver path (`DriverStatement`, `driver_transaction`: Core statements
compiled once and run by asyncpg, for the checkout's transactions and the reader's repeats).

Pooled connections are not pinged on checkout (a round trip per request); instead they are
recycled after `POOL_RECYCLE_SECONDS`, and a connection found dead when used (the database
restarted) is invalidated together with every connection pooled before it (SQLAlchemy does
this on any disconnect error), so at most the requests in flight at that moment see it: they
answer 503 `service_unavailable` (app/errors.py), and a read-only statement is retried once on
a fresh connection first (`Reader`), so reads do not even see that.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from operator import itemgetter
from typing import Annotated, Any

import orjson
from fastapi import Depends, Request
from sqlalchemy import (
    ColumnElement,
    DateTime,
    Enum,
    Executable,
    MetaData,
    Row,
    String,
    Table,
    Text,
    bindparam,
    func,
    literal,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: DateTime(timezone=True)}


class Timestamped:
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())


BIGINT_MAX = 2**63 - 1
"""The largest row id: cursors and other ids from callers are bounded by it (422, not a 500)."""


POOL_TIMEOUT_SECONDS = 5
POOL_RECYCLE_SECONDS = 1800
"""Pooled connections older than this are replaced at checkout (below the idle timeouts of
proxies and firewalls), instead of a ping round trip before every use."""


def create_engine(database_url: str, pool_size: int = 10) -> AsyncEngine:
    return create_async_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=POOL_RECYCLE_SECONDS,
        pool_timeout=POOL_TIMEOUT_SECONDS,
        connect_args={"timeout": 5, "command_timeout": 30},
        json_serializer=lambda value: orjson.dumps(value).decode(),
        json_deserializer=orjson.loads,
    )


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request, committed before the response is sent."""
    factory: async_sessionmaker[AsyncSession] = request.app.state.session_factory
    async with factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


MAX_DIRECT_STATEMENTS = 64
"""Statements a `Reader` keeps compiled for asyncpg (the read routes pass module-level ones)."""

MAX_KEYS_PER_READ = 100
"""Keys one execution of a `Reader.by_key` statement answers at most."""


class Reader:
    """Read-only statements for routes that change nothing: each runs on a pooled connection in
    autocommit mode (no BEGIN/COMMIT round trips, one round trip per statement) and is retried
    once on a fresh connection when the pooled one turns out dead (the database restarted;
    SQLAlchemy then also discards every other connection pooled before it). A database that is
    down raises as usual (503 through app/errors.py).

    A statement's first execution goes through SQLAlchemy Core; later ones send the SQL it
    compiled to straight to the pooled asyncpg connection (no SQLAlchemy connection, execution
    context or result objects: ~0.2 ms of CPU per read), when SQLAlchemy would not convert any
    of its parameters or columns anyway. Rows have the same attribute names either way. Should
    that fail for any reason (a dead connection, an error), the connection is discarded and the
    statement runs again through SQLAlchemy Core, which retries, translates errors and discards
    stale connections exactly as before.

    Lookups of one row set by key (`by_key`, the channel-access check) share executions when
    they come at once: the first runs at once, and the keys asked while a statement runs go
    together in the next one.

    At most half the pool's connections read at once (`slots`), so reads never take the
    connections writes need, nor open overflow ones under a burst of cheap reads (waiting a
    moment for a slot is far cheaper than a connect). The direct path keeps the pooled
    connections it used checked out for the next direct reads, at most one per slot: a
    checkout and a checkin through SQLAlchemy's pool cost as much CPU as the statement itself
    (bench/README.md). A kept connection goes back to the pool instead when it is wanted again
    `KEEP_SECONDS` or more after its checkout, so the pool's recycling and its discarding of
    connections older than a disconnect still reach it, and all of them go back at
    `close()`."""

    KEEP_SECONDS = 60.0

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.slots = max(1, engine.pool.size() // 2)  # type: ignore[attr-defined]
        self._slots = asyncio.Semaphore(self.slots)  # waited for as long as the pool would wait
        self._direct: dict[Executable, DriverStatement | None] = {}
        self._kept: list[tuple[Any, float]] = []  # (pooled connection, when it was taken)
        # by_key: per statement, the callers waiting for each key, and the task running them
        self._asked: dict[Executable, dict[Any, list[asyncio.Future[list[Any]]]]] = {}
        self._answering: dict[Executable, asyncio.Task[None]] = {}

    async def all(
        self, statement: Executable, params: dict[str, Any] | None = None
    ) -> Sequence[Any]:
        """Every row of `statement` (with `params`), each with the columns as attributes."""
        if self._slots.locked():
            async with asyncio.timeout(POOL_TIMEOUT_SECONDS):
                await self._slots.acquire()
        else:
            await self._slots.acquire()
        try:
            direct = self._direct.get(statement)
            if direct is not None:
                rows = await self._fetch_direct(direct, params or {})
                if rows is not None:
                    return rows
            return await self._execute(statement, params)
        finally:
            self._slots.release()

    async def by_key(self, statement: Executable, key: Any) -> list[Any]:
        """The rows of `statement` for `key`. `statement` selects the rows of every key in its
        array parameter `keys`, each row with its key as the first column; every key must be
        one the statement accepts (the routes validate them first), or the execution fails for
        all the keys it carries.

        Concurrent calls for one statement share its executions (each through `all`): the
        first runs at once, and the keys asked while one runs wait and go together in the
        next, at most `MAX_KEYS_PER_READ` per execution. A burst of N lookups costs a few
        statements instead of N (a round trip, a slot and asyncpg's work each: ~30% of an
        access check's CPU at 16 connections, bench/README.md item 42); a lone lookup costs
        one, as before. An execution's error is raised to each of its callers; a caller
        cancelled while waiting leaves the others their answers."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._asked.setdefault(statement, {}).setdefault(key, []).append(future)
        if statement not in self._answering:
            self._answering[statement] = asyncio.create_task(self._answer(statement))
        return await future

    async def _answer(self, statement: Executable) -> None:
        """Run `statement` for the keys asked of it until none is left waiting."""
        asked = self._asked[statement]
        try:
            while asked:
                keys = list(itertools.islice(asked, MAX_KEYS_PER_READ))
                callers = {key: asked.pop(key) for key in keys}
                try:
                    by_key: dict[Any, list[Any]] = {key: [] for key in keys}
                    for row in await self.all(statement, {"keys": keys}):
                        by_key[row[0]].append(row)
                except Exception as exc:
                    _settle(callers, exc)
                    continue
                except BaseException:
                    _settle(callers, None)
                    raise
                for key, futures in callers.items():
                    for future in futures:
                        if not future.done():
                            future.set_result(by_key[key])
        finally:
            del self._answering[statement]
            _settle(asked, None)  # only left when this task was cancelled
            asked.clear()

    async def _execute(
        self, statement: Executable, params: dict[str, Any] | None
    ) -> Sequence[Row[Any]]:
        for attempt in (1, 2):
            try:
                async with self.engine.connect() as connection:
                    result = await connection.execute(statement, params)
                    rows = result.all()
                    if statement not in self._direct and len(self._direct) < MAX_DIRECT_STATEMENTS:
                        self._direct[statement] = DriverStatement.for_rows(
                            statement, tuple(result.keys())
                        )
                    return rows
            except DBAPIError as exc:
                if attempt == 2 or not exc.connection_invalidated:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fetch_direct(
        self, direct: DriverStatement, params: dict[str, Any]
    ) -> list[Any] | None:
        """The rows, or None when SQLAlchemy Core should run the statement instead."""
        connection, taken = await self._take()
        try:
            driver: Any = connection.driver_connection
            records = await driver.fetch(direct.sql, *direct.args(params))
        except Exception:
            connection.invalidate()  # dead, or in a state not worth finding out
            connection.close()
            return None
        except BaseException:  # cancelled mid-statement: the connection's state is unknown
            connection.invalidate()
            connection.close()
            raise
        self._kept.append((connection, taken))
        make = direct.row
        assert make is not None
        return [make(record) for record in records]

    async def _take(self) -> tuple[Any, float]:
        """A kept connection taken less than `KEEP_SECONDS` ago, else one from the pool; the
        older kept ones go back to the pool."""
        now = time.monotonic()
        while self._kept:
            connection, taken = self._kept.pop()
            if now - taken < self.KEEP_SECONDS:
                return connection, taken
            connection.close()
        return await self.engine.raw_connection(), now

    def close(self) -> None:
        """Every kept connection back to the pool (before the engine is disposed)."""
        while self._kept:
            self._kept.pop()[0].close()


def asked_keys(column: str) -> Any:
    """The keys a `Reader.by_key` statement answers: its array parameter `keys` as a derived
    table `asked` of one text column named `column`, to select first and join on."""
    return (
        func.unnest(bindparam("keys").cast(ARRAY(Text)))
        .table_valued(column)
        .render_derived(name="asked")
    )


def _settle(callers: dict[Any, list[asyncio.Future[list[Any]]]], error: Exception | None) -> None:
    """Every caller still waiting gets `error`, or is cancelled (None)."""
    for futures in callers.values():
        for future in futures:
            if not future.done():
                if error is None:
                    future.cancel()
                else:
                    future.set_exception(error)


async def get_reader(request: Request) -> Reader:
    reader: Reader = request.app.state.reader
    return reader


ReaderDep = Annotated[Reader, Depends(get_reader)]


# --- the driver path (hot paths only) --------------------------------------------------------

_DRIVER_DIALECT = asyncpg_dialect()  # type: ignore[no-untyped-call]


class DriverStatement:
    """A Core statement compiled once for asyncpg: the SQL SQLAlchemy would send, its
    parameters by bind name, run on an asyncpg connection without SQLAlchemy's per-execution
    work (cache key, cursor adaptation, result processing: ~0.2-0.5 ms of CPU per statement,
    bench/README.md). Used by the checkout's transactions (`driver_transaction`; rows are
    asyncpg Records) and by `Reader` (`for_rows`: rows with SQLAlchemy's attribute names),
    and by the event processor's statements inside its session's transaction
    (`session_driver`; `named=True`: `fetch` gives rows as named tuples of the selected
    columns' keys, for code that reads attributes).

    Parameters are passed to asyncpg as given: an expanding `IN` is refused (`ValueError`:
    list `literal()` values instead), and the caller passes what the driver takes (JSON as
    text for `jsonb`). `for_rows` takes only statements SQLAlchemy passes through unchanged
    (no parameter or column it converts)."""

    def __init__(self, statement: ClauseElement, *, named: bool = False) -> None:
        compiled = statement.compile(dialect=_DRIVER_DIALECT)
        if not isinstance(compiled, SQLCompiler) or compiled.positiontup is None:
            raise ValueError("not a statement with positional parameters")
        for name in compiled.positiontup:
            if compiled.binds[name].expanding or compiled.binds[name].callable is not None:
                raise ValueError(f"parameter {name!r} is rendered per execution")
        self.sql: str = compiled.string
        self.binds = [compiled.binds[name] for name in compiled.positiontup]
        self._names = tuple(compiled.positiontup)
        self._defaults: dict[str, Any] = {  # the statement's own values (literals)
            name: value
            for name, value in compiled.params.items()
            if not compiled.binds[name].required
        }
        self.row: Callable[[Any], Any] | None = None
        if named:
            keys = [column.key for column in getattr(statement, "selected_columns", ())]
            fields = collections.namedtuple("Row", keys)  # type: ignore[misc]
            self.row = fields._make

    @classmethod
    def for_rows(cls, statement: Executable, keys: tuple[str, ...]) -> DriverStatement | None:
        """The statement with rows made as named tuples of `keys` (the names SQLAlchemy's
        result gave), or None when SQLAlchemy converts something of it: Core runs it."""
        columns = getattr(statement, "selected_columns", None)
        if not isinstance(statement, ClauseElement) or columns is None or len(columns) != len(keys):
            return None
        for column in columns:
            if column.type.dialect_impl(_DRIVER_DIALECT).result_processor(_DRIVER_DIALECT, None):
                return None
        try:
            direct = cls(statement)
            for bind in direct.binds:
                if bind.type.dialect_impl(_DRIVER_DIALECT).bind_processor(_DRIVER_DIALECT):
                    return None
            fields = collections.namedtuple("Row", keys)  # type: ignore[misc]
            direct.row = fields._make
        except ValueError:  # converted parameters, or a column name that is no identifier
            return None
        return direct

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        """The positional values: a parameter the statement does not give itself must be in
        `params` (`KeyError` otherwise, never a silent NULL)."""
        return [params[n] if n in params else self._defaults[n] for n in self._names]

    async def fetchrow(self, conn: Any, **params: Any) -> Any:
        return await conn.fetchrow(self.sql, *self.args(params))

    async def fetchval(self, conn: Any, **params: Any) -> Any:
        return await conn.fetchval(self.sql, *self.args(params))

    async def execute(self, conn: Any, **params: Any) -> None:
        await conn.execute(self.sql, *self.args(params))

    async def fetch(self, conn: Any, **params: Any) -> list[Any]:
        """asyncpg Records, or named tuples for a statement made with `named=True`."""
        records = await conn.fetch(self.sql, *self.args(params))
        return list(records) if self.row is None else [self.row(record) for record in records]


class ArrayUpdate:
    """Many rows of `table` updated by one statement sent straight to asyncpg:
    `UPDATE table SET column = v.column, ... FROM unnest(<one array per column>) AS v(...)
    WHERE table.key = v.key [AND where]`, `updated_at = now()` too when the table has it.
    One statement and one array per column instead of one execution per row (`executemany`
    costs the client and Postgres per row). Each row must name a different key: Postgres
    updates a row matched twice only once, with either match.

    `values`: for some of `columns`, the SQL of the new value instead of `v.column` (over the
    table's current row and `v`, e.g. `COALESCE(accounts.currency, v.currency)`); `where`
    may name both too. A value too long for its column fails, as it would in one row's
    `UPDATE` (`_array_type`)."""

    def __init__(
        self,
        table: Table,
        columns: Sequence[str],
        *,
        key: str = "id",
        where: str = "",
        values: Mapping[str, str] | None = None,
    ) -> None:
        names = [key, *columns]
        given = values or {}
        if not set(given) <= set(columns):
            raise ValueError(f"values for columns not updated: {sorted(set(given) - set(columns))}")
        sets = [f'"{name}" = ' + given.get(name, f'v."{name}"') for name in columns]
        if "updated_at" in table.c and "updated_at" not in columns:
            sets.append("updated_at = now()")
        aliases = ", ".join(f'"{name}"' for name in names)
        condition = f" AND {where}" if where else ""
        # names from our own table definitions; every value is a parameter
        update = f'UPDATE "{table.name}" SET {", ".join(sets)}'  # noqa: S608
        source = f"FROM unnest({_arrays(table, names)}) AS v({aliases})"
        self.sql = f'{update} {source} WHERE "{table.name}"."{key}" = v."{key}"{condition}'
        self._names = names

    async def execute(self, conn: Any, rows: Sequence[Mapping[str, Any]]) -> int:
        """`rows`: each with a value for the key and every column. Returns how many rows
        were updated."""
        if not rows:
            return 0
        status = await conn.execute(
            self.sql, *([row[name] for row in rows] for name in self._names)
        )
        return int(status.rsplit(" ", 1)[1])  # "UPDATE <count>"


class ArrayInsert:
    """Many rows inserted into `table` by one statement sent straight to asyncpg:
    `INSERT INTO table (columns) SELECT * FROM unnest(<one array per column>)
    [ON CONFLICT (on_conflict_do_nothing) DO NOTHING]`, in the order given (identity ids
    follow it). The rows end as one `INSERT` per row, in order, would leave them (what
    `executemany` did, one execution per row): with `on_conflict_do_nothing`, a row whose
    key is stored already is skipped, and of rows sharing a key only the first is inserted
    (the others are dropped in Python before sending, so that does not depend on the order
    Postgres inserts in). Columns left out get their server defaults; a column whose default
    SQLAlchemy computes in Python (a `uuid4` id) must be given (`ValueError` otherwise). A
    value too long for its column fails, as it would in one row's `INSERT`."""

    def __init__(
        self, table: Table, columns: Sequence[str], *, on_conflict_do_nothing: Sequence[str] = ()
    ) -> None:
        computed = [c.name for c in table.c if c.default is not None and c.name not in columns]
        if computed:
            raise ValueError(f"columns SQLAlchemy would compute must be given: {computed}")
        if not set(on_conflict_do_nothing) <= set(columns):
            raise ValueError("the conflict key must be among the inserted columns")
        names = ", ".join(f'"{name}"' for name in columns)
        # names from our own table definitions; every value is a parameter
        insert = f'INSERT INTO "{table.name}" ({names})'
        self.sql = f"{insert} SELECT * FROM unnest({_arrays(table, columns)})"  # noqa: S608
        if on_conflict_do_nothing:
            key = ", ".join(f'"{name}"' for name in on_conflict_do_nothing)
            self.sql += f" ON CONFLICT ({key}) DO NOTHING"
        self._names = list(columns)
        self._key = itemgetter(*on_conflict_do_nothing) if on_conflict_do_nothing else None

    async def execute(self, conn: Any, rows: Iterable[Mapping[str, Any]]) -> None:
        """`rows`: each with a value for every column."""
        if self._key is not None:
            first: dict[Any, Mapping[str, Any]] = {}
            for row in rows:
                first.setdefault(self._key(row), row)
            rows = first.values()
        rows = list(rows)
        if rows:
            await conn.execute(self.sql, *([row[name] for row in rows] for name in self._names))


def _arrays(table: Table, names: Sequence[str]) -> str:
    """`$1::type[], $2::type[], ...`: one array parameter per column of `names`."""
    return ", ".join(
        f"${number}::{_array_type(table.c[name])}[]" for number, name in enumerate(names, 1)
    )


def _array_type(column: ColumnElement[Any]) -> str:
    """The type of a column's values in an array parameter: the column's, without a length
    (a cast to `varchar(n)` would cut a longer value silently, where assigning it to the
    column fails, as the one-row statements' `$1::VARCHAR` did)."""
    type_ = column.type
    if isinstance(type_, String) and not isinstance(type_, Enum) and type_.length is not None:
        type_ = String()
    return type_.compile(dialect=_DRIVER_DIALECT)


async def session_driver(session: AsyncSession) -> Any:
    """The asyncpg connection of `session`'s transaction, for `DriverStatement`s that take
    part in it (the event processor's statements). Pending ORM changes are flushed first, as
    the session's own `execute` would. SQLAlchemy sends BEGIN with its first statement: if
    none has run yet, a `SELECT 1` through the session begins the transaction, so nothing
    sent here commits on its own (a session without a transaction, e.g. in autocommit, is
    refused: `RuntimeError`). Kept for the rest of the transaction (`session.info`).

    Inside `session.begin_nested()` the session is asked for its connection first: that is
    when SQLAlchemy sends the SAVEPOINT, so what is sent here is rolled back with it (it never
    sees these statements, and would otherwise send no SAVEPOINT to roll back to: one failing
    statement would abort the whole transaction)."""
    if session.new or session.dirty or session.deleted:
        await session.flush()
    transaction = _innermost_transaction(session)
    known = session.info.get(_DRIVER_OF_TRANSACTION)
    if transaction is not None and known is not None and known[0] is transaction:
        return known[1]
    connection = await session.connection()
    driver: Any = (await connection.get_raw_connection()).driver_connection
    if not driver.is_in_transaction():
        await connection.execute(_BEGIN)
        if not driver.is_in_transaction():
            raise RuntimeError("the session's connection is not in a transaction")
    session.info[_DRIVER_OF_TRANSACTION] = (_innermost_transaction(session), driver)
    return driver


def _innermost_transaction(session: AsyncSession) -> Any:
    """The session's savepoint (`begin_nested`) if one is open, else its transaction."""
    sync_session = session.sync_session
    return sync_session.get_nested_transaction() or sync_session.get_transaction()


_DRIVER_OF_TRANSACTION = "driver_of_transaction"
_BEGIN = select(literal(1))


@contextlib.asynccontextmanager
async def driver_transaction(
    engine: AsyncEngine, *, wait_for_flush: bool = True
) -> AsyncIterator[Any]:
    """A transaction on a pooled connection's asyncpg connection (committed when the block
    ends, rolled back when it raises). Database errors are classified and answered as on the
    SQLAlchemy path (app/errors.py: 503 `service_unavailable`, or 422 for a value the database
    cannot store); a connection found unusable, or left mid-statement by a cancellation, is
    discarded from the pool.

    `wait_for_flush=False`: its COMMIT does not wait for the WAL to reach the disk (`SET LOCAL
    synchronous_commit = off`, sent with the `BEGIN` in one round trip); `flush_on_commit`
    turns the wait back on for the transaction."""
    from app.errors import database_unavailable

    pooled = await engine.raw_connection()
    driver: Any = pooled.driver_connection
    clean = False  # the connection ends outside any transaction, fit for its next user
    try:
        await driver.execute(BEGIN if wait_for_flush else BEGIN_WITHOUT_FLUSH_WAIT)
        try:
            yield driver
        except Exception as failure:
            if not database_unavailable(failure):
                with contextlib.suppress(Exception):  # failing, it leaves `clean` False
                    await driver.execute("ROLLBACK")
                    clean = True
            raise
        await driver.execute("COMMIT")
        clean = True
    finally:  # unusable, failed mid-way, or cancelled (perhaps mid-statement): discarded
        if not clean:
            pooled.invalidate()
        pooled.close()


@contextlib.asynccontextmanager
async def driver_connection(engine: AsyncEngine) -> AsyncIterator[Any]:
    """A pooled connection's asyncpg connection outside any transaction: each statement
    commits on its own, durably (one round trip for a change that is one statement). Errors
    as for `driver_transaction`; an unusable or cancelled connection is discarded."""
    from app.errors import database_unavailable

    pooled = await engine.raw_connection()
    usable = False
    try:
        yield pooled.driver_connection
        usable = True
    except Exception as exc:
        usable = not database_unavailable(exc)  # a failed statement leaves no transaction
        raise
    finally:
        if not usable:
            pooled.invalidate()
        pooled.close()


BEGIN = "BEGIN"
BEGIN_WITHOUT_FLUSH_WAIT = "BEGIN; SET LOCAL synchronous_commit = off"


async def flush_on_commit(conn: Any) -> None:
    """Make the `driver_transaction` on `conn` wait for its WAL to reach the disk at COMMIT."""
    await conn.execute("SET LOCAL synchronous_commit = on")
