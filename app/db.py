"""Database: declarative Base, engine, the one-session-per-request dependency, the
read-only reader, and the driver path (`DriverStatement`, `driver_transaction`: Core statements
compiled once and run by asyncpg, for the checkout's hot transactions).

Pooled connections are not pinged on checkout (a round trip per request); instead they are
recycled after `POOL_RECYCLE_SECONDS`, and a connection found dead when used (the database
restarted) is invalidated together with every connection pooled before it (SQLAlchemy does
this on any disconnect error), so at most the requests in flight at that moment see it: they
answer 503 `service_unavailable` (app/errors.py), and a read-only statement is retried once on
a fresh connection first (`Reader`), so reads do not even see that.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Annotated, Any

import asyncpg  # type: ignore[import-untyped]
import orjson
from fastapi import Depends, Request
from sqlalchemy import DateTime, Executable, MetaData, Row, func
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import ClauseElement

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


class Reader:
    """Read-only statements for routes that change nothing: each runs on a pooled connection in
    autocommit mode (no BEGIN/COMMIT round trips, one round trip per statement) and is retried
    once on a fresh connection when the pooled one turns out dead (the database restarted;
    SQLAlchemy then also discards every other connection pooled before it). A database that is
    down raises as usual (503 through app/errors.py)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        # At most as many reads at once as the pool keeps connections: more would open and
        # close overflow connections (a connect each) under a burst of cheap reads, when
        # waiting a moment for a pooled one is far cheaper. Waits as long as the pool would.
        self._slots = asyncio.Semaphore(max(1, engine.pool.size()))  # type: ignore[attr-defined]

    async def all(
        self, statement: Executable, params: dict[str, Any] | None = None
    ) -> Sequence[Row[Any]]:
        """Every row of `statement` (with `params`)."""
        if self._slots.locked():
            async with asyncio.timeout(POOL_TIMEOUT_SECONDS):
                await self._slots.acquire()
        else:
            await self._slots.acquire()
        try:
            for attempt in (1, 2):
                try:
                    async with self.engine.connect() as connection:
                        result = await connection.execute(statement, params)
                        return result.all()
                except DBAPIError as exc:
                    if attempt == 2 or not exc.connection_invalidated:
                        raise
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            self._slots.release()


async def get_reader(request: Request) -> Reader:
    reader: Reader = request.app.state.reader
    return reader


ReaderDep = Annotated[Reader, Depends(get_reader)]


# --- the driver path (hot paths only) --------------------------------------------------------

_DRIVER_DIALECT = asyncpg_dialect()  # type: ignore[no-untyped-call]
INPUT_DATA_SQLSTATES = frozenset({"22001", "22003", "22007", "22008", "22021", "22P05"})
"""SQLSTATEs meaning "this input cannot be stored" (as app/errors.py reads them)."""


class DriverStatement:
    """A Core statement compiled once for asyncpg and run on the driver connection of
    `driver_transaction`: the SQL is the one SQLAlchemy would send, without SQLAlchemy's
    per-execution work (cache key, cursor adaptation, result processing), which costs ~0.3-0.5
    ms of CPU per statement (bench/README.md, checkout). Parameters by bind name; rows are
    asyncpg Records. For plain column types only (no bind or result processors), and `IN`
    over a list of `literal()`s, not an expanding parameter."""

    def __init__(self, statement: ClauseElement) -> None:
        compiled: Any = statement.compile(dialect=_DRIVER_DIALECT)
        if compiled.has_out_parameters or "POSTCOMPILE" in str(compiled):
            raise ValueError("expanding IN is not supported: list `literal()` values instead")
        self.sql = str(compiled)
        self._names: tuple[str, ...] = tuple(compiled.positiontup or ())
        self._defaults: dict[str, Any] = dict(compiled.params)

    def args(self, params: dict[str, Any]) -> list[Any]:
        return [params[n] if n in params else self._defaults[n] for n in self._names]

    async def fetchrow(self, conn: Any, **params: Any) -> Any:
        return await conn.fetchrow(self.sql, *self.args(params))

    async def fetchval(self, conn: Any, **params: Any) -> Any:
        return await conn.fetchval(self.sql, *self.args(params))

    async def execute(self, conn: Any, **params: Any) -> None:
        await conn.execute(self.sql, *self.args(params))


@contextlib.asynccontextmanager
async def driver_transaction(engine: AsyncEngine) -> AsyncIterator[Any]:
    """A transaction on a pooled connection's asyncpg connection (committed when the block
    ends, rolled back when it raises). Database errors answer as the SQLAlchemy path's do
    (app/errors.py): a lost connection is discarded from the pool and answers 503
    `service_unavailable`, a value the database cannot store 422 `validation_error`."""
    from app.errors import ServiceUnavailable, Unprocessable

    async with engine.connect() as connection:
        driver = (await connection.get_raw_connection()).driver_connection
        assert driver is not None
        try:
            async with driver.transaction():
                yield driver
        except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            await connection.invalidate()
            raise ServiceUnavailable(
                "The database is unavailable; retry later", headers={"Retry-After": "5"}
            ) from exc
        except asyncpg.PostgresError as exc:
            sqlstate = str(getattr(exc, "sqlstate", "") or "")
            if sqlstate in INPUT_DATA_SQLSTATES:
                raise Unprocessable(
                    "A value in the request cannot be stored (too long, out of range, or "
                    "containing characters such as NUL)"
                ) from exc
            if sqlstate.startswith(("08", "57P")):
                await connection.invalidate()
                raise ServiceUnavailable(
                    "The database is unavailable; retry later", headers={"Retry-After": "5"}
                ) from exc
            raise
