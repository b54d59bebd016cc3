"""Channel access, derived from the mirrored subscription (a pure function of stored facts).

- `active`, `trialing` and (by default, `PAST_DUE_KEEPS_ACCESS`) `past_due` are live.
- A cancelling subscription (`cancel_at_period_end` or `cancel_at`) stays live until the paid
  period ends: Stripe keeps it `active` until then. A `cancel_at` before the period's end (set
  in Stripe's Dashboard) ends it there: Stripe cancels the subscription at that moment
  (prorating the rest), so access lasts until `cancel_at` (`cancel_access_until`).
- `access_until` is Stripe's `current_period_end` plus the maintenance days Stripe's period does
  not already include; access ends there even if Stripe's renewal is late.
- A subscription Stripe ended at the end of its paid period because the client had turned off
  renewal (`canceled` with `cancel_at_period_end` or `cancel_at`, ended at or after its
  `current_period_end`: `ended_at_period_end`) keeps access until `access_until` while it
  still has extension days Stripe's period does not hold (a maintenance window, policy
  section 5, or a finance extension): the days it lost follow its end.
- A refund or a lost chargeback revokes access at once (`access_revoked_at`).
- Everything else (`incomplete`, `incomplete_expired`, `unpaid`, `canceled`, `paused`) has none.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

LIVE_STATUSES = frozenset({"active", "trialing"})

ACCESS_COLUMNS = (
    "status",
    "cancel_at_period_end",
    "cancel_at",
    "current_period_end",
    "extension_days",
    "extension_days_in_period",
    "access_revoked_at",
    "ended_at",
)
"""The subscription columns access depends on (a `Subscription` row, or just these columns)."""


class SubscriptionState(Protocol):
    """What access is derived from: a `Subscription` or a row of `ACCESS_COLUMNS`."""

    @property
    def status(self) -> str: ...
    @property
    def cancel_at_period_end(self) -> bool: ...
    @property
    def cancel_at(self) -> datetime | None: ...
    @property
    def current_period_end(self) -> datetime | None: ...
    @property
    def extension_days(self) -> int: ...
    @property
    def extension_days_in_period(self) -> int: ...
    @property
    def access_revoked_at(self) -> datetime | None: ...
    @property
    def ended_at(self) -> datetime | None: ...


@dataclass(frozen=True)
class Access:
    has_access: bool
    access_until: datetime | None
    reason: str


def access_until(subscription: SubscriptionState) -> datetime | None:
    if subscription.current_period_end is None:
        return None
    pending_days = max(0, subscription.extension_days - subscription.extension_days_in_period)
    return subscription.current_period_end + timedelta(days=pending_days)


def cancel_access_until(subscription: SubscriptionState) -> datetime | None:
    """What a client is shown as `access_until`: `access_until`, unless Stripe is set to end the
    subscription earlier, at a `cancel_at` inside the current period (Stripe cancels it then,
    and one ended before its period end keeps no extension days: see `ended_at_period_end`)."""
    until = access_until(subscription)
    cancel_at = subscription.cancel_at
    if (
        until is not None
        and cancel_at is not None
        and subscription.current_period_end is not None
        and cancel_at < subscription.current_period_end
    ):
        return min(until, cancel_at)
    return until


def ended_at_period_end(subscription: SubscriptionState) -> bool:
    """Stripe ended it at the end of its paid period (not earlier): the client had turned off
    renewal."""
    return (
        subscription.status == "canceled"
        and (subscription.cancel_at_period_end or subscription.cancel_at is not None)
        and subscription.ended_at is not None
        and subscription.current_period_end is not None
        and subscription.ended_at >= subscription.current_period_end
    )


def subscription_access(
    subscription: SubscriptionState, now: datetime, *, past_due_keeps_access: bool = True
) -> Access:
    until = cancel_access_until(subscription)
    if subscription.access_revoked_at is not None:
        return Access(False, subscription.access_revoked_at, "revoked")
    live = subscription.status in LIVE_STATUSES or (
        past_due_keeps_access and subscription.status == "past_due"
    )
    if not live and ended_at_period_end(subscription):
        live = subscription.extension_days > subscription.extension_days_in_period
    if not live:
        return Access(False, None, f"subscription_{subscription.status}")
    if until is None or now >= until:
        return Access(False, until, "period_ended")
    if subscription.cancel_at_period_end or subscription.cancel_at is not None:
        return Access(True, until, "cancelling")
    return Access(True, until, f"subscription_{subscription.status}")


_NEVER = datetime.min.replace(tzinfo=UTC)


def channel_access(
    subscriptions: Iterable[SubscriptionState], now: datetime, *, past_due_keeps_access: bool = True
) -> Access:
    """The best access any of the channel's subscriptions gives, whatever order they come in:
    with access, the one lasting longest; without, the most recently ended (the latest
    `access_until`: revoked or period ended), else the newest (latest period end) of those
    that never had access to show. Ties go to the reason's name, so the answer (and the
    access feed, which compares answers) never changes with the rows' order."""
    best: tuple[tuple[bool, datetime, datetime, str], Access] | None = None
    for subscription in subscriptions:
        candidate = subscription_access(
            subscription, now, past_due_keeps_access=past_due_keeps_access
        )
        rank = (
            candidate.has_access,
            candidate.access_until or _NEVER,
            subscription.current_period_end or _NEVER,
            candidate.reason,
        )
        if best is None or rank > best[0]:
            best = (rank, candidate)
    return Access(False, None, "no_subscription") if best is None else best[1]
