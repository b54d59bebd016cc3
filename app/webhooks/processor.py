"""Applying stored Stripe events: exactly once, in any order, on any replica.

- Claiming: the transaction that applies a batch starts by locking up to `batch_size` due
  `pending` events (`FOR UPDATE SKIP LOCKED`, oldest first), so replicas never take the same
  event, and a worker that dies mid-batch holds nothing once Postgres ends its transaction
  (no lease to run out: the claim, the effects and the "done" marks are one commit).
- Applying: that transaction takes a Postgres advisory lock on each Stripe object the events
  are about (so two replicas never interleave on one subscription), applies the handlers (app/webhooks/handlers.py `apply_events`: one by
  one in the order the events were stored, then the one-way objects' events by group), and marks
  them `processed` in the same commit: the effects and the "done" marks cannot be separated.
  One transaction per batch instead of per event is what makes applying cheap (one BEGIN, lock
  and commit for up to `batch_size` events, `EVENT_BATCH_SIZE`, 1000 by default: with every
  event type applied by group, a batch of 1000 cost ~20% less CPU and Postgres time per event
  than one of 250, bench/README.md). The statements run straight on the transaction's
  asyncpg connection (app/db.py `session_driver`). These commits use `synchronous_commit=off`: the
  events were stored durably before they were acknowledged, and re-applying an event whose
  commit was lost in a crash is harmless because every handler is idempotent.
- Failures: if a batch fails, its events are applied again one per transaction (those another
  replica took meanwhile are skipped: it applies them); a failing
  handler's work is rolled back (savepoint), the attempt is counted and retried with
  exponential backoff; after `MAX_ATTEMPTS` the event is parked as `failed`, listed by
  `GET /v1/ops/stripe-events?status=failed` and replayable.
- Fees: Stripe's processing fees, which the events name but do not carry, are looked up
  after the events are applied, by `FeeLookups` (app/webhooks/fees.py) in a task beside the
  events' loop: started when no event is due, or once every `MAX_WAIT_SECONDS` while events
  keep coming. The same task then sends the Stripe cancellations lost chargebacks and approved
  refunds of subscription payments asked for (`DisputeCancels`, app/disputes/cancels.py;
  `RefundCancels`, app/refunds/cancels.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, cast

import asyncpg  # type: ignore[import-untyped]
import structlog
from sqlalchemy import (
    BigInteger,
    ColumnClause,
    Table,
    bindparam,
    func,
    literal_column,
    null,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.accounts.service import ensure_accounts
from app.config import Settings
from app.db import DriverStatement, session_driver
from app.disputes.cancels import DisputeCancels
from app.models import StripeEvent
from app.refunds.cancels import RefundCancels
from app.stripe_gateway import StripeGateway
from app.webhooks import metrics
from app.webhooks.fees import MAX_WAIT_SECONDS, FeeLookups
from app.webhooks.handlers import (
    EventContext,
    accounts_named,
    apply_event,
    apply_events,
    lock_key,
)

log = structlog.get_logger()

MAX_ATTEMPTS = 8
BACKOFF_CAP_SECONDS = 3600


def backoff(attempts: int) -> timedelta:
    return timedelta(seconds=min(BACKOFF_CAP_SECONDS, 2 ** max(0, attempts - 1) * 5))


CONFLICT_RETRIES = 10
ADVISORY_LOCKS = (
    "SELECT pg_advisory_xact_lock(hashtextextended(key, 0))"
    " FROM unnest($1::text[]) WITH ORDINALITY AS k(key, position) ORDER BY position"
)
LOCK_CONFLICT_SQLSTATES = frozenset({"40P01", "40001", "55P03"})  # deadlock, serialization, lock


_EVENT_COLUMNS = (StripeEvent.id, StripeEvent.type, StripeEvent.received_at, StripeEvent.payload)
PENDING: ColumnClause[str] = literal_column("'pending'")
"""In the SQL itself, not a parameter: a generic plan could not use the partial index."""
CLAIM_DUE = DriverStatement(
    select(*_EVENT_COLUMNS)
    .where(
        StripeEvent.status == PENDING,
        or_(StripeEvent.next_attempt_at.is_(None), StripeEvent.next_attempt_at <= func.now()),
    )
    .order_by(StripeEvent.id)
    .limit(bindparam("batch_size"))
    .with_for_update(skip_locked=True),
    named=True,
)
"""The oldest due events no other transaction holds (index `ix_stripe_events_pending`)."""
RELOCK = DriverStatement(
    select(*_EVENT_COLUMNS)
    .where(
        StripeEvent.id == func.any(bindparam("ids", type_=ARRAY(BigInteger))),
        StripeEvent.status == PENDING,
    )
    .order_by(StripeEvent.id)
    .with_for_update(skip_locked=True),
    named=True,
)
"""Events claimed before (a batch run again) that are still pending and not taken since."""
MARK_PROCESSED = DriverStatement(
    update(cast(Table, StripeEvent.__table__))
    .where(StripeEvent.id == func.any(bindparam("ids", type_=ARRAY(BigInteger))))
    .values(
        status="processed",
        attempts=StripeEvent.attempts + 1,
        processed_at=bindparam("now"),
        next_attempt_at=None,
        last_error=None,
    )
)


def is_lock_conflict(exc: BaseException) -> bool:
    """A deadlock or serialization failure reported by Postgres: raised by asyncpg itself
    (statements sent straight to the driver) or kept as `orig` by SQLAlchemy's error."""
    sqlstate = getattr(exc, "sqlstate", None) or getattr(
        getattr(exc, "orig", None), "sqlstate", None
    )
    return sqlstate in LOCK_CONFLICT_SQLSTATES


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
        batch_size: int | None = None,
        poll_seconds: float = 1.0,
    ) -> None:
        self._session_factory = session_factory
        self._settings = settings
        self._stripe = stripe
        self._batch_size = batch_size or settings.event_batch_size
        self._poll_seconds = poll_seconds
        self._wakeup = asyncio.Event()
        self._fees = FeeLookups(session_factory, stripe)
        self._dispute_cancels = DisputeCancels(session_factory, stripe)
        self._refund_cancels = RefundCancels(session_factory, stripe)

    def notify(self) -> None:
        self._wakeup.set()

    async def drain(self) -> int:
        """Apply every event that is due now, then the Stripe follow-ups (the fees they left
        unknown, the cancellations lost chargebacks and approved refunds asked for); returns
        how many events were attempted."""
        total = 0
        while done := await self.process_due():
            total += done
        await self._stripe_follow_ups()
        return total

    async def run_forever(self) -> None:
        """Apply due events as they come. The Stripe follow-ups run in a task of their own
        beside it, started when no event is due or once every `MAX_WAIT_SECONDS` while events
        keep coming, so a slow Stripe delays them only, never the events."""
        follow_ups: asyncio.Task[None] | None = None
        follow_ups_started_at = time.monotonic()
        try:
            while True:
                try:
                    done = await self.process_due()
                except Exception as exc:  # the database may be briefly unreachable
                    log.warning("stripe_event.worker_error", error_type=type(exc).__name__)
                    done = 0
                if (follow_ups is None or follow_ups.done()) and (
                    not done or time.monotonic() - follow_ups_started_at > MAX_WAIT_SECONDS
                ):
                    follow_ups = asyncio.create_task(self._stripe_follow_ups())
                    follow_ups_started_at = time.monotonic()
                if done:
                    continue
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=self._poll_seconds)
        finally:
            if follow_ups is not None:
                follow_ups.cancel()
                await asyncio.gather(follow_ups, return_exceptions=True)

    async def _stripe_follow_ups(self) -> None:
        """Rounds of fee look-ups until one finds nothing to do (none left, another replica's
        round, or the wait after a failure), then the Stripe cancellations lost chargebacks
        (app/disputes/cancels.py) and approved refunds (app/refunds/cancels.py) asked for, the
        same way."""
        follow_ups = (
            ("payment_fee.round_failed", self._fees.run),
            ("dispute.cancel_round_failed", self._dispute_cancels.run),
            ("refund.cancel_round_failed", self._refund_cancels.run),
        )
        for failure, run_round in follow_ups:
            try:
                while await run_round():
                    pass
            except Exception as exc:  # the database may be briefly unreachable
                log.warning(failure, error_type=type(exc).__name__)

    async def process_due(self) -> int:
        """Claim a batch of due events and apply it in one transaction; if that fails (a
        handler raised, or conflicts went on), apply the batch's events one by one, so a bad
        event is retried and parked alone and the others go through. Returns how many events
        were claimed."""
        claimed: list[int] = []  # by the first attempt; retries and the fallback take these
        await self._apply_claimed(claimed)
        return len(claimed)

    async def _apply_claimed(self, claimed: list[int]) -> None:
        """The batch in one transaction, or else its events one per transaction."""
        try:
            await self._with_conflict_retries(partial(self._apply_batch, claimed))
            return
        except Exception as exc:
            if not claimed:
                raise  # nothing was claimed (e.g. the database is unreachable)
            log.info(
                "stripe_event.batch_fallback",
                events=len(claimed),
                error_type=type(exc).__name__,
            )
        for event_id in claimed:
            try:
                await self._with_conflict_retries(partial(self._apply_one, event_id))
            except Exception as exc:
                # the transaction itself failed (e.g. the database went away): nothing was
                # marked processed, and the events are claimed again by the next batch.
                log.warning(
                    "stripe_event.transaction_failed",
                    error_type=type(exc).__name__,
                    sqlstate=getattr(getattr(exc, "orig", None), "sqlstate", None),
                )
                break

    @staticmethod
    async def _with_conflict_retries(apply: Callable[[], Awaitable[None]]) -> None:
        """A transaction Postgres aborted to keep the serializable order (or to break a
        deadlock) is simply run again, seeing what the other one committed."""
        for retry in range(CONFLICT_RETRIES + 1):
            try:
                await apply()
                return
            except (DBAPIError, asyncpg.PostgresError) as exc:
                if not is_lock_conflict(exc) or retry == CONFLICT_RETRIES:
                    raise
                metrics.CONFLICTS.inc()
                # let the transaction we collided with finish first
                await asyncio.sleep(random.uniform(0, 0.01 * 2**retry))  # noqa: S311 (jitter)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncSession]:
        """A serializable transaction for applying events: its first statement locks them,
        then `_locked` takes the advisory locks of the Stripe objects they are about.

        SERIALIZABLE: handlers of different objects read what the other writes (a dispute
        needs its payment and subscription, a payment looks for its disputes); Postgres aborts
        one of two transactions that would each miss the other's write, and the retry sees it.
        Advisory locks, taken in one sorted order, keep same-object events of different
        replicas in order (so such aborts stay rare) and cannot deadlock with each other."""
        async with self._session_factory() as session, session.begin():
            await session.execute(text("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
            await (await session_driver(session)).execute("SET LOCAL synchronous_commit = off")
            yield session

    async def _locked(self, session: AsyncSession, events: list[Any]) -> list[Any]:
        """`events` with a payload, once the advisory locks of their Stripe objects are held."""
        events = [row for row in events if row.payload is not None]
        keys = sorted({lock_key(row.payload) for row in events})
        if keys:
            await (await session_driver(session)).execute(ADVISORY_LOCKS, keys)
        return events

    async def _apply_batch(self, claimed: list[int]) -> None:
        """All events in one transaction, in the order they were stored, marked processed by
        one statement; any failure rolls the whole batch back (the caller then applies its
        events one by one). The first attempt claims the events (their ids are added to
        `claimed`); a retry takes them again."""
        async with self._transaction() as session:
            driver = await session_driver(session)
            if claimed:
                rows = await RELOCK.fetch(driver, ids=claimed)
            else:
                rows = await CLAIM_DUE.fetch(driver, batch_size=self._batch_size)
                claimed.extend(row.id for row in rows)
            rows = await self._locked(session, rows)
            if not rows:
                return
            now = datetime.now(UTC)
            payloads = [row.payload for row in rows]
            await ensure_accounts(session, accounts_named(payloads))

            async def forget_loaded_rows() -> None:
                # the next event reads the database afresh, as it would in its own transaction
                await session.flush()
                session.expunge_all()

            await apply_events(
                [
                    EventContext(session, self._settings, self._stripe, payload, now)
                    for payload in payloads
                ],
                after_each=forget_loaded_rows,
            )
            await MARK_PROCESSED.execute(
                await session_driver(session), ids=[row.id for row in rows], now=now
            )
        self._count_processed(rows, now)

    async def _apply_one(self, event_id: int) -> None:
        """One event; a handler's failure is rolled back to a savepoint and recorded on the
        event (retried with backoff, parked after MAX_ATTEMPTS)."""
        async with self._transaction() as session:
            found = await session.scalars(
                select(StripeEvent)
                .where(StripeEvent.id == event_id, StripeEvent.status == "pending")
                .with_for_update(skip_locked=True)
            )
            rows = [row for row in found if row.payload is not None]
            if not rows:
                return
            row: StripeEvent = rows[0]
            assert row.payload is not None
            now = datetime.now(UTC)
            row.attempts += 1
            try:
                async with session.begin_nested():
                    # its object's lock too: a key Postgres cannot take (a malformed id)
                    # fails this event, not the transaction that records the failure
                    await self._locked(session, rows)
                    await apply_event(
                        EventContext(session, self._settings, self._stripe, row.payload, now)
                    )
            except Exception as exc:
                if is_lock_conflict(exc):
                    raise  # abort the whole transaction; it is run again
                self._record_failure(row, exc, now)
                return
            self._mark_processed(row, now)
        self._count_processed([row], now)

    @staticmethod
    def _mark_processed(row: StripeEvent, now: datetime) -> None:
        row.status = "processed"
        row.processed_at = now
        row.next_attempt_at = None
        row.last_error = None

    @staticmethod
    def _count_processed(rows: list[Any], now: datetime) -> None:
        """`rows`: events (`StripeEvent` or its `_EVENT_COLUMNS`) just committed as processed."""
        for event_type, count in Counter(row.type for row in rows).items():
            metrics.PROCESSED.labels(event_type).inc(count)
        for row in rows:
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


APPLIED: list[ColumnClause[str]] = [literal_column("'processed'"), literal_column("'ignored'")]
"""In the SQL itself, not parameters, so every plan of the pruning can use the partial index
`ix_stripe_events_payload_kept` (the applied events still holding a payload, a few days' worth)
rather than read every event ever received."""


async def prune_payloads(session_factory: async_sessionmaker[AsyncSession], days: int) -> int:
    """Drop raw payloads of applied events older than `days`; the ids stay for dedup. The
    payload becomes SQL NULL (`null()`: a bare None would store the JSON value `null`, which
    `IS NOT NULL` still matches, so every run would rewrite every event pruned before)."""
    async with session_factory() as session, session.begin():
        result = await session.execute(
            update(StripeEvent)
            .where(
                StripeEvent.status.in_(APPLIED),
                StripeEvent.payload.is_not(None),
                StripeEvent.received_at < func.now() - timedelta(days=days),
            )
            .values(payload=null())
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
