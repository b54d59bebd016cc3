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
  (errors are not replayed; a retry re-evaluates, e.g. after Stripe recovers), also one whose
  final commit fails (`idempotent` commits the request's session itself, inside the guard);
- a claim older than `ABANDONED_AFTER` without a response (its process died) is taken over;
  a record older than `RETENTION` is treated as absent, and `prune_expired_keys` (hourly in
  the background workers, and `billing prune-events`) deletes it.

Keys sent to Stripe never come from here: they derive from our own row ids.

`idempotent_claiming_in` is the same contract with the claim made inside the operation's own
first transaction (`await claim(conn)` as its first statement, on a `driver_transaction`) instead of a transaction of its
own: one statement, no extra commit, and a refusal in that transaction (a 4xx) rolls the claim
back with everything else, so nothing needs releasing. A key already present makes `claim`
raise `KeyHeld`; the operation's transaction rolls back and the request takes the usual path
(wait, replay, 409, or take over), then runs the operation again with the key held. The
operation may also store its answer in its own final transaction (`Claim.answer`), or in the
very statement that records what it created (`Claim.answer_params` gives `STORE_ANSWER`'s
parameters), so the response commits with what it created without a transaction of the
request session.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy import Table, bindparam, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.auth import Principal
from app.db import DriverStatement
from app.errors import IdempotencyKeyInUse, IdempotencyKeyReused, Unprocessable
from app.models import IdempotencyRecord

RETENTION = timedelta(hours=24)
PRUNE_BATCH = 10_000
ABANDONED_AFTER = timedelta(seconds=120)
POLL_SECONDS = 0.05
MAX_KEY_LENGTH = 255


class KeyHeld(Exception):
    """Raised by `Claim` when the key already has a record (see module docstring)."""


class Claim:
    """Claims the request's Idempotency-Key in the transaction it is given; a no-op when the
    request has no key or the key is already held by this request."""

    def __init__(self, values: dict[str, str] | None = None) -> None:
        self._values = values
        self.record_id: int | None = None
        self.answered: tuple[int, bytes] | None = None
        self._given: tuple[int, bytes] | None = None

    async def __call__(self, conn: Any) -> None:
        """Claim on `conn`, the asyncpg connection of the caller's `driver_transaction`."""
        if self._values is None or self.record_id is not None:
            return
        record_id: int | None = await _CLAIM_SQL.fetchval(conn, **self._values)
        if record_id is None:
            raise KeyHeld
        self.record_id = record_id

    async def answer(self, conn: Any, status: int, body: BaseModel) -> None:
        """Store the response under the key in the operation's final transaction on `conn`
        (so it commits with what it created); the request then answers with it."""
        stored = self.answer_params(status, body)
        if self.record_id is not None:
            await STORE_ANSWER_SQL.execute(conn, **stored)
        self.answered_as_given()

    def answer_params(self, status: int, body: BaseModel) -> dict[str, Any]:
        """The parameters of `STORE_ANSWER` (`record_id`, `status`, `body`) for this answer,
        for an operation that stores it in a statement of its own (with what it creates);
        `answered_as_given` once that statement has stored it."""
        rendered = orjson.dumps(body.model_dump(mode="json"))
        self._given = (status, rendered)
        return {"record_id": self.record_id, "status": status, "body": rendered.decode()}

    def answered_as_given(self) -> None:
        self.answered = self._given

    @property
    def request_digest(self) -> str | None:
        """The request under its key (scope and body hash), for an operation to mark what it
        leaves for a retry of the same request to reuse (a key released after an error is
        claimed again by that retry); None without a key."""
        return None if self._values is None else _digest(self._values)


@dataclass(frozen=True)
class Outcome:
    """What a creating operation answers."""

    status: int
    body: BaseModel


def request_hash(body: BaseModel | None) -> str:
    return _digest(body.model_dump(mode="json") if body is not None else None)


def _digest(payload: Any) -> str:
    """SHA-256 of `payload` as canonical JSON (sorted keys, no spaces)."""
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
    scope = _scope(request, principal, account_id, key)
    factory: async_sessionmaker[AsyncSession] = request.app.state.session_factory
    wait_seconds: float = request.app.state.settings.idempotency_wait_seconds
    digest = request_hash(body)
    record_id, replay = await _claim(request.app.state.engine, factory, scope, digest, wait_seconds)
    if replay is not None:
        return replay
    try:
        outcome = await operation()
        response = await _store(session, record_id, outcome)
        # The request's one commit, made here and not by `get_session` after the route
        # returned: a commit that fails (its connection lost) is a failed request, whose key
        # is released like any other's, not held until `ABANDONED_AFTER`.
        await session.commit()
    except BaseException:
        await _release(factory, record_id)
        raise
    return response


async def idempotent_claiming_in(
    request: Request,
    principal: Principal,
    account_id: str,
    key: str | None,
    body: BaseModel | None,
    operation: Callable[[Claim], Awaitable[Outcome]],
) -> Response:
    """`idempotent`, with the key claimed by `operation` in its own first transaction
    (see module docstring); an operation that stored its answer (`Claim.answer`) in its final
    transaction is answered with it. One that created nothing and did not (it found what it
    would create already there) has its answer stored in a transaction of its own."""
    if key is None:
        claim = Claim()
        outcome = await operation(claim)
        return _answer(claim) or JSONResponse(
            outcome.body.model_dump(mode="json"), status_code=outcome.status
        )
    scope = _scope(request, principal, account_id, key)
    digest = request_hash(body)
    claim = Claim({**scope, "request_hash": digest})
    try:
        try:
            outcome = await operation(claim)
        except KeyHeld:
            factory: async_sessionmaker[AsyncSession] = request.app.state.session_factory
            wait_seconds: float = request.app.state.settings.idempotency_wait_seconds
            claim.record_id, replay = await _claim(
                request.app.state.engine, factory, scope, digest, wait_seconds
            )
            if replay is not None:
                return replay
            outcome = await operation(claim)
        assert claim.record_id is not None, "the operation must claim the key"
        if (answer := _answer(claim)) is not None:
            return answer
        # a store that fails (its commit lost) releases the key too, as the operation's errors
        async with request.app.state.session_factory() as session, session.begin():
            return await _store(session, claim.record_id, outcome)
    except BaseException:
        if claim.record_id is not None:  # a claim rolled back with its transaction deletes nothing
            await _release(request.app.state.session_factory, claim.record_id)
        raise


def _answer(claim: Claim) -> Response | None:
    if claim.answered is None:
        return None
    status, rendered = claim.answered
    return Response(rendered, status_code=status, media_type="application/json")


def _scope(request: Request, principal: Principal, account_id: str, key: str) -> dict[str, str]:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise Unprocessable(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters")
    return {
        "principal_sub": principal.sub,
        "account_id": account_id,
        "method": request.method,
        "path": request.url.path,
        "key": key,
    }


_RECORDS = cast(Table, IdempotencyRecord.__table__)
_SCOPE_COLUMNS = ("principal_sub", "account_id", "method", "path", "key")
_CLAIM = (
    insert(_RECORDS)
    .values({name: bindparam(name) for name in (*_SCOPE_COLUMNS, "request_hash")})
    .on_conflict_do_nothing()
    .returning(_RECORDS.c.id)
)
"""Claim a key: its record id, or nothing when the key already has a record."""
_CLAIM_SQL = DriverStatement(_CLAIM)
STORE_ANSWER = (
    update(_RECORDS)
    .where(_RECORDS.c.id == bindparam("record_id"))
    .values(response_status=bindparam("status"), response_body=bindparam("body"))
)
STORE_ANSWER_SQL = DriverStatement(STORE_ANSWER)
"""(`body` is JSON text: the jsonb codec SQLAlchemy installs on its connections takes text.)"""


async def _release(factory: async_sessionmaker[AsyncSession], record_id: int) -> None:
    async with factory() as release, release.begin():
        await release.execute(
            delete(IdempotencyRecord).where(
                IdempotencyRecord.id == record_id,
                IdempotencyRecord.response_status.is_(None),
            )
        )


async def _store(session: AsyncSession, record_id: int, outcome: Outcome) -> JSONResponse:
    """The response, stored in the request's transaction (it commits with what it created)."""
    content = outcome.body.model_dump(mode="json")
    await session.execute(
        STORE_ANSWER, {"record_id": record_id, "status": outcome.status, "body": content}
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
    values = {**scope, "request_hash": digest}
    async with engine.connect() as connection:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        claimed = await connection.scalar(_CLAIM, values)
    if claimed is not None:
        return claimed, None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    while True:
        async with factory() as session, session.begin():
            record_id = await session.scalar(_CLAIM, values)
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


async def prune_expired_keys(factory: async_sessionmaker[AsyncSession]) -> int:
    """Delete the records older than `RETENTION` (treated as absent anyway: every keyed POST,
    each usage charge say, would otherwise stay for good), `PRUNE_BATCH` per transaction in
    `created_at` order (its index); returns how many. A request taking over such a key at the
    same moment keeps it (the delete re-checks its age) or claims it anew after the delete."""
    pruned = 0
    while True:
        expired = (
            select(IdempotencyRecord.id)
            .where(IdempotencyRecord.created_at < func.now() - RETENTION)
            .order_by(IdempotencyRecord.created_at)
            .limit(PRUNE_BATCH)
            .scalar_subquery()
        )
        async with factory() as session, session.begin():
            result = await session.execute(
                delete(IdempotencyRecord).where(
                    IdempotencyRecord.id.in_(expired),
                    IdempotencyRecord.created_at < func.now() - RETENTION,
                )
            )
        deleted = int(result.rowcount or 0)  # type: ignore[attr-defined]
        pruned += deleted
        if deleted < PRUNE_BATCH:
            return pruned


def _replay(status: int, body: dict[str, Any] | None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers={"Idempotent-Replayed": "true"})
