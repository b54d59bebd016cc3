"""Prometheus gauge of overdue refund/appeal requests, refreshed when /metrics is scraped."""

from __future__ import annotations

from datetime import UTC, datetime

import structlog
from prometheus_client import Gauge
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.refunds.repository import count_overdue

log = structlog.get_logger()

REFUND_REQUESTS_OVERDUE = Gauge(
    "billing_refund_requests_overdue",
    "Refund and appeal requests whose due date passed without the reply it asks for",
    multiprocess_mode="mostrecent",  # the last count any worker made, not their sum
)


async def refresh_refund_metrics(factory: async_sessionmaker[AsyncSession]) -> None:
    try:
        async with factory() as session:
            REFUND_REQUESTS_OVERDUE.set(await count_overdue(session, datetime.now(UTC)))
    except Exception as exc:  # metrics must answer even when the database does not
        log.warning("metrics.refund_overdue_failed", error_type=type(exc).__name__)
