"""The Stripe mirror: events as received, and the Stripe objects the policy depends on.

Every table that mirrors a Stripe object has a unique `stripe_id`. `stripe_created` and
`synced_at`/`source_event_created` let the webhook consumer refuse to overwrite newer state with
older state (see app/webhooks/service.py for the ordering rule).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Identity, Index, Integer, String, Text, and_, func
from sqlalchemy.dialects.postgresql import JSON, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, Timestamped


class StripeEvent(Base):
    """Every verified Stripe event, stored once (unique Stripe id decided by the database)."""

    __tablename__ = "stripe_events"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    stripe_id: Mapped[str] = mapped_column(String(255), unique=True)
    type: Mapped[str] = mapped_column(String(128))
    api_version: Mapped[str | None] = mapped_column(String(64))
    object_id: Mapped[str | None] = mapped_column(String(255), comment="data.object.id")
    stripe_created: Mapped[datetime]
    livemode: Mapped[bool]
    payload: Mapped[dict[str, Any] | None] = mapped_column(
        JSON, comment="Raw event; pruned after EVENT_RETENTION_DAYS once processed."
    )
    """`json`, not `jsonb`: the body exactly as Stripe signed it, stored without building a
    `jsonb` value and read back without rendering one (both cost Postgres CPU per event;
    nothing queries inside it; migration 0009)."""
    received_at: Mapped[datetime] = mapped_column(server_default=func.now())
    status: Mapped[str] = mapped_column(
        String(16), server_default="pending", comment="pending|processed|failed|ignored"
    )
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None]
    processed_at: Mapped[datetime | None]


Index(  # the processor's claim: pending events oldest first (app/webhooks/processor.py)
    "ix_stripe_events_pending",
    StripeEvent.id,
    postgresql_where=StripeEvent.status == "pending",
)
Index("ix_stripe_events_status_received_at", StripeEvent.status, StripeEvent.received_at)
Index(  # the payloads still to prune, hourly (app/webhooks/processor.py `prune_payloads`)
    "ix_stripe_events_payload_kept",
    StripeEvent.received_at,
    postgresql_where=and_(
        StripeEvent.payload.is_not(None), StripeEvent.status.in_(("processed", "ignored"))
    ),
)


class Subscription(Timestamped, Base):
    """A channel subscription as Stripe last reported it, plus our maintenance extensions."""

    __tablename__ = "subscriptions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    stripe_id: Mapped[str] = mapped_column(String(255), unique=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    channel_id: Mapped[str] = mapped_column(ForeignKey("channels.id"), index=True)
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255))
    plan_code: Mapped[str | None] = mapped_column(String(64))
    stripe_price_id: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(32))
    cancel_at_period_end: Mapped[bool] = mapped_column(server_default="false")
    cancel_at: Mapped[datetime | None]
    current_period_start: Mapped[datetime | None]
    current_period_end: Mapped[datetime | None]
    trial_end: Mapped[datetime | None]
    canceled_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    extension_days: Mapped[int] = mapped_column(
        Integer, server_default="0", comment="Maintenance days granted in total."
    )
    extension_days_in_period: Mapped[int] = mapped_column(
        Integer,
        server_default="0",
        comment="How many of extension_days Stripe's current_period_end already includes.",
    )
    access_revoked_at: Mapped[datetime | None] = mapped_column(
        comment="Set when a refund or lost chargeback ends access before the period end."
    )
    dispute_cancel_sent_at: Mapped[datetime | None] = mapped_column(
        comment="When Stripe accepted the cancellation a lost chargeback asked for."
    )
    status_since: Mapped[datetime | None] = mapped_column(
        comment="`created` of the first applied event that showed the current status (null: "
        "unknown, set before this was recorded)."
    )
    source_event_created: Mapped[datetime | None] = mapped_column(
        comment="`created` of the newest event applied; older events do not overwrite."
    )


Index(  # maintenance completion: the subscriptions whose period ends after the window starts
    "ix_subscriptions_current_period_end", Subscription.current_period_end
)
Index(  # ... and those holding days outside Stripe's period (app/maintenance/service.py)
    "ix_subscriptions_days_outside_period",
    Subscription.current_period_end,
    postgresql_where=Subscription.extension_days > Subscription.extension_days_in_period,
)


class Invoice(Timestamped, Base):
    """A subscription invoice (never a balance operation)."""

    __tablename__ = "invoices"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    stripe_id: Mapped[str] = mapped_column(String(255), unique=True)
    account_id: Mapped[str | None] = mapped_column(ForeignKey("accounts.id"), index=True)
    stripe_subscription_id: Mapped[str | None] = mapped_column(String(255), index=True)
    status: Mapped[str | None] = mapped_column(String(32))
    amount_due: Mapped[int] = mapped_column(BigInteger, server_default="0")
    amount_paid: Mapped[int] = mapped_column(BigInteger, server_default="0")
    currency: Mapped[str] = mapped_column(String(3))
    period_start: Mapped[datetime | None]
    period_end: Mapped[datetime | None]
    paid_at: Mapped[datetime | None]


class Payment(Timestamped, Base):
    """A Stripe payment (payment intent) for a subscription invoice, a top-up or a debt
    repayment, with Stripe's processing fee once its balance transaction settles (looked up
    after the charge's events are applied: app/webhooks/fees.py)."""

    __tablename__ = "payments"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    stripe_id: Mapped[str] = mapped_column(String(255), unique=True, comment="payment intent id")
    account_id: Mapped[str | None] = mapped_column(ForeignKey("accounts.id"), index=True)
    purpose: Mapped[str | None] = mapped_column(
        String(32), comment="subscription|top_up|debt_repayment"
    )
    stripe_invoice_id: Mapped[str | None] = mapped_column(String(255), index=True)
    stripe_subscription_id: Mapped[str | None] = mapped_column(String(255), index=True)
    stripe_checkout_session_id: Mapped[str | None] = mapped_column(String(255))
    stripe_charge_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(32), comment="succeeded|failed|pending")
    fee: Mapped[int | None] = mapped_column(
        BigInteger, comment="Stripe fee in the payment currency; null until the charge settles."
    )
    stripe_balance_transaction_id: Mapped[str | None] = mapped_column(
        String(255), comment="The charge's balance transaction, where its fee is read."
    )
    amount_refunded: Mapped[int] = mapped_column(BigInteger, server_default="0")
    disputed: Mapped[bool] = mapped_column(server_default="false")
    paid_at: Mapped[datetime | None]


Index(  # the fee look-ups still to make (app/webhooks/fees.py)
    "ix_payments_fee_unsettled",
    Payment.id,
    postgresql_where=Payment.fee.is_(None) & Payment.stripe_balance_transaction_id.is_not(None),
)


class Refund(Timestamped, Base):
    """A Stripe refund, whether we asked for it or it was made in the Dashboard."""

    __tablename__ = "refunds"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    stripe_id: Mapped[str] = mapped_column(String(255), unique=True)
    stripe_payment_intent_id: Mapped[str | None] = mapped_column(String(255), index=True)
    stripe_charge_id: Mapped[str | None] = mapped_column(String(255))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(String(64))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, server_default="{}")
    stripe_created: Mapped[datetime | None]


class Dispute(Timestamped, Base):
    """A chargeback and what it changed."""

    __tablename__ = "disputes"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    stripe_id: Mapped[str] = mapped_column(String(255), unique=True)
    stripe_charge_id: Mapped[str] = mapped_column(String(255), index=True)
    stripe_payment_intent_id: Mapped[str | None] = mapped_column(String(255), index=True)
    account_id: Mapped[str | None] = mapped_column(ForeignKey("accounts.id"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(String(64))
    funds_withdrawn: Mapped[int] = mapped_column(BigInteger, server_default="0")
    funds_reinstated: Mapped[int] = mapped_column(BigInteger, server_default="0")
    access_ended: Mapped[bool] = mapped_column(server_default="false")
    stripe_created: Mapped[datetime | None]
    closed_at: Mapped[datetime | None] = mapped_column(
        comment="`created` of the earliest event reporting it won or lost."
    )
