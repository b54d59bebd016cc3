"""Maintenance window requests and responses (the OpenAPI contract)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.calendar import Moment

MAX_WINDOW_DAYS = 366


class MaintenanceWindowCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    starts_at: Moment = Field(description="Start of the suspension (inclusive).")
    ends_at: Moment = Field(description="Planned end of the suspension (exclusive).")
    kind: Literal["scheduled", "emergency"] = Field(
        description="`scheduled` windows over 3 business days are refused; `emergency` ones "
        "are recorded and flagged `exceeds_policy_limit`."
    )
    reason: str = Field(min_length=1, max_length=2000, description="What the work is.")

    @model_validator(mode="after")
    def _ordered(self) -> MaintenanceWindowCreate:
        if self.ends_at <= self.starts_at:
            raise ValueError("ends_at must be after starts_at")
        if (self.ends_at - self.starts_at).days > MAX_WINDOW_DAYS:
            raise ValueError(f"a window cannot span more than {MAX_WINDOW_DAYS} days")
        return self


class MaintenanceWindowComplete(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ended_at: Moment = Field(
        description="When the service actually became available again (exclusive); after "
        "`starts_at` and not in the future."
    )


class StripeUpdates(BaseModel):
    applied: int = Field(description="Extensions Stripe applied (the next charge moved).")
    pending: int = Field(
        description="Extensions not yet confirmed by Stripe; repeating the completion retries."
    )
    rejected: int = Field(description="Extensions Stripe refused; access is extended locally.")
    skipped: int = Field(
        description="Extensions not pushed (0 days, a subscription that is not active or "
        "trialing, or one Stripe is set to end first: its client turned off renewal); access "
        "is extended locally."
    )


class MaintenanceWindowOut(BaseModel):
    id: uuid.UUID
    kind: Literal["scheduled", "emergency"]
    reason: str
    status: Literal["open", "completed"] = Field(description="`completed` once its end is known.")
    starts_at: datetime
    ends_at: datetime = Field(description="Planned end (exclusive).")
    ended_at: datetime | None = Field(description="Actual end (exclusive), set at completion.")
    business_days: int = Field(
        description="Business days (in BUSINESS_TIMEZONE) the suspension touches, counting "
        "windows that overlap or adjoin it as one suspension."
    )
    exceeds_policy_limit: bool = Field(description="Over the 3 business days of policy §5.")
    unavailable_days: int | None = Field(
        description="Calendar days (BUSINESS_TIMEZONE) touched by [starts_at, ended_at): the "
        "extension granted (less days already credited by overlapping windows)."
    )
    created_by: str
    created_at: datetime
    completed_by: str | None
    completed_at: datetime | None
    subscriptions_extended: int = Field(description="Subscriptions live during the window.")
    accounts_notified: int = Field(description="Accounts emailed (one email per account).")
    stripe_updates: StripeUpdates


class MaintenanceWindowList(BaseModel):
    items: list[MaintenanceWindowOut] = Field(description="Newest `starts_at` first.")
