"""Refund and appeal requests, their replies, their audit trail, refund executions at Stripe,
and what each chargeback changed."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any

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
    and_,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, Timestamped


class RefundRequest(Timestamped, Base):
    """A client's refund, appeal, compensation or other billing request (policy section 4).

    `received_at` is the true receipt time; `clock_started_at` is when the request became
    identifiable (at once for requests that are not about a payment). The due dates count
    business days from `clock_started_at`."""

    __tablename__ = "refund_requests"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    type: Mapped[str] = mapped_column(String(16), comment="refund|appeal|compensation|other")
    status: Mapped[str] = mapped_column(String(32), index=True)
    description: Mapped[str] = mapped_column(Text)
    about_payment: Mapped[bool]
    payment_reference: Mapped[str | None] = mapped_column(String(255))
    payment_date: Mapped[date | None] = mapped_column(Date)
    amount: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(String(3))
    payment_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("payments.id"), index=True)
    missing_information: Mapped[list[str]] = mapped_column(JSONB, server_default="[]")
    channel: Mapped[str] = mapped_column(String(16), comment="api|email|phone")
    filed_by: Mapped[str] = mapped_column(String(255), comment="token `sub` that filed it")
    received_at: Mapped[datetime]
    clock_started_at: Mapped[datetime | None]
    first_response_due: Mapped[datetime | None]
    decision_due: Mapped[datetime | None]
    first_responded_at: Mapped[datetime | None]
    interim_responded_at: Mapped[datetime | None]
    next_step_due: Mapped[datetime | None]
    decided_at: Mapped[datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(16), comment="approved|rejected")
    remedy: Mapped[str | None] = mapped_column(
        String(32), comment="refund|balance_credit|access_extension"
    )
    remedy_amount: Mapped[int | None] = mapped_column(BigInteger)
    remedy_days: Mapped[int | None] = mapped_column(Integer)


Index(  # finance's list, newest first (app/refunds/repository.py `list_requests`)
    "ix_refund_requests_received_at_id", RefundRequest.received_at.desc(), RefundRequest.id
)
Index(  # the open requests, where overdue ones are counted (app/refunds/repository.py)
    "ix_refund_requests_open",
    RefundRequest.received_at,
    postgresql_where=and_(RefundRequest.decided_at.is_(None), RefundRequest.status != "closed"),
)


class RefundRequestResponse(Base):
    """A reply to the client (initial, interim or decision); shown to the client and emailed."""

    __tablename__ = "refund_request_responses"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    request_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("refund_requests.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16), comment="initial|interim|decision|closing")
    message: Mapped[str] = mapped_column(Text)
    next_step_due: Mapped[datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(16))
    remedy: Mapped[str | None] = mapped_column(String(32))
    amount: Mapped[int | None] = mapped_column(BigInteger)
    days: Mapped[int | None] = mapped_column(Integer)
    author: Mapped[str] = mapped_column(String(255), comment="token `sub`")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


# One decision per request, decided by the database.
Index(
    "uq_refund_request_responses_one_decision",
    RefundRequestResponse.request_id,
    unique=True,
    postgresql_where=RefundRequestResponse.kind == "decision",
)


class RefundRequestAudit(Base):
    """Append-only trail of every step on a request: who (`actor`, the token's `sub` or
    `stripe`) and when."""

    __tablename__ = "refund_request_audit"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    request_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("refund_requests.id"), index=True)
    action: Mapped[str] = mapped_column(String(48))
    actor: Mapped[str] = mapped_column(String(255))
    status_after: Mapped[str] = mapped_column(String(32))
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    at: Mapped[datetime] = mapped_column(server_default=func.now())


class RefundExecution(Timestamped, Base):
    """One attempt at the refund a decision approved: committed `pending` before Stripe is
    called, its id is the idempotency key (`billing:refund:<id>`) and travels in the refund's
    metadata. Attempt 1 is made by the approval (a double-submitted approval finds the same
    row); finance may retry a refund Stripe reported failed, each retry a new attempt row (so a
    new key). At most one attempt per request is not `failed` (a partial unique index), so one
    decision never has two live or successful refunds."""

    __tablename__ = "refund_executions"
    __table_args__ = (UniqueConstraint("request_id", "attempt"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    request_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("refund_requests.id"))
    attempt: Mapped[int] = mapped_column(
        Integer, server_default="1", comment="1 for the approval, +1 for each finance retry."
    )
    payment_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("payments.id"), index=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(
        String(16), comment="pending (not yet at Stripe)|submitted|succeeded|failed"
    )
    stripe_refund_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    failure_reason: Mapped[str | None] = mapped_column(String(64))
    requested_by: Mapped[str] = mapped_column(String(255))
    subscription_cancelled_at: Mapped[datetime | None] = mapped_column(
        comment="When the refunded subscription payment's subscription was cancelled at Stripe."
    )
    cancel_subscription_id: Mapped[str | None] = mapped_column(
        String(255),
        comment="The Stripe subscription this refund ended, to be cancelled at Stripe "
        "(sent when subscription_cancelled_at is set).",
    )


# One live (not failed) refund per request, decided by the database.
Index(
    "uq_refund_executions_one_live_attempt",
    RefundExecution.request_id,
    unique=True,
    postgresql_where=RefundExecution.status != "failed",
)
# The cancellations at Stripe not yet accepted (app/refunds/cancels.py).
Index(
    "ix_refund_executions_cancel_unsent",
    RefundExecution.id,
    postgresql_where=RefundExecution.cancel_subscription_id.is_not(None)
    & RefundExecution.subscription_cancelled_at.is_(None),
)


class DisputeEffect(Base):
    """One thing a chargeback changed (balance withdrawn or reinstated, access ended), once."""

    __tablename__ = "dispute_effects"
    __table_args__ = (UniqueConstraint("dispute_id", "kind"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    dispute_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("disputes.id"), index=True)
    kind: Mapped[str] = mapped_column(
        String(32), comment="balance_withdrawn|balance_reinstated|access_ended"
    )
    amount: Mapped[int | None] = mapped_column(BigInteger, comment="Signed ledger amount.")
    currency: Mapped[str | None] = mapped_column(String(3))
    subscription_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("subscriptions.id"))
    at: Mapped[datetime] = mapped_column(server_default=func.now())
