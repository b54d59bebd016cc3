"""Our own records: checkout sessions, the balance ledger, activity, idempotency, access feed."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Identity,
    Index,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, Timestamped


class CheckoutSession(Timestamped, Base):
    """A Stripe Checkout session we created. The row is committed as `pending` before Stripe is
    called; its id is the Stripe idempotency key."""

    __tablename__ = "checkout_sessions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    purpose: Mapped[str] = mapped_column(String(32), comment="subscription|top_up|debt_repayment")
    channel_id: Mapped[str | None] = mapped_column(ForeignKey("channels.id"), index=True)
    plan_code: Mapped[str | None] = mapped_column(String(64))
    amount: Mapped[int | None] = mapped_column(BigInteger, comment="Minor units (payment mode).")
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16), comment="pending|open|complete|expired|failed")
    payment_status: Mapped[str | None] = mapped_column(String(32))
    stripe_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    url: Mapped[str | None] = mapped_column(Text)
    success_url: Mapped[str] = mapped_column(Text)
    cancel_url: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[datetime | None]
    stripe_subscription_id: Mapped[str | None] = mapped_column(
        String(255), index=True, comment="Found by it when a subscription event fulfils it."
    )
    stripe_payment_intent_id: Mapped[str | None] = mapped_column(String(255))
    fulfilled_at: Mapped[datetime | None] = mapped_column(
        comment="When a payment event confirmed it (ledger credit or live subscription)."
    )
    request_digest: Mapped[str | None] = mapped_column(
        String(64),
        index=True,
        comment="The request that made it (its Idempotency-Key scope and body); a retry of "
        "that request after Stripe failed reuses the row, hence its Stripe idempotency key.",
    )


Index(  # the account's sessions of the last minute, on every checkout (app/rate_limit.py)
    "ix_checkout_sessions_account_id_created_at",
    CheckoutSession.account_id,
    CheckoutSession.created_at,
)
Index(  # a debt repayment's paid-but-not-credited repayments (app/checkout/service.py)
    "ix_checkout_sessions_repayments_paid",
    CheckoutSession.account_id,
    postgresql_where=(CheckoutSession.purpose == "debt_repayment")
    & (CheckoutSession.payment_status == "paid")
    & CheckoutSession.fulfilled_at.is_(None),
)


class LedgerEntry(Base):
    """One movement of the prepaid balance. Balance and debt are derived from the sum:
    balance = max(0, sum), debt = max(0, -sum). Unique per (account, kind, source) so every
    credit or debit is applied once."""

    __tablename__ = "ledger_entries"
    __table_args__ = (UniqueConstraint("account_id", "kind", "source_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    kind: Mapped[str] = mapped_column(
        String(32),
        comment="top_up|debt_repayment|conversation|meta_fee|refund|dispute_withdrawal|"
        "dispute_reinstatement|balance_credit",
    )
    source_id: Mapped[str] = mapped_column(
        String(255), comment="What caused it (session, charge id…)"
    )
    amount: Mapped[int] = mapped_column(
        BigInteger, comment="Signed minor units: + credit, - debit."
    )
    currency: Mapped[str] = mapped_column(String(3))
    description: Mapped[str | None] = mapped_column(Text)
    occurred_at: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


Index(  # the ledger newest first, and the balance's sum (index-only: the amounts are in it)
    "ix_ledger_entries_account_id_id_amount",
    LedgerEntry.account_id,
    LedgerEntry.id.desc(),
    postgresql_include=["amount"],
)


class Activity(Base):
    """Product activity reported by other services; any activity ends the zero-usage refund right."""

    __tablename__ = "activities"
    __table_args__ = (UniqueConstraint("account_id", "external_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    external_id: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(32))
    occurred_at: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class IdempotencyRecord(Base):
    """A POST answered under an Idempotency-Key, replayed for 24 hours."""

    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("principal_sub", "account_id", "method", "path", "key"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    principal_sub: Mapped[str] = mapped_column(String(255))
    account_id: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    response_status: Mapped[int | None]
    response_body: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), index=True)


class AccessChange(Base):
    """The ordered feed of channel access changes (`GET /v1/access-changes?after=<id>`)."""

    __tablename__ = "access_changes"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    channel_id: Mapped[str] = mapped_column(String(64))
    account_id: Mapped[str] = mapped_column(String(64))
    has_access: Mapped[bool]
    access_until: Mapped[datetime | None]
    reason: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


Index(  # a channel's last entry: the feed's writers and the access-expiry sweep
    "ix_access_changes_channel_id_id", AccessChange.channel_id, AccessChange.id
)
