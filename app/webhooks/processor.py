"""Applying stored Stripe events: exactly once, in any order, on any replica.

- Claiming: a worker leases a batch of due `pending` events (`FOR UPDATE SKIP LOCKED`, lease in
  `next_attempt_at`), so replicas never take the same event and a crashed worker's lease runs out.
- Applying: each event in its own transaction that re-locks the event row, takes a Postgres
  advisory lock on the Stripe object the event is about (so two replicas never interleave on one
  subscription), applies the handler, and marks the event `processed` in the same commit: the
  effect and the "done" mark cannot be separated. These commits use `synchronous_commit=off`:
  the event itself was stored durably before it was acknowledged, and re-applying an event whose
  commit was lost in a crash is harmless because every handler is idempotent.
- Failures: the handler's work is rolled back (savepoint), the attempt is counted and retried
  with exponential backoff; after `MAX_ATTEMPTS` the event is parked as `failed`, listed by
  `GET /v1/ops/stripe-events?status=failed` and replayable.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.models import StripeEvent
from app.stripe_gateway import StripeGateway
from app.webhooks import metrics
from app.webhooks.handlers import EventContext, apply_event, lock_key

log = structlog.get_logger()

MAX_ATTEMPTS = 8
LEASE_SECONDS = 60
BACKOFF_CAP_SECONDS = 3600


def backoff(attempts: int) -> timedelta:
    return timedelta(seconds=min(BACKOFF_CAP_SECONDS, 2 ** max(0, attempts - 1) * 5))


CONFLICT_RETRIES = 10
LOCK_CONFLICT_SQLSTATES = frozenset({"40P01", "40001", "55P03"})  # deadlock, serialization, lock


def is_lock_conflict(exc: BaseException) -> bool:
    """A deadlock or serialization failure reported by Postgres (SQLAlchemy keeps the
    driver's error, with its SQLSTATE, as `orig`)."""
    return getattr(getattr(exc, "orig", None), "sqlstate", None) in LOCK_CONFLICT_SQLSTATES


async def replay_event(session: AsyncSession, row: StripeEvent) -> None:
    row.status = "pending"
    row.attempts = 0
    row.next_attempt_at = None
    row.last_error = None
    await session.flush()


class EventProcessor:
    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        settings: Settings,
        stripe: StripeGateway,
        *,
        concurrency: int = 4,
        batch_size: int = 100,
        poll_seconds: float = 1.0,
    ) -> None:
        self._session_factory = session_factory
        self._settings = settings
        self._stripe = stripe
        self._concurrency = concurrency
        self._batch_size = batch_size
        self._poll_seconds = poll_seconds
        self._wakeup = asyncio.Event()

    def notify(self) -> None:
        self._wakeup.set()

    async def drain(self) -> int:
        """Apply every event that is due now; returns how many were attempted."""
        total = 0
        while True:
            done = await self.process_due()
            total += done
            if done == 0:
                return total

    async def run_forever(self) -> None:
        while True:
            try:
                done = await self.process_due()
            except Exception as exc:  # the database may be briefly unreachable
                log.warning("stripe_event.worker_error", error_type=type(exc).__name__)
                done = 0
            if done:
                continue
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self._poll_seconds)

    async def process_due(self) -> int:
        ids = await self._claim()
        if not ids:
            return 0
        semaphore = asyncio.Semaphore(self._concurrency)

        async def run(event_id: int) -> None:
            async with semaphore:
                await self.process_one(event_id)

        results = await asyncio.gather(*(run(event_id) for event_id in ids), return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                # the transaction itself failed (e.g. the database went away): the lease runs
                # out and the event is taken again; nothing was marked processed.
                log.warning(
                    "stripe_event.transaction_failed",
                    error_type=type(result).__name__,
                    sqlstate=getattr(getattr(result, "orig", None), "sqlstate", None),
                )
        return len(ids)

    async def _claim(self) -> list[int]:
        due = (
            select(StripeEvent.id)
            .where(
                StripeEvent.status == "pending",
                (StripeEvent.next_attempt_at.is_(None))
                | (StripeEvent.next_attempt_at <= func.now()),
            )
            .order_by(StripeEvent.id)
            .limit(self._batch_size)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        async with self._session_factory() as session, session.begin():
            result = await session.execute(
                update(StripeEvent)
                .where(StripeEvent.id.in_(due))
                .values(next_attempt_at=func.now() + timedelta(seconds=LEASE_SECONDS))
                .returning(StripeEvent.id)
            )
            return sorted(result.scalars().all())

    async def process_one(self, event_id: int) -> None:
        """Apply one event; a transaction Postgres aborted to keep the serializable order
        (or to break a deadlock) is simply run again, seeing what the other one committed."""
        for retry in range(CONFLICT_RETRIES + 1):
            try:
                await self._apply_in_transaction(event_id)
                return
            except DBAPIError as exc:
                if not is_lock_conflict(exc) or retry == CONFLICT_RETRIES:
                    raise
                metrics.CONFLICTS.inc()
                # let the transaction we collided with finish first
                await asyncio.sleep(random.uniform(0, 0.01 * 2**retry))  # noqa: S311 (jitter)

    async def _apply_in_transaction(self, event_id: int) -> None:
        async with self._session_factory() as session, session.begin():
            # SERIALIZABLE: handlers of different objects read what the other writes (a
            # dispute needs its payment and subscription, a payment looks for its disputes);
            # Postgres aborts one of two transactions that would each miss the other's
            # write, and the retry above sees it. Advisory locks keep same-object events in
            # order so such aborts stay rare.
            await session.execute(text("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
            await session.execute(text("SET LOCAL synchronous_commit = off"))
            row = await session.scalar(
                select(StripeEvent)
                .where(StripeEvent.id == event_id, StripeEvent.status == "pending")
                .with_for_update()
            )
            if row is None or row.payload is None:
                return
            payload: dict[str, Any] = row.payload
            await session.execute(
                select(func.pg_advisory_xact_lock(func.hashtextextended(lock_key(payload), 0)))
            )
            now = datetime.now(UTC)
            row.attempts += 1
            try:
                async with session.begin_nested():
                    await apply_event(
                        EventContext(session, self._settings, self._stripe, payload, now)
                    )
            except Exception as exc:
                if is_lock_conflict(exc):
                    raise  # abort the whole transaction; process_one runs it again
                self._record_failure(row, exc, now)
                return
            row.status = "processed"
            row.processed_at = now
            row.next_attempt_at = None
            row.last_error = None
            metrics.PROCESSED.labels(row.type).inc()
            metrics.LAG.observe(max(0.0, (now - row.received_at).total_seconds()))

    def _record_failure(self, row: StripeEvent, exc: Exception, now: datetime) -> None:
        metrics.FAILED.labels(row.type).inc()
        row.last_error = f"{type(exc).__name__}: {exc}"[:2000]
        if row.attempts >= MAX_ATTEMPTS:
            row.status = "failed"
            row.next_attempt_at = None
        else:
            row.next_attempt_at = now + backoff(row.attempts)
        log.warning(
            "stripe_event.failed",
            stripe_event_id=row.stripe_id,
            type=row.type,
            attempts=row.attempts,
            parked=row.status == "failed",
            error_type=type(exc).__name__,
        )


async def prune_payloads(session_factory: async_sessionmaker[AsyncSession], days: int) -> int:
    """Drop raw payloads of applied events older than `days`; the ids stay for dedup."""
    async with session_factory() as session, session.begin():
        result = await session.execute(
            update(StripeEvent)
            .where(
                StripeEvent.status.in_(("processed", "ignored")),
                StripeEvent.payload.is_not(None),
                StripeEvent.received_at < func.now() - timedelta(days=days),
            )
            .values(payload=None)
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
