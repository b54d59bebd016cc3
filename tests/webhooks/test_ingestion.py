"""POST /webhooks/stripe: signatures, envelopes, durable storage once, acknowledgements."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from app.models import LedgerEntry, StripeEvent
from tests.conftest import WEBHOOK_SECRET, plain_dsn
from tests.foundation.test_auth import assert_problem
from tests.stripe_fake import StripeFake, sign
from tests.webhooks.flows import add_catalog, open_checkout


def event(
    event_id: str = "evt_test_1", type_: str = "customer.created", **extra: Any
) -> dict[str, Any]:
    envelope: dict[str, Any] = {
        "id": event_id,
        "object": "event",
        "api_version": "2026-05-27.dahlia",
        "created": int(time.time()),
        "livemode": False,
        "type": type_,
        "data": {"object": {"id": "cus_test_1", "object": "customer"}},
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
    }
    envelope.update(extra)
    return envelope


def signed(
    body: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None
) -> dict[str, str]:
    """Stripe's scheme over raw bytes (the fake's `sign` agrees for UTF-8 bodies)."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    if body.isascii():
        assert sign(body, secret, t) == f"t={t},v1={mac}"
    return {"Stripe-Signature": f"t={t},v1={mac}", "Content-Type": "application/json"}


async def stored_count(app: FastAPI) -> int:
    async with app.state.session_factory() as session:
        return int(await session.scalar(select(func.count()).select_from(StripeEvent)) or 0)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Stripe-Signature": "garbage"},
        {"Stripe-Signature": "t=abc,v1=00"},
        {"Stripe-Signature": f"t={int(time.time())}"},
        {"Stripe-Signature": f"t={int(time.time())},v1=" + "0" * 64},
    ],
    ids=["missing", "malformed", "bad-timestamp", "no-v1", "wrong-hmac"],
)
async def test_bad_signatures_are_400_and_store_nothing(
    app: FastAPI, client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await client.post("/webhooks/stripe", content=orjson.dumps(event()), headers=headers)
    assert_problem(response, 400, "invalid_webhook")
    assert await stored_count(app) == 0


async def test_signature_with_another_secret_is_refused(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    body = orjson.dumps(event())
    response = await client.post(
        "/webhooks/stripe", content=body, headers=signed(body, "whsec_other")
    )
    assert_problem(response, 400, "invalid_webhook")
    assert await stored_count(app) == 0


async def test_stale_signature_is_refused(app: FastAPI, client: httpx.AsyncClient) -> None:
    body = orjson.dumps(event())
    stale = signed(body, timestamp=int(time.time()) - 301)
    response = await client.post("/webhooks/stripe", content=body, headers=stale)
    assert_problem(response, 400, "invalid_webhook")
    assert "stale" in response.json()["detail"]
    assert await stored_count(app) == 0


async def test_every_configured_secret_is_tried_for_rotation(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    app.state.webhook_secrets = [b"whsec_new_secret", WEBHOOK_SECRET.encode()]
    body = orjson.dumps(event("evt_rotated"))
    old = await client.post("/webhooks/stripe", content=body, headers=signed(body))
    assert old.status_code == 200
    body2 = orjson.dumps(event("evt_rotated_2"))
    new = await client.post(
        "/webhooks/stripe", content=body2, headers=signed(body2, "whsec_new_secret")
    )
    assert new.status_code == 200
    assert await stored_count(app) == 2


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"not json at all", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[1, 2]", "not a Stripe event"),
        (orjson.dumps(event(event_id="nope")), "event id"),
        (orjson.dumps(event(created="yesterday")), "created"),
        (orjson.dumps(event(data={})), "data.object"),
        (orjson.dumps(event(livemode=True)), "livemode"),
        (orjson.dumps(event(account="acct_123")), "Connect"),
        (orjson.dumps(event(created=10**12)), "created"),  # beyond year 9999
        (orjson.dumps(event(created=10**17)), "created"),  # beyond the platform's time_t
        (orjson.dumps(event(created=2**62)), "created"),
        (orjson.dumps(event(type_="customer.\x00created")), "event type"),
        (orjson.dumps(event(api_version="2026-05-27." + "x" * 100)), "api_version"),
        (orjson.dumps(event(data={"object": {"id": "cus_" + "x" * 300}})), "data.object.id"),
    ],
    ids=[
        "text",
        "binary",
        "array",
        "bad-id",
        "bad-created",
        "no-object",
        "livemode",
        "connect",
        "created-year-10000",
        "created-beyond-time_t",
        "created-overflow",
        "nul-in-type",
        "long-api-version",
        "long-object-id",
    ],
)
async def test_signed_but_invalid_payloads_are_400(
    app: FastAPI, client: httpx.AsyncClient, body: bytes, detail: str
) -> None:
    response = await client.post("/webhooks/stripe", content=body, headers=signed(body))
    assert_problem(response, 400, "invalid_webhook")
    assert detail in response.json()["detail"]
    assert await stored_count(app) == 0


async def test_unknown_event_types_are_stored_and_acknowledged(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    body = orjson.dumps(event("evt_unknown", "issuing_card.created"))
    response = await client.post("/webhooks/stripe", content=body, headers=signed(body))
    assert response.status_code == 200
    assert response.json() == {"received": True, "duplicate": False}
    async with app.state.session_factory() as session:
        row = await session.scalar(
            select(StripeEvent).where(StripeEvent.stripe_id == "evt_unknown")
        )
    assert row is not None
    assert row.status == "ignored"
    assert row.payload is not None
    assert row.payload["type"] == "issuing_card.created"


async def test_the_same_event_20_times_at_once_is_stored_once_with_one_effect(
    app: FastAPI, client: httpx.AsyncClient, stripe_fake: StripeFake
) -> None:
    add_catalog(stripe_fake)
    session_id = await open_checkout(app, account_id="acc_20", purpose="top_up", amount=2500)
    completed = next(
        e
        for e in stripe_fake.complete_checkout(session_id)
        if e["type"] == "checkout.session.completed"
    )
    body, headers = stripe_fake.signed_event(completed, WEBHOOK_SECRET)
    responses = await asyncio.gather(
        *(client.post("/webhooks/stripe", content=body, headers=headers) for _ in range(20))
    )
    assert [r.status_code for r in responses] == [200] * 20
    assert sum(not r.json()["duplicate"] for r in responses) == 1
    assert await stored_count(app) == 1
    processors = [app.state.event_processor] * 3
    await asyncio.gather(*(p.drain() for p in processors))
    async with app.state.session_factory() as session:
        entries = (await session.scalars(select(LedgerEntry))).all()
    assert [(e.kind, e.amount, e.source_id) for e in entries] == [("top_up", 2500, session_id)]


async def test_database_unavailable_answers_503_and_redelivery_succeeds(
    app: FastAPI, client: httpx.AsyncClient, database_url: str
) -> None:
    name = database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(plain_dsn(database_url.rsplit("/", 1)[0] + "/postgres"))
    body = orjson.dumps(event("evt_during_outage"))
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        during = await client.post("/webhooks/stripe", content=body, headers=signed(body))
        assert_problem(during, 503, "service_unavailable")
        ready = await client.get("/readyz")
        assert ready.status_code == 503
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
    after = await client.post("/webhooks/stripe", content=body, headers=signed(body))
    assert after.status_code == 200
    assert after.json() == {"received": True, "duplicate": False}
    assert await stored_count(app) == 1
