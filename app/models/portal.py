"""Customer Portal sessions we asked Stripe for (kept for the per-account rate limit and audit)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base


class PortalSession(Base):
    """One Stripe Customer Portal session. Committed as `pending` before Stripe is called."""

    __tablename__ = "portal_sessions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    principal_sub: Mapped[str] = mapped_column(String(255), comment="Who asked (token `sub`).")
    status: Mapped[str] = mapped_column(String(16), comment="pending|created|failed")
    stripe_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    url: Mapped[str | None] = mapped_column(Text)
    return_url: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


Index(
    "ix_portal_sessions_account_id_created_at", PortalSession.account_id, PortalSession.created_at
)
