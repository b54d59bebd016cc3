"""`Idempotency-Key` for POSTs that create something.

A key is scoped to (token `sub`, account, method, path) and kept at least 24 hours:

- the first request claims the key in its own committed transaction (unique constraint decides
  races), runs, and stores its response in the request's transaction, so the response and what
  it created commit together;
- the same key and body later replay the stored status and body;
- the same key with another body is 409 `idempotency_key_reused`;
- a request arriving while the first one still runs (a double click) waits for it up to
  `IDEMPOTENCY_WAIT_SECONDS` and replays its response, else 409 `idempotency_key_in_use` with
  `Retry-After`;
- a request that fails with an error releases the key, so the client may retry with it
  (errors are not replayed; a retry re-evaluates, e.g. after Stripe recovers);
- a claim older than `ABANDONED_AFTER` without a response (its process died) is taken over;
  a record older than `RETENTION` is treated as absent.

Keys sent to Stripe never come from here: they derive from our own row ids.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.auth import Principal
from app.errors import IdempotencyKeyInUse, IdempotencyKeyReused, Unprocessable
from app.models import IdempotencyRecord

RETENTION = timedelta(hours=24)
ABANDONED_AFTER = timedelta(seconds=120)
POLL_SECONDS = 0.05
MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class Outcome:
    """What a creating operation answers."""

    status: int
    body: BaseModel


def request_hash(body: BaseModel | None) -> str:
    payload = body.model_dump(mode="json") if body is not None else None
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def idempotent(
    request: Request,
    session: AsyncSession,
    principal: Principal,
    account_id: str,
    key: str | None,
    body: BaseModel | None,
    operation: Callable[[], Awaitable[Outcome]],
) -> JSONResponse:
    """Run `operation` once per Idempotency-Key (see module docstring)."""
    if key is None:
        outcome = await operation()
        return JSONResponse(outcome.body.model_dump(mode="json"), status_code=outcome.status)
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise Unprocessable(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters")
    factory: async_sessionmaker[AsyncSession] = request.app.state.session_factory
    wait_seconds: float = request.app.state.settings.idempotency_wait_seconds
    scope = {
        "principal_sub": principal.sub,
        "account_id": account_id,
        "method": request.method,
        "path": request.url.path,
        "key": key,
    }
    digest = request_hash(body)
    record_id, replay = await _claim(request.app.state.engine, factory, scope, digest, wait_seconds)
    if replay is not None:
        return replay
    try:
        outcome = await operation()
    except BaseException:
        async with factory() as release, release.begin():
            await release.execute(
                delete(IdempotencyRecord).where(
                    IdempotencyRecord.id == record_id,
                    IdempotencyRecord.response_status.is_(None),
                )
            )
        raise
    content = outcome.body.model_dump(mode="json")
    await session.execute(
        update(IdempotencyRecord)
        .where(IdempotencyRecord.id == record_id)
        .values(response_status=outcome.status, response_body=content)
    )
    return JSONResponse(content, status_code=outcome.status)


async def _claim(
    engine: AsyncEngine,
    factory: async_sessionmaker[AsyncSession],
    scope: dict[str, str],
    digest: str,
    wait_seconds: float,
) -> tuple[int, JSONResponse | None]:
    """Claim the key (returns its record id) or find the response to replay. The usual case,
    a new key, is one autocommit `INSERT ... ON CONFLICT DO NOTHING RETURNING` (committed on
    its own, no BEGIN/COMMIT round trips); a key already present is examined under a lock."""
    claim = (
        insert(IdempotencyRecord)
        .values(**scope, request_hash=digest)
        .on_conflict_do_nothing()
        .returning(IdempotencyRecord.id)
    )
    async with engine.connect() as connection:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        claimed = await connection.scalar(claim)
    if claimed is not None:
        return claimed, None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    while True:
        async with factory() as session, session.begin():
            record_id = await session.scalar(claim)
            if record_id is not None:
                return record_id, None
            record = await session.scalar(
                select(IdempotencyRecord)
                .where(*[getattr(IdempotencyRecord, k) == v for k, v in scope.items()])
                .with_for_update()
            )
            if record is None:
                continue  # deleted (released) between our insert and select: try again
            now = await session.scalar(select(func.now()))
            assert now is not None
            age = now - record.created_at
            expired = age > RETENTION
            abandoned = record.response_status is None and age > ABANDONED_AFTER
            if expired or abandoned:
                record.request_hash = digest
                record.response_status = None
                record.response_body = None
                record.created_at = now
                return record.id, None
            if record.request_hash != digest:
                raise IdempotencyKeyReused(
                    "This Idempotency-Key was used with another request body"
                )
            if record.response_status is not None:
                return record.id, _replay(record.response_status, record.response_body)
        if loop.time() >= deadline:
            raise IdempotencyKeyInUse(
                "A request with this Idempotency-Key is still in progress; retry shortly",
                headers={"Retry-After": "1"},
            )
        await asyncio.sleep(POLL_SECONDS)


def _replay(status: int, body: dict[str, Any] | None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers={"Idempotent-Replayed": "true"})
