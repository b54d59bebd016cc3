"""The database stops (immediate shutdown: a crash) in the middle of a stream of signed Stripe
events and comes back.

While it is down every route answers 503 `service_unavailable` (or what it answers without the
database), never a 500. While it is down the webhook answers 503 (never 500, never 2xx for an event it did not store)
and `/readyz` says not ready. After the restart, redelivering every event that was not
acknowledged (as Stripe does) leaves every event stored once and applied once: the mirror ends
exactly as after a clean in-order run. Runs on its own throwaway cluster, never the shared one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.auth import mint_token
from app.main import create_app
from tests.conftest import WEBHOOK_SECRET, alembic, bearer, make_settings, plain_dsn
from tests.robustness.cluster import ThrowawayCluster
from tests.robustness.routes import admitted_principal, routes
from tests.stripe_fake import StripeFake
from tests.webhooks.lifecycle import Baseline, run_lifecycle, snapshot


@pytest.fixture(scope="module")
def cluster() -> Iterator[ThrowawayCluster]:
    pg = ThrowawayCluster()
    try:
        pg.init()
        pg.start()
        result = alembic(pg.url, "upgrade", "head")
        assert result.returncode == 0, result.stderr
        yield pg
    finally:
        pg.destroy()


@pytest.fixture
async def outage_app(cluster: ThrowawayCluster, stripe_fake: StripeFake) -> AsyncIterator[FastAPI]:
    stripe_fake.reset()
    application = create_app(make_settings(cluster.url, stripe_fake.url))
    async with application.router.lifespan_context(application):
        yield application


async def post_event(client: httpx.AsyncClient, fake: StripeFake, event: dict[str, Any]) -> int:
    body, headers = fake.signed_event(event, WEBHOOK_SECRET)
    response = await client.post("/webhooks/stripe", content=body, headers=headers)
    if response.status_code != 200:
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "service_unavailable"
    return response.status_code


async def stored_events(url: str) -> list[tuple[str, str, int]]:
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        rows = await conn.fetch("SELECT stripe_id, status, attempts FROM stripe_events")
        return [(r["stripe_id"], r["status"], r["attempts"]) for r in rows]
    finally:
        await conn.close()


async def every_route_answers_without_a_server_error(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """With the database down, each route (called by a caller it admits) answers 503
    `service_unavailable` or what it answers without the database, never a 500."""
    settings = app.state.settings
    unavailable = 0
    for route in routes(app):
        claims = admitted_principal(route)
        headers = bearer(mint_token(settings, sub="outage", **claims)) if claims else {}
        kwargs: dict[str, Any] = {"json": {}} if route.has_body else {}
        response = await client.request(route.method, route.path(), headers=headers, **kwargs)
        assert response.status_code != 500, f"{route}: {response.text}"
        assert str(response.status_code) in route.documented_statuses, f"{route}: {response.text}"
        if response.status_code == 503:
            assert response.json()["code"] == "service_unavailable"
            unavailable += 1
    assert unavailable >= 5


async def test_a_database_crash_mid_stream_loses_and_doubles_nothing(
    cluster: ThrowawayCluster, outage_app: FastAPI, stripe_fake: StripeFake
) -> None:
    app = outage_app
    life = await run_lifecycle(app, stripe_fake)
    events = life.events
    assert len(events) >= 20
    baseline = Baseline(cluster.url)
    await baseline.capture()

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://billing.test") as client:
        # The reference: every event once, in order, with the database up.
        for event in events:
            assert await post_event(client, stripe_fake, event) == 200
        await app.state.event_processor.drain()
        expected = await snapshot(app)
        await baseline.restore()

        # The first third arrives and is applied; the rest streams in concurrently while the
        # database crashes after a few of them have been answered.
        first, rest = events[: len(events) // 3], events[len(events) // 3 :]
        for event in first:
            assert await post_event(client, stripe_fake, event) == 200
        await app.state.event_processor.drain()

        answered: dict[str, int] = {}
        gate = asyncio.Semaphore(3)
        crash_after = 3
        crashed, stopped = asyncio.Event(), asyncio.Event()

        async def deliver(event: dict[str, Any]) -> None:
            async with gate:
                if len(answered) >= crash_after:
                    # those already in flight race the crash; the rest arrive once it is down
                    await stopped.wait()
                answered[event["id"]] = await post_event(client, stripe_fake, event)
                if len(answered) == crash_after:
                    crashed.set()

        async def crash() -> None:
            await crashed.wait()
            await asyncio.to_thread(cluster.stop, "immediate")
            stopped.set()

        await asyncio.gather(crash(), *(deliver(event) for event in rest))
        assert set(answered.values()) <= {200, 503}
        assert list(answered.values())[:crash_after] == [200] * crash_after
        assert 503 in answered.values()  # the crash happened mid-stream

        # Down: not ready, and new deliveries are refused with 503.
        ready = await client.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["code"] == "service_unavailable"
        assert await post_event(client, stripe_fake, rest[-1]) == 503
        await every_route_answers_without_a_server_error(app, client)

        await asyncio.to_thread(cluster.start)
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text

        # Stripe redelivers whatever was not acknowledged.
        for event in rest:
            if answered[event["id"]] != 200:
                assert await post_event(client, stripe_fake, event) == 200
        await app.state.event_processor.drain()

    stored = await stored_events(cluster.url)
    assert sorted(stripe_id for stripe_id, _, _ in stored) == sorted(e["id"] for e in events)
    assert {status for _, status, _ in stored} <= {"processed", "ignored"}
    assert max(attempts for _, _, attempts in stored) == 1  # each applied once, none failed
    assert await snapshot(app) == expected
