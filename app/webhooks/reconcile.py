"""Recovering events Stripe never delivered, and registering the webhook endpoint.

`reconcile` lists Stripe's events from the oldest point a missed delivery can be (below),
stores every one that is missing through the same path as a delivery and reports the drift.
Run it on a schedule (e.g. every 15 minutes from cron or a Kubernetes CronJob:
`billing reconcile-events`); the stored events are then applied by the event processor.

The default window (`default_since`) starts at the earlier of 3 days ago (Stripe retries a
failed delivery for up to 3 days, so an event it failed to deliver, our 5xx or an outage,
can be missing while later ones arrived) and 10 minutes before the newest stored event (an
outage longer than that: everything after it may be missing), never more than the 30 days
the Events API keeps; with no stored event, those 30 days. Stripe's list is paginated (100 a
page) and inserts are `ON CONFLICT DO NOTHING`, so a run costs about one request per 100
events of the window. A missed event older than 3 days while later ones were stored is only
found with `--since` (run the command at least daily).
Events from the Events API are rendered in the API version current when they were created;
the report counts those whose version differs from the pinned one. Applying such a
subscription or invoice event re-fetches the object from Stripe (in the pinned version)
instead of reading its payload (app/webhooks/handlers.py `on_subscription_events`,
`on_invoice_events`).
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
DELIVERY_RETRY_WINDOW = timedelta(days=3)
"""How long Stripe retries a failed webhook delivery."""
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


def default_since(newest_stored: datetime | None, now: datetime) -> datetime:
    """Where a run without `--since` starts listing (see the module docstring): the earlier
    of `now` - 3 days (Stripe's delivery retries) and 10 minutes before the newest stored
    event; with none stored, the Events API's 30 days."""
    if newest_stored is None:
        return now - EVENTS_API_WINDOW
    return min(now - DELIVERY_RETRY_WINDOW, newest_stored - OVERLAP)


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
        since = default_since(newest, now)
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
    exactly the events the service applies, enabled (Stripe disables an endpoint that kept
    failing; registering it again turns it back on). Returns Stripe's endpoint; the signing
    `secret` is only in the answer to a create: put it in STRIPE_WEBHOOK_SECRETS."""
    events = sorted(HANDLED_EVENT_TYPES)
    existing = await stripe.list_webhook_endpoints()
    for endpoint in existing.get("data", []):
        # an endpoint's API version cannot be changed: one on another version is left alone
        if endpoint.get("url") == url and endpoint.get("api_version") == API_VERSION:
            return await stripe.update_webhook_endpoint(
                str(endpoint["id"]), {"enabled_events": events, "disabled": False}
            )
    return await stripe.create_webhook_endpoint(
        {
            "url": url,
            "api_version": API_VERSION,
            "enabled_events": events,
            "description": "1msg billing service",
        }
    )
