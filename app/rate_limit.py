"""Per-account limit on requests that create something at Stripe (checkout and portal sessions).

The rule holds across replicas because it counts rows in the shared database: an account may
create at most `STRIPE_SESSIONS_PER_ACCOUNT_PER_MINUTE` checkout plus portal sessions in any
sliding 60 seconds. Past that: 429 `rate_limited` with `Retry-After` = seconds until the oldest
counted row leaves the window. Replays of an Idempotency-Key and reused open checkouts create
nothing at Stripe and are not counted. Concurrent requests may overshoot by the number racing.
"""

from __future__ import annotations

import math
from datetime import timedelta

from sqlalchemy import func, select, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import RateLimited
from app.models import CheckoutSession, PortalSession

WINDOW = timedelta(seconds=60)


async def check_stripe_rate_limit(session: AsyncSession, account_id: str, limit: int) -> None:
    since = func.now() - WINDOW
    recent = union_all(
        select(CheckoutSession.created_at.label("at")).where(
            CheckoutSession.account_id == account_id, CheckoutSession.created_at > since
        ),
        select(PortalSession.created_at.label("at")).where(
            PortalSession.account_id == account_id, PortalSession.created_at > since
        ),
    ).subquery()
    row = (
        await session.execute(
            select(
                func.count(),
                func.extract("epoch", func.min(recent.c.at) + WINDOW - func.now()),
            ).select_from(recent)
        )
    ).one()
    count, seconds_left = int(row[0]), row[1]
    if count >= limit:
        retry_after = max(1, math.ceil(float(seconds_left or 1)))
        raise RateLimited(
            f"At most {limit} checkout or portal sessions per minute; retry in {retry_after}s",
            headers={"Retry-After": str(retry_after)},
        )
