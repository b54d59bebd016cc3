"""Durable storage of verified events, many concurrent deliveries per transaction.

Each delivery hands its event to the `EventIngestor` and waits; a few flusher tasks take
whatever has queued up, insert it in one `INSERT ... ON CONFLICT (stripe_id) DO NOTHING
RETURNING` (one autocommit statement over arrays), then answer every waiting delivery. A delivery is acknowledged only after
that commit (group commit: one fsync serves many events), and the database, not a prior read,
decides what is a duplicate. If the insert fails, every delivery in the batch gets the error
and answers 503, so Stripe retries.
"""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeGuard

import orjson
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.webhooks.handlers import HANDLED_EVENT_TYPES

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class IncomingEvent:
    stripe_id: str
    type: str
    api_version: str | None
    object_id: str | None
    stripe_created: datetime
    livemode: bool
    status: str  # "pending" for types we apply, "ignored" for the rest
    # What is stored: the body as delivered (no re-serialising), or the event serialised. The
    # parsed event itself is not kept: a delivery's thousands of objects are freed as soon as
    # its envelope is checked, not when its batch commits (far less garbage-collector work).
    payload_json: str


def incoming_event(event: Any, *, livemode: bool, raw: bytes | None = None) -> IncomingEvent:
    """Check the envelope of a verified event; ValueError says what is wrong with it."""
    if not isinstance(event, dict) or event.get("object") != "event":
        raise ValueError("body is not a Stripe event")
    event_id, event_type, created = event.get("id"), event.get("type"), event.get("created")
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not (_storable(event_id, 255) and event_id.startswith("evt_")):
        raise ValueError("event id missing or malformed")
    if not (_storable(event_type, 128) and event_type):
        raise ValueError("event type missing or malformed")
    if not isinstance(created, int) or isinstance(created, bool) or created < 0:
        raise ValueError("event created missing or malformed")
    try:
        stripe_created = datetime.fromtimestamp(created, UTC)
    except (ValueError, OverflowError, OSError):  # beyond what a timestamp can be
        raise ValueError("event created missing or malformed") from None
    if not isinstance(obj, dict):
        raise ValueError("event data.object missing")
    if event.get("account"):
        raise ValueError("Connect events are not accepted on this endpoint")
    if event.get("livemode") is not livemode:
        raise ValueError("event livemode does not match the configured Stripe key")
    object_id = obj.get("id")
    api_version = event.get("api_version")
    if isinstance(object_id, str) and not _storable(object_id, 255):
        raise ValueError("event data.object.id malformed")
    if isinstance(api_version, str) and not _storable(api_version, 64):
        raise ValueError("event api_version malformed")
    return IncomingEvent(
        stripe_id=event_id,
        type=event_type,
        api_version=api_version if isinstance(api_version, str) else None,
        object_id=object_id if isinstance(object_id, str) else None,
        stripe_created=stripe_created,
        livemode=livemode,
        status="pending" if event_type in HANDLED_EVENT_TYPES else "ignored",
        payload_json=(raw if raw is not None else orjson.dumps(event)).decode(),
    )


def _storable(value: object, max_length: int) -> TypeGuard[str]:
    """A string its `stripe_events` column can hold: a value the database refuses would fail
    the whole group-committed batch (503 for every delivery in it), not just this event."""
    return isinstance(value, str) and len(value) <= max_length and "\x00" not in value


# One statement for the whole batch: eight arrays, whatever the number of events (a multi-row
# VALUES through the ORM costs per row and re-serialises every payload).
INSERT_EVENTS = """
INSERT INTO stripe_events
    (stripe_id, type, api_version, object_id, stripe_created, livemode, payload, status)
SELECT e.stripe_id, e.type, e.api_version, e.object_id, e.stripe_created, e.livemode,
       e.payload::json, e.status
FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::varchar[], $5::timestamptz[],
            $6::boolean[], $7::text[], $8::varchar[])
    AS e(stripe_id, type, api_version, object_id, stripe_created, livemode, payload, status)
ON CONFLICT (stripe_id) DO NOTHING
RETURNING stripe_id
"""


def _columns(events: list[IncomingEvent]) -> tuple[list[Any], ...]:
    columns: tuple[list[Any], ...] = tuple([] for _ in range(8))
    for e in events:
        values = (
            e.stripe_id,
            e.type,
            e.api_version,
            e.object_id,
            e.stripe_created,
            e.livemode,
            e.payload_json,
            e.status,
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    return columns


async def insert_events(connection: AsyncConnection, events: list[IncomingEvent]) -> set[str]:
    """Insert events, skipping stored ones; returns the ids that were new."""
    result = await connection.exec_driver_sql(INSERT_EVENTS, _columns(events))
    return {row[0] for row in result}


class EventIngestor:
    def __init__(self, engine: AsyncEngine, *, flushers: int = 4, max_batch: int = 500) -> None:
        # Four flushers (each one connection of the pool while deliveries arrive): a batch's
        # WAL flush overlaps the others' inserts; on 2 vCPUs 4 stored ~20% more per second than
        # 2 or 3, and 6 no more than 4 (bench/README.md).
        self._engine = engine
        self._flushers = flushers
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[IncomingEvent, asyncio.Future[bool]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.on_stored: list[Any] = []

    def start(self) -> None:
        """Start the flushers (on the first delivery). Each in a context of its own: one
        copied from that delivery would log its request id on every later batch's lines."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._flush_forever(), context=contextvars.Context())
                for _ in range(self._flushers)
            ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def store(self, event: IncomingEvent) -> bool:
        """Store the event durably; True when new, False for a duplicate. Raises on failure."""
        self.start()
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((event, future))
        return await future

    async def _flush_forever(self) -> None:
        # Each flusher keeps one connection in autocommit and talks to asyncpg directly: a batch
        # is one statement, one round trip and one WAL flush (no pool checkout and ping, BEGIN
        # or COMMIT, no SQLAlchemy result machinery per batch). A connection that fails (the
        # database restarted since it was opened) is replaced and the batch tried once more on
        # a new one; a batch that fails twice answers 503. (Should the failed try have stored
        # the batch after all, the second reports its events as duplicates: still stored once.)
        connection: AsyncConnection | None = None
        driver: Any = None
        try:
            while True:
                batch = [await self._queue.get()]
                while len(batch) < self._max_batch and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                columns = _columns([event for event, _ in batch])
                rows: Any = None
                for last_try in (False, True):
                    try:
                        if connection is None:
                            connection, driver = await autocommit_driver(self._engine)
                            await _prefer_lz4(driver)
                        rows = await driver.fetch(INSERT_EVENTS, *columns)
                        break
                    except Exception as exc:
                        log.warning(
                            "webhook.store_failed",
                            events=len(batch),
                            error_type=type(exc).__name__,
                            retrying=not last_try,
                        )
                        if connection is not None:
                            await discard_connection(connection)
                            connection = driver = None
                        if last_try:
                            for _, future in batch:
                                if not future.done():
                                    future.set_exception(exc)
                            break
                if rows is None:
                    continue
                inserted = {row[0] for row in rows}
                for event, future in batch:
                    is_new = event.stripe_id in inserted
                    inserted.discard(event.stripe_id)  # a second copy in one batch is a duplicate
                    if not future.done():
                        future.set_result(is_new)
                for callback in self.on_stored:
                    callback()
        finally:
            if connection is not None:
                await discard_connection(connection)


async def _prefer_lz4(driver: Any) -> None:
    """Payloads (~4 KB of JSON) are TOAST-compressed; lz4 costs Postgres about a third less
    CPU per stored event than the default pglz (bench/README.md). Every session reads either.
    A server built without lz4 keeps its default."""
    try:
        await driver.execute("SET default_toast_compression = 'lz4'")
    except Exception as exc:
        log.info("webhook.lz4_unavailable", error_type=type(exc).__name__)


async def autocommit_driver(engine: AsyncEngine) -> tuple[AsyncConnection, Any]:
    """A pool connection in autocommit and its asyncpg connection, for a task that keeps it
    (let it go with `discard_connection`)."""
    connection = await engine.connect()
    try:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        return connection, (await connection.get_raw_connection()).driver_connection
    except BaseException:
        await discard_connection(connection)
        raise


async def discard_connection(connection: AsyncConnection) -> None:
    """Close a connection without returning it to the pool (it may be broken)."""
    try:
        await connection.invalidate()
        await connection.close()
    except Exception as exc:  # already broken: nothing more to release
        log.debug("webhook.connection_discard_failed", error_type=type(exc).__name__)
