"""Maintenance windows (policy section 5) and the access extensions they granted."""

from __future__ import annotations

import uuid
from datetime import date, datetime

from sqlalchemy import (
    BigInteger,
    Date,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base


class MaintenanceWindow(Base):
    """A suspension of the service, half-open `[starts_at, ends_at)`; `ended_at` is the actual
    end recorded at completion."""

    __tablename__ = "maintenance_windows"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(String(16), comment="scheduled|emergency")
    reason: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), server_default="open", comment="open|completed")
    starts_at: Mapped[datetime]
    ends_at: Mapped[datetime] = mapped_column(comment="Planned end (exclusive).")
    ended_at: Mapped[datetime | None] = mapped_column(comment="Actual end (exclusive).")
    business_days: Mapped[int] = mapped_column(
        Integer, comment="Business days the suspension (with overlapping windows) touches."
    )
    exceeds_policy_limit: Mapped[bool] = mapped_column(server_default="false")
    unavailable_days: Mapped[int | None] = mapped_column(
        Integer, comment="Calendar days touched by [starts_at, ended_at), set at completion."
    )
    created_by: Mapped[str] = mapped_column(String(255))
    completed_by: Mapped[str | None] = mapped_column(String(255))
    completed_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class MaintenanceExtension(Base):
    """The access extension one window granted one subscription: created once (unique), its
    days added to `subscriptions.extension_days` in the same transaction, then pushed to Stripe
    (`stripe_status`) as the absolute `stripe_trial_end`. `subscriptions.extension_days_in_period`
    is derived from the stored Stripe snapshot: once Stripe's `trial_end` reaches
    `stripe_trial_end`, Stripe's period holds `period_days_at_target` days
    (app/maintenance/service.py `count_extension_days_in_period`)."""

    __tablename__ = "maintenance_extensions"
    __table_args__ = (UniqueConstraint("window_id", "subscription_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    window_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("maintenance_windows.id"))
    subscription_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("subscriptions.id"), index=True)
    account_id: Mapped[str] = mapped_column(String(64), index=True)
    channel_id: Mapped[str] = mapped_column(String(64))
    days: Mapped[int] = mapped_column(Integer)
    credited_dates: Mapped[list[date]] = mapped_column(
        ARRAY(Date), comment="Local dates this extension paid for (never credited twice)."
    )
    stripe_status: Mapped[str] = mapped_column(
        String(16), comment="pending|applied|rejected|skipped"
    )
    stripe_trial_end: Mapped[datetime | None] = mapped_column(
        comment="The trial_end sent to Stripe (fixed at creation, so retries send the same)."
    )
    period_days_at_target: Mapped[int | None] = mapped_column(
        Integer,
        comment="subscriptions.extension_days when this row was made: the extension days "
        "Stripe's period includes once Stripe's trial_end reaches stripe_trial_end.",
    )
    stripe_period_end: Mapped[datetime | None] = mapped_column(
        comment="Stripe's period end after the update."
    )
    included_in_period: Mapped[bool] = mapped_column(server_default="false")
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


Index(  # retry_pending_extensions, every minute: the pushes still pending at Stripe
    "ix_maintenance_extensions_pending",
    MaintenanceExtension.subscription_id,
    MaintenanceExtension.id,
    postgresql_where=MaintenanceExtension.stripe_status == "pending",
)
