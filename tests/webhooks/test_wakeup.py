"""A processor in another process (`billing process-events`) is woken by the web process's
`NOTIFY` when events are stored, instead of finding them at its next poll; and it keeps being
woken after its listening connection is lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from app.config import Settings
from app.models import StripeEvent
from app.webhooks.processor import EventProcessor
from app.webhooks.wakeup import CHANNEL, RECONNECT_AFTER, listen_for_stored_events
from tests.conftest import Deliver, plain_dsn
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import add_catalog, open_checkout

POLL_SECONDS = 60.0  # a processor that only polled would find nothing within the test


@pytest.fixture
async def processor_elsewhere(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    """What `billing process-events` runs: the processor and its listener (own connections)."""
    processor = EventProcessor(
        app.state.session_factory, settings, app.state.stripe, poll_seconds=POLL_SECONDS
    )
    tasks = [
        asyncio.create_task(processor.run_forever()),
        asyncio.create_task(listen_for_stored_events(app.state.engine, processor.notify)),
    ]
    await _listening(settings)
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _backends(settings: Settings, query: str) -> list[Any]:
    conn = await asyncpg.connect(plain_dsn(settings.database_url))
    try:
        return list(
            await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND query = $1",
                query,
            )
        )
    finally:
        await conn.close()


async def _listening(settings: Settings) -> None:
    for _ in range(100):
        if await _backends(settings, f'LISTEN "{CHANNEL}"'):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the processor never listened")


async def _subscription_events(app: FastAPI, fake: StripeFake, account: str) -> list[Any]:
    add_catalog(fake)
    session_id = await open_checkout(
        app, account_id=account, purpose="subscription", channel_id=f"chan_{account}"
    )
    start = len(fake.events)
    fake.complete_checkout(session_id)
    return [dict(e) for e in fake.events[start:] if e["type"].startswith("customer.subscription")]


async def _applied_soon(app: FastAPI, events: list[Any], seconds: float = 5.0) -> bool:
    ids = [event["id"] for event in events]
    for _ in range(int(seconds / 0.05)):
        async with app.state.session_factory() as session:
            statuses = (
                await session.scalars(
                    select(StripeEvent.status).where(StripeEvent.stripe_id.in_(ids))
                )
            ).all()
        if len(statuses) == len(ids) and set(statuses) == {"processed"}:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_stored_events_wake_a_processor_in_another_process(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver, processor_elsewhere: None
) -> None:
    events = await _subscription_events(app, stripe_fake, "acc_woken")
    await deliver(events, process=False)  # only stored: nothing here applies them
    assert await _applied_soon(app, events)  # long before the processor's next poll


async def test_the_processor_is_woken_again_after_its_listening_connection_is_lost(
    app: FastAPI,
    settings: Settings,
    stripe_fake: StripeFake,
    deliver: Deliver,
    processor_elsewhere: None,
) -> None:
    [listener] = await _backends(settings, f'LISTEN "{CHANNEL}"')
    conn = await asyncpg.connect(plain_dsn(settings.database_url))
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", listener["pid"])
    finally:
        await conn.close()
    await asyncio.sleep(RECONNECT_AFTER)
    await _listening(settings)
    events = await _subscription_events(app, stripe_fake, "acc_rewoken")
    await deliver(events, process=False)
    assert await _applied_soon(app, events)
