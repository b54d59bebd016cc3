"""The reference webhook endpoint: the least any consumer that stores events must do.

A bare ASGI app on the same stack as the service (uvicorn, asyncpg, the same Postgres and pool
size): it reads the body and runs one `INSERT ... ON CONFLICT DO NOTHING` of it per request (its
own transaction and commit), then answers 200. No verification, no parsing in Python, no
batching. Run: `uvicorn bench.reference:app` with `DATABASE_URL` (and `DATABASE_POOL_SIZE`).
"""

from __future__ import annotations

import os
from typing import Any

import asyncpg

TABLE_DDL = """
CREATE TABLE IF NOT EXISTS bench_reference_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stripe_id varchar(255) NOT NULL UNIQUE,
    payload jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
)
"""
INSERT = (
    "INSERT INTO bench_reference_events (stripe_id, payload) "
    "SELECT $1::jsonb ->> 'id', $1::jsonb ON CONFLICT (stripe_id) DO NOTHING"
)
ACK = b'{"received":true}'

_pool: asyncpg.Pool | None = None


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _pool
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                size = int(os.environ.get("DATABASE_POOL_SIZE", "10"))
                dsn = os.environ["DATABASE_URL"].replace("postgresql+asyncpg://", "postgresql://")
                _pool = await asyncpg.create_pool(dsn, min_size=size, max_size=2 * size)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if _pool is not None:
                    await _pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    assert _pool is not None
    await _pool.execute(INSERT, b"".join(chunks).decode())
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": ACK})
