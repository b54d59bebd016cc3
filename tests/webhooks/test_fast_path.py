"""`POST /webhooks/stripe` is served by `WebhookFastPath` ahead of FastAPI's layers; it must
answer exactly what the documented route answers, with the request id, body limit and metrics
every other route gets."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
from fastapi import FastAPI
from prometheus_client import REGISTRY
from sqlalchemy import text

from app.webhooks.router import WebhookFastPath
from tests.webhooks.test_ingestion import event, signed, stored_count


async def answers(client: httpx.AsyncClient, event_id: str) -> list[tuple[Any, ...]]:
    body = orjson.dumps(event(event_id))
    invalid = orjson.dumps(event(event_id + "_bad", livemode=True))
    requests: list[tuple[bytes, dict[str, str]]] = [
        (body, signed(body)),  # new
        (body, signed(body)),  # duplicate
        (body, {"Stripe-Signature": "t=1,v1=00"}),  # stale signature
        (body, {}),  # no signature
        (invalid, signed(invalid)),  # livemode mismatch
        (b"x" * (1024 * 1024 + 1), {}),  # over the body limit
    ]
    seen = []
    for content, headers in requests:
        response = await client.post(
            "/webhooks/stripe", content=content, headers={**headers, "X-Request-Id": "req-7"}
        )
        seen.append(
            (
                response.status_code,
                response.headers["content-type"],
                response.headers["x-request-id"],
                response.json(),
            )
        )
    return seen


async def test_the_fast_path_answers_exactly_as_the_documented_route(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    fast = await answers(client, "evt_fast_path")
    fast_path = app.webhook  # type: ignore[attr-defined]
    assert isinstance(fast_path, WebhookFastPath)
    app.webhook = None  # type: ignore[attr-defined]  # FastAPI's routing, the route itself
    try:
        routed = await answers(client, "evt_fast_path_routed")
    finally:
        app.webhook = fast_path  # type: ignore[attr-defined]
    assert fast == routed
    assert [status for status, *_ in fast] == [200, 200, 400, 400, 400, 413]
    assert [answer for *_, answer in fast[:2]] == [
        {"received": True, "duplicate": False},
        {"received": True, "duplicate": True},
    ]
    assert await stored_count(app) == 2


async def test_fast_path_requests_are_counted_under_the_route(
    client: httpx.AsyncClient,
) -> None:
    def count(status: str) -> float:
        labels = {"method": "POST", "route": "/webhooks/stripe", "status": status}
        return REGISTRY.get_sample_value("billing_http_requests_total", labels) or 0.0

    before = count("200"), count("400")
    body = orjson.dumps(event("evt_counted"))
    assert (await client.post("/webhooks/stripe", content=body, headers=signed(body))).is_success
    refused = await client.post("/webhooks/stripe", content=body)
    assert refused.status_code == 400
    assert (count("200"), count("400")) == (before[0] + 1, before[1] + 1)
    assert refused.headers["x-request-id"]


async def test_payloads_large_enough_to_compress_are_stored_lz4_compressed(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    big = event("evt_big", description="x" * 8000)
    body = orjson.dumps(big)
    assert (await client.post("/webhooks/stripe", content=body, headers=signed(body))).is_success
    async with app.state.session_factory() as session:
        method = await session.scalar(
            text("SELECT pg_column_compression(payload) FROM stripe_events WHERE stripe_id = :id"),
            {"id": "evt_big"},
        )
        payload = await session.scalar(
            text("SELECT payload FROM stripe_events WHERE stripe_id = :id"), {"id": "evt_big"}
        )
    assert method == "lz4"
    assert payload == big
