"""1msg accounts (billing identities) and the channels they own."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, Timestamped


class Account(Timestamped, Base):
    """A 1msg account as billing sees it. Created on first use; one Stripe customer at most."""

    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    currency: Mapped[str | None] = mapped_column(
        String(3),
        comment="Set by the first payment or usage charge; afterwards all money must match.",
    )
    email: Mapped[str | None] = mapped_column(String(320), comment="Billing contact from tokens.")
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    first_paid_at: Mapped[datetime | None] = mapped_column(
        comment="First successful Stripe payment; gates the Customer Portal."
    )


class Channel(Timestamped, Base):
    """A WhatsApp channel, owned by the account whose checkout first named it."""

    __tablename__ = "channels"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
