"""Recovering events Stripe never delivered, and registering the webhook endpoint.

`reconcile` lists Stripe's events since shortly before the newest one stored (Stripe's Events
API keeps 30 days), stores every one that is missing through the same path as a delivery and
reports the drift. Run it on a schedule (e.g. every 15 minutes from cron or a Kubernetes
CronJob: `billing reconcile-events`); the stored events are then applied by the event processor.
Events from the Events API are rendered in the API version current when they were created;
the report counts those whose version differs from the pinned one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.models import StripeEvent
from app.stripe_gateway import API_VERSION, StripeGateway
from app.webhooks.handlers import HANDLED_EVENT_TYPES
from app.webhooks.ingest import incoming_event, insert_events

OVERLAP = timedelta(minutes=10)
EVENTS_API_WINDOW = timedelta(days=30)


@dataclass
class ReconcileReport:
    since: datetime
    listed: int = 0
    recovered: int = 0
    recovered_by_type: Counter[str] = field(default_factory=Counter)
    other_api_version: int = 0

    def lines(self) -> list[str]:
        lines = [
            f"listed {self.listed} Stripe events since {self.since.isoformat()}",
            f"recovered {self.recovered} events that had not been delivered",
        ]
        lines += [f"  {count} {kind}" for kind, count in sorted(self.recovered_by_type.items())]
        if self.other_api_version:
            lines.append(f"{self.other_api_version} events rendered in another API version")
        return lines


async def reconcile(
    engine: AsyncEngine,
    stripe: StripeGateway,
    settings: Settings,
    *,
    since: datetime | None = None,
    now: datetime | None = None,
) -> ReconcileReport:
    now = now or datetime.now(UTC)
    if since is None:
        async with engine.connect() as connection:
            newest = await connection.scalar(select(func.max(StripeEvent.stripe_created)))
        since = (newest - OVERLAP) if newest else now - EVENTS_API_WINDOW
    since = max(since, now - EVENTS_API_WINDOW)
    report = ReconcileReport(since=since)
    starting_after: str | None = None
    while True:
        params: dict[str, object] = {"limit": 100, "created": {"gte": int(since.timestamp())}}
        if starting_after:
            params["starting_after"] = starting_after
        page = await stripe.list_events(params)
        events = [
            incoming_event(event, livemode=settings.stripe_livemode) for event in page["data"]
        ]
        report.listed += len(events)
        if events:
            async with engine.begin() as connection:
                new_ids = await insert_events(connection, events)
            for event in events:
                if event.stripe_id in new_ids:
                    report.recovered += 1
                    report.recovered_by_type[event.type] += 1
                if event.api_version not in (None, API_VERSION):
                    report.other_api_version += 1
        if not page.get("has_more") or not page["data"]:
            return report
        starting_after = page["data"][-1]["id"]


async def register_webhook_endpoint(stripe: StripeGateway, url: str) -> dict[str, Any]:
    """Create the endpoint (or update the one with this URL) with the pinned API version and
    exactly the events the service applies. Returns Stripe's endpoint; the signing `secret`
    is only in the answer to a create: put it in STRIPE_WEBHOOK_SECRETS."""
    events = sorted(HANDLED_EVENT_TYPES)
    existing = await stripe.list_webhook_endpoints()
    for endpoint in existing.get("data", []):
        # an endpoint's API version cannot be changed: one on another version is left alone
        if endpoint.get("url") == url and endpoint.get("api_version") == API_VERSION:
            return await stripe.update_webhook_endpoint(
                str(endpoint["id"]), {"enabled_events": events}
            )
    return await stripe.create_webhook_endpoint(
        {
            "url": url,
            "api_version": API_VERSION,
            "enabled_events": events,
            "description": "1msg billing service",
        }
    )
