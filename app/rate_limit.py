"""Per-account limit on requests that create something at Stripe (checkout and portal sessions).

The rule holds across replicas because it counts rows in the shared database: an account may
create at most `STRIPE_SESSIONS_PER_ACCOUNT_PER_MINUTE` checkout plus portal sessions in any
sliding 60 seconds. Past that: 429 `rate_limited` with `Retry-After` = seconds until the oldest
counted row leaves the window. Replays of an Idempotency-Key and reused open checkouts create
nothing at Stripe and are not counted. Concurrent requests may overshoot by the number racing.

Reads that ask Stripe (a checkout session synced while no payment event has fulfilled it) are
limited too, so one client polling cannot use up the Stripe rate limit every checkout shares:
`StripeReadThrottle`, at most one per account per second in each process.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import RateLimited
from app.models import CheckoutSession, PortalSession

WINDOW = timedelta(seconds=60)


@dataclass(frozen=True)
class RecentSessions:
    count: int
    seconds_left: Any
    """Seconds until the oldest counted session leaves the window (None when there is none)."""


def recent_stripe_sessions(account_id: Any) -> tuple[Any, Any]:
    """Two scalar subqueries: the account's checkout plus portal sessions of the last
    `WINDOW`, and the seconds until the oldest of them leaves it (to embed in a statement).
    `account_id` is a value or a bind parameter."""
    since = func.now() - WINDOW
    recent = union_all(
        select(CheckoutSession.created_at.label("at")).where(
            CheckoutSession.account_id == account_id, CheckoutSession.created_at > since
        ),
        select(PortalSession.created_at.label("at")).where(
            PortalSession.account_id == account_id, PortalSession.created_at > since
        ),
    ).subquery()
    count = select(func.count()).select_from(recent).scalar_subquery()
    seconds_left = (
        select(func.extract("epoch", func.min(recent.c.at) + WINDOW - func.now()))
        .select_from(recent)
        .scalar_subquery()
    )
    return count, seconds_left


def enforce_stripe_rate_limit(recent: RecentSessions, limit: int) -> None:
    """429 `rate_limited` when `recent` already reaches `limit`."""
    if recent.count >= limit:
        retry_after = max(1, math.ceil(float(recent.seconds_left or 1)))
        raise RateLimited(
            f"At most {limit} checkout or portal sessions per minute; retry in {retry_after}s",
            headers={"Retry-After": str(retry_after)},
        )


async def check_stripe_rate_limit(session: AsyncSession, account_id: str, limit: int) -> None:
    count, seconds_left = recent_stripe_sessions(account_id)
    row = (await session.execute(select(count, seconds_left))).one()
    enforce_stripe_rate_limit(RecentSessions(int(row[0]), row[1]), limit)


class StripeReadThrottle:
    """At most one Stripe read per account every `interval` seconds in this process; a read
    refused here answers what is stored (as when Stripe cannot be reached). Memory is bounded:
    beyond `max_accounts` the account read longest ago is forgotten."""

    def __init__(self, interval: float = 1.0, max_accounts: int = 10_000) -> None:
        self.interval = interval
        self.max_accounts = max_accounts
        self._last: dict[str, float] = {}

    def allow(self, account_id: str) -> bool:
        now = time.monotonic()
        last = self._last.pop(account_id, None)
        if last is not None and now - last < self.interval:
            self._last[account_id] = last
            return False
        if len(self._last) >= self.max_accounts:
            self._last.pop(next(iter(self._last)))
        self._last[account_id] = now
        return True
