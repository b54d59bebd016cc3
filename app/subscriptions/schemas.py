"""Subscriptions and channel access: the HTTP contract."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class SubscriptionOut(BaseModel):
    id: str = Field(description="Stripe subscription id.")
    channel_id: str
    plan: str | None = Field(description="Plan code, as Stripe's events last reported it.")
    status: str = Field(description="Stripe's subscription status.")
    cancel_at_period_end: bool
    cancel_at: datetime | None
    current_period_end: datetime | None
    access_until: datetime | None = Field(
        description="End of the paid period plus the extension days (maintenance windows, "
        "finance `access_extension` decisions) Stripe's period does not already hold."
    )
    extension_days: int = Field(
        description="Extra days of access granted in total: maintenance windows and finance "
        "`access_extension` decisions."
    )
    has_access: bool
    reason: str = Field(description="Why access is as it is (e.g. `cancelling`).")


class SubscriptionList(BaseModel):
    data: list[SubscriptionOut]


class AccessOut(BaseModel):
    channel_id: str
    has_access: bool
    access_until: datetime | None
    reason: str = Field(
        description="`subscription_active`, `subscription_trialing`, `subscription_past_due`, "
        "`cancelling`, `period_ended`, `revoked`, `no_subscription` or "
        "`subscription_<status>` when the status gives none."
    )


class AccessChangeOut(BaseModel):
    id: int = Field(description="Position in the feed; pass the last one seen as `after`.")
    channel_id: str
    account_id: str
    has_access: bool
    access_until: datetime | None
    reason: str
    created_at: datetime


class AccessChangePage(BaseModel):
    data: list[AccessChangeOut] = Field(description="Changes in feed order (ascending id).")
    next_cursor: int | None = Field(
        description="The last id returned (pass as `after`), or `after` itself when empty."
    )
