"""Events applied by group (`GROUP_HANDLERS`) end where applying them one per transaction
does: the lifecycle in order, as one batch against one event per batch."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI

from app.config import Settings
from app.webhooks.processor import EventProcessor
from tests.stripe_fake import StripeFake
from tests.webhooks.lifecycle import Baseline, run_lifecycle, snapshot
from tests.webhooks.test_lifecycle import deliver_stream, differences


async def test_one_batch_ends_where_one_event_per_transaction_ends(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    settings: Settings,
    database_url: str,
) -> None:
    life = await run_lifecycle(app, stripe_fake)
    saved = Baseline(database_url)
    await saved.capture()
    state: dict[int, dict[str, Any]] = {}
    for batch_size in (1, 100):  # every event its own group of one; then all in one batch
        await saved.restore()
        await deliver_stream(client, stripe_fake, life.events, concurrent=False)
        processor = EventProcessor(
            app.state.session_factory, settings, app.state.stripe, batch_size=batch_size
        )
        await processor.drain()
        state[batch_size] = await snapshot(app)
    assert state[100] == state[1], differences(state[100], state[1])
