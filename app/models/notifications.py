"""The email outbox: written in the same transaction as what it reports, delivered by a worker."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Index, Integer, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base


class OutboxEmail(Base):
    """One email to send. `dedupe_key` (e.g. `refund-reply:<response id>`) makes enqueueing
    idempotent: the same notice is never queued, so never sent, twice. Delivery is at-most-once
    (see app/notifications/worker.py): a row left in `sending` by a crashed worker is parked as
    `failed` with `last_error` starting `delivery_uncertain`, never resent automatically."""

    __tablename__ = "outbox_emails"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    dedupe_key: Mapped[str] = mapped_column(String(255), unique=True)
    to_address: Mapped[str] = mapped_column(String(320))
    subject: Mapped[str] = mapped_column(String(998))
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(
        String(16), server_default="pending", comment="pending|sending|sent|failed"
    )
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    refusals: Mapped[int] = mapped_column(
        Integer,
        server_default="0",
        comment="Attempts the relay refused (an unreachable relay is not one); "
        "parked as failed at EMAIL_MAX_ATTEMPTS.",
    )
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime] = mapped_column(server_default=func.now())
    claimed_at: Mapped[datetime | None] = mapped_column(
        comment="When a worker marked it `sending` (committed before the SMTP conversation)."
    )
    sent_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


Index(
    "ix_outbox_emails_due",
    OutboxEmail.next_attempt_at,
    postgresql_where=OutboxEmail.status == "pending",
)
Index(  # park_stale_sending: the rows in flight, however many sent ones the table holds
    "ix_outbox_emails_sending",
    OutboxEmail.claimed_at,
    postgresql_where=OutboxEmail.status == "sending",
)
