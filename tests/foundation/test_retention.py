"""What the service keeps and for how long (README "Retention"): `billing prune-events`, which
the background workers also run hourly, drops what has outlived its use."""

from __future__ import annotations

import os
import subprocess
import sys

import asyncpg
import httpx

from app.config import Settings
from tests.conftest import ROOT, TokenFactory, bearer, plain_dsn


def prune_events(settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "prune-events"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": settings.database_url, "APP_ENV": "development"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_prune_events_drops_idempotency_keys_past_their_24_hours(
    settings: Settings, client: httpx.AsyncClient, token: TokenFactory
) -> None:
    """Every keyed POST (each usage charge the conversation service reports, say) stores its
    key and answer; a key is replayed for 24 hours and then treated as absent, so a record
    past that is dead weight and goes. A younger key still replays."""
    service = bearer(token(scope="usage:write", sub="conversation-service"))
    url = "/v1/accounts/acc_keys/usage-charges"
    body = {"amount": 300, "currency": "usd", "kind": "conversation"}
    at = "2026-11-01T10:00:00Z"
    for key in ("day-old", "fresh"):
        answer = await client.post(
            url,
            json={**body, "id": key, "occurred_at": at},
            headers={**service, "Idempotency-Key": key},
        )
        assert answer.status_code == 201, answer.text
    conn = await asyncpg.connect(plain_dsn(settings.database_url))
    try:
        await conn.execute(
            "UPDATE idempotency_records SET created_at = now() - interval '25 hours'"
            " WHERE key = 'day-old'"
        )
        pruned = prune_events(settings)
        assert pruned.returncode == 0, pruned.stderr
        kept = await conn.fetch("SELECT key FROM idempotency_records ORDER BY key")
    finally:
        await conn.close()
    assert [row["key"] for row in kept] == ["fresh"]

    replay = await client.post(
        url,
        json={**body, "id": "fresh", "occurred_at": at},
        headers={**service, "Idempotency-Key": "fresh"},
    )
    assert replay.status_code == 201, replay.text
    assert replay.headers.get("Idempotent-Replayed") == "true"
