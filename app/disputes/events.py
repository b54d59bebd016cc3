"""Chargeback effects of mirrored Stripe disputes (called by the webhook consumer).

Hook point for the balance withdrawal/reinstatement of a disputed top-up and the end of access
after a lost dispute. Until that lands, a mirrored dispute has no effect beyond the mirror
(`disputes` row and `payments.disputed`)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.models import Dispute


async def on_dispute_mirrored(
    session: AsyncSession, dispute: Dispute, event_type: str, settings: Settings
) -> None:
    return None
