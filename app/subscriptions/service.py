"""Subscription-side effects shared by the event handlers and the domains that end or extend
access (refunds, chargebacks, maintenance)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.models import AccessChange, Channel, Subscription
from app.subscriptions.access import Access, channel_access


async def current_channel_access(
    session: AsyncSession, channel_id: str, settings: Settings, now: datetime
) -> Access:
    subscriptions = list(
        (
            await session.scalars(select(Subscription).where(Subscription.channel_id == channel_id))
        ).all()
    )
    return channel_access(subscriptions, now, past_due_keeps_access=settings.past_due_keeps_access)


async def record_access_change(
    session: AsyncSession, channel_id: str, settings: Settings, now: datetime
) -> AccessChange | None:
    """Append to the access feed when the channel's access differs from the last entry.

    Serialized per channel with an advisory lock, so concurrent events for two subscriptions
    of one channel cannot both append the same change."""
    await session.execute(
        select(func.pg_advisory_xact_lock(func.hashtextextended("channel:" + channel_id, 0)))
    )
    access = await current_channel_access(session, channel_id, settings, now)
    last = await session.scalar(
        select(AccessChange)
        .where(AccessChange.channel_id == channel_id)
        .order_by(AccessChange.id.desc())
        .limit(1)
    )
    if last is not None and (last.has_access, last.access_until) == (
        access.has_access,
        access.access_until,
    ):
        return None
    if last is None and not access.has_access and access.access_until is None:
        return None
    account_id = await session.scalar(select(Channel.account_id).where(Channel.id == channel_id))
    change = AccessChange(
        channel_id=channel_id,
        account_id=account_id or "",
        has_access=access.has_access,
        access_until=access.access_until,
        reason=access.reason,
    )
    session.add(change)
    await session.flush()
    return change
