"""Refund effects of mirrored Stripe refunds (called by the webhook consumer).

Hook point for the refund workflow: matching a Stripe refund to the refund request that asked
for it, the ledger adjustment of a refunded top-up and the cancellation of a refunded
subscription. Until that workflow lands, a mirrored refund has no effect beyond the mirror
(`refunds` row and `payments.amount_refunded`)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.models import Refund
from app.stripe_gateway import StripeGateway


async def on_refund_mirrored(
    session: AsyncSession, refund: Refund, settings: Settings, stripe: StripeGateway
) -> None:
    return None
