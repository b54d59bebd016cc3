"""Waking an event processor that runs in another process (`billing process-events`) when a
web process without background workers stores new events: Postgres `LISTEN`/`NOTIFY` on the
channel `stripe_events`. Without it, that processor finds them at its next poll (up to a second
later); the poll stays as the backstop (a lost notification, a listener reconnecting).

- `StoredEventsNotifier` (web side): `poke()` after each stored batch. At most one `NOTIFY` is
  in flight; pokes that arrive meanwhile make one more, at least `MIN_INTERVAL` later, so a
  burst costs a few notifications a second, never one per event. It uses an autocommit
  connection of its own, replaced after a failure; a failure is logged and never touches an
  acknowledgement (the event is already stored).
- `listen_for_stored_events` (processor side): `LISTEN` on a connection of its own, waking the
  processor on each notification and once on (re)connecting; reconnects a second after the
  connection is lost.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.webhooks.ingest import autocommit_driver, discard_connection

log = structlog.get_logger()

CHANNEL = "stripe_events"
MIN_INTERVAL = 0.01  # seconds between two notifications
RECONNECT_AFTER = 1.0  # seconds


class StoredEventsNotifier:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._wanted = False
        self._task: asyncio.Task[None] | None = None
        self._connection: AsyncConnection | None = None
        self._driver: Any = None

    def poke(self) -> None:
        self._wanted = True
        if self._task is None or self._task.done():
            # not in the poking flusher's or request's context: it notifies for many events
            self._task = asyncio.create_task(self._notify(), context=contextvars.Context())

    async def _notify(self) -> None:
        while self._wanted:
            self._wanted = False
            try:
                if self._connection is None:
                    self._connection, self._driver = await autocommit_driver(self._engine)
                await self._driver.execute(f"NOTIFY {CHANNEL}")
            except Exception as exc:
                log.warning("stripe_event.notify_failed", error_type=type(exc).__name__)
                await self._close()
                return
            await asyncio.sleep(MIN_INTERVAL)

    async def _close(self) -> None:
        if self._connection is not None:
            await discard_connection(self._connection)
        self._connection = self._driver = None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._close()


async def listen_for_stored_events(engine: AsyncEngine, wake: Callable[[], None]) -> None:
    """Call `wake` whenever a web process notifies; runs until cancelled."""
    while True:
        try:
            await _listen_until_lost(engine, wake)
            log.warning("stripe_event.listener_lost")
        except Exception as exc:
            log.warning("stripe_event.listen_failed", error_type=type(exc).__name__)
        await asyncio.sleep(RECONNECT_AFTER)


async def _listen_until_lost(engine: AsyncEngine, wake: Callable[[], None]) -> None:
    connection, driver = await autocommit_driver(engine)
    try:
        lost = asyncio.Event()
        driver.add_termination_listener(lambda _connection: lost.set())
        await driver.add_listener(CHANNEL, lambda *_notification: wake())
        wake()  # what was stored while nobody listened
        await lost.wait()
    finally:
        await discard_connection(connection)
