"""Subscription-side effects shared by the event handlers and the domains that end or extend
access (refunds, chargebacks, maintenance), and the reads behind the subscriptions, channel
access and access-feed routes.

The access feed is read under `LOCK TABLE access_changes IN SHARE MODE`: the lock waits for
every transaction that has inserted rows to finish, so when the read happens no lower id can
still appear later; a follower that remembers the last id it saw never skips a change.
Writers wait only for the duration of one read.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import String, Table, bindparam, func, select, text, true
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.db import ArrayInsert, DriverStatement, Reader, asked_keys, session_driver
from app.errors import ServiceUnavailable
from app.models import AccessChange, Channel, Subscription
from app.subscriptions.access import (
    ACCESS_COLUMNS,
    SubscriptionState,
    channel_access,
    subscription_access,
)
from app.subscriptions.schemas import AccessOut, SubscriptionOut

LOCK_CHANNEL_FEEDS = DriverStatement(
    text(
        "SELECT pg_advisory_xact_lock(hashtextextended('channel:' || channel, 0))"
        " FROM unnest(CAST(:channels AS text[])) WITH ORDINALITY AS c(channel, position)"
        " ORDER BY position"
    )
)
"""Each channel's feed lock, taken in the order given (sorted, so two writers cannot deadlock)."""
TRY_LOCK_CHANNEL_FEEDS = DriverStatement(
    text(
        "SELECT channel FROM unnest(CAST(:channels AS text[])) AS c(channel)"
        " WHERE pg_try_advisory_xact_lock(hashtextextended('channel:' || channel, 0))"
    )
)
"""The channels whose feed lock is free, locked now; never waits for one another transaction
holds (`record_expired_access`)."""
TOUCH_CHANNELS = DriverStatement(
    text("UPDATE channels SET updated_at = now() WHERE id = ANY(CAST(:channels AS text[]))")
)
"""A new row version of each channel, under its feed lock. The event processor's transactions
are SERIALIZABLE: their snapshot is taken when they claim their events, and the feed lock does
not make them see what a writer committed meanwhile (a `billing expire-access` run, a refund,
a maintenance completion). Updating a row another transaction changed after the snapshot is a
serialization failure, so such a transaction is run again with a fresh snapshot instead of
deciding on a stale last entry (appending the same change twice, or missing one)."""
_FEED_SUBSCRIPTIONS = cast(Table, Subscription.__table__)
_FEED_CHANNELS = cast(Table, Channel.__table__)
_WANTED = (
    func.unnest(bindparam("channels", type_=ARRAY(String)))
    .table_valued("channel_id")
    .render_derived(name="wanted")
)
_LAST_CHANGE = (
    select(AccessChange.has_access, AccessChange.access_until, AccessChange.reason)
    .where(AccessChange.channel_id == _WANTED.c.channel_id)
    .order_by(AccessChange.id.desc())
    .limit(1)
    .lateral("last_change")
)
CHANNELS_FEED_STATE = DriverStatement(
    select(
        _WANTED.c.channel_id.label("channel"),
        _FEED_CHANNELS.c.account_id.label("owner"),
        _LAST_CHANGE.c.has_access.label("last_has_access"),
        _LAST_CHANGE.c.access_until.label("last_access_until"),
        _LAST_CHANGE.c.reason.label("last_reason"),
        *(_FEED_SUBSCRIPTIONS.c[name] for name in ACCESS_COLUMNS),
    ).select_from(
        _WANTED.outerjoin(_FEED_CHANNELS, _FEED_CHANNELS.c.id == _WANTED.c.channel_id)
        .outerjoin(_LAST_CHANGE, true())
        .outerjoin(_FEED_SUBSCRIPTIONS, _FEED_SUBSCRIPTIONS.c.channel_id == _WANTED.c.channel_id)
    ),
    named=True,
)
"""What `record_access_changes` decides on, in one statement for many channels: per channel,
its owner, the last feed entry's access (NULL when there is none) and the access columns of
its subscriptions (one row with NULL columns when it has none); rows with these as
attributes."""
_ACCESS_CHANGES = cast(Table, AccessChange.__table__)
ACCESS_CHANGE_COLUMNS = ("channel_id", "account_id", "has_access", "access_until", "reason")
NEW_ACCESS_CHANGES = ArrayInsert(_ACCESS_CHANGES, ACCESS_CHANGE_COLUMNS)
"""Appends feed entries in one statement, in order (`id` and `created_at` are the
database's)."""


async def record_access_change(
    session: AsyncSession, channel_id: str, settings: Settings, now: datetime
) -> bool:
    """`record_access_changes` for one channel (True when it appended)."""
    return bool(await record_access_changes(session, {channel_id: now}, settings))


async def record_access_changes(
    session: AsyncSession,
    channels_at: Mapping[str, datetime],
    settings: Settings,
    *,
    skip_held: bool = False,
) -> list[str]:
    """Append to the access feed for each channel whose access, at the time given for it,
    differs from its last entry (`has_access`, `access_until` or `reason`: a follower of the
    feed ends on what the access check answers, e.g. `past_due` then paid, or cancelling then
    resumed); returns those channels. Four statements whatever the
    number of channels, sent straight to the driver in the session's transaction (pending
    ORM changes are flushed first: `session_driver`).

    Serialized per channel with an advisory lock, so concurrent events for two subscriptions
    of one channel cannot both append the same change; a transaction whose snapshot predates
    another writer's commit fails to serialize instead (`TOUCH_CHANNELS`). `skip_held`: the
    channels whose lock another transaction holds are left out (not waited for)."""
    channels = sorted(channels_at)
    if not channels:
        return []
    driver = await session_driver(session)
    if skip_held:
        free = {row[0] for row in await TRY_LOCK_CHANNEL_FEEDS.fetch(driver, channels=channels)}
        channels = [channel for channel in channels if channel in free]
        if not channels:
            return []
    else:
        await LOCK_CHANNEL_FEEDS.execute(driver, channels=channels)
    await TOUCH_CHANNELS.execute(driver, channels=channels)
    rows: dict[str, list[Any]] = {}
    for row in await CHANNELS_FEED_STATE.fetch(driver, channels=channels):
        rows.setdefault(row.channel, []).append(row)
    changes: list[dict[str, Any]] = []
    for channel in channels:
        found = rows[channel]
        subscriptions: list[SubscriptionState] = [row for row in found if row.status is not None]
        access = channel_access(
            subscriptions,
            channels_at[channel],
            past_due_keeps_access=settings.past_due_keeps_access,
        )
        last = found[0]
        if last.last_has_access is None:
            if not access.has_access and access.access_until is None:
                continue  # nothing to say about a channel that never had access
        elif (last.last_has_access, last.last_access_until, last.last_reason) == (
            access.has_access,
            access.access_until,
            access.reason,
        ):
            continue
        changes.append(
            {
                "channel_id": channel,
                "account_id": last.owner or "",
                "has_access": access.has_access,
                "access_until": access.access_until,
                "reason": access.reason,
            }
        )
    await NEW_ACCESS_CHANGES.execute(driver, changes)
    return [str(change["channel_id"]) for change in changes]


async def _now(session: AsyncSession) -> datetime:
    now: datetime | None = await session.scalar(select(func.now()))
    assert now is not None
    return now


async def list_subscriptions(
    session: AsyncSession, settings: Settings, account_id: str
) -> list[SubscriptionOut]:
    rows = (
        await session.scalars(
            select(Subscription)
            .where(Subscription.account_id == account_id)
            .order_by(Subscription.created_at, Subscription.stripe_id)
        )
    ).all()
    now = await _now(session)
    result = []
    for row in rows:
        access = subscription_access(row, now, past_due_keeps_access=settings.past_due_keeps_access)
        result.append(
            SubscriptionOut(
                id=row.stripe_id,
                channel_id=row.channel_id,
                plan=row.plan_code,
                status=row.status,
                cancel_at_period_end=row.cancel_at_period_end,
                cancel_at=row.cancel_at,
                current_period_end=row.current_period_end,
                access_until=access.access_until,
                extension_days=row.extension_days,
                has_access=access.has_access,
                reason=access.reason,
            )
        )
    return result


_ASKED = asked_keys("channel_id")
_SUBSCRIPTIONS = Subscription.__table__
CHANNEL_ACCESS = select(
    _ASKED.c.channel_id, func.now().label("now"), *(_SUBSCRIPTIONS.c[n] for n in ACCESS_COLUMNS)
).select_from(_ASKED.outerjoin(_SUBSCRIPTIONS, _SUBSCRIPTIONS.c.channel_id == _ASKED.c.channel_id))
"""For each channel id in `keys`: the database time and the access columns of the channel's
subscriptions, in one statement (one row with NULL columns for a channel that has none), for
`Reader.by_key`."""


async def get_channel_access(reader: Reader, settings: Settings, channel_id: str) -> AccessOut:
    """Access from the channel's subscriptions; an unknown channel has none (`no_subscription`).
    One autocommit statement, shared with the checks asked at the same moment: no transaction,
    and the clock is the database's."""
    rows = await reader.by_key(CHANNEL_ACCESS, channel_id)
    now: datetime = rows[0].now
    subscriptions: list[SubscriptionState] = [row for row in rows if row.status is not None]
    access = channel_access(
        subscriptions, now, past_due_keeps_access=settings.past_due_keeps_access
    )
    return AccessOut(
        channel_id=channel_id,
        has_access=access.has_access,
        access_until=access.access_until,
        reason=access.reason,
    )


async def list_access_changes(
    session: AsyncSession, *, after: int, limit: int
) -> list[AccessChange]:
    try:
        await session.execute(text("SET LOCAL lock_timeout = '5s'"))
        await session.execute(text("LOCK TABLE access_changes IN SHARE MODE"))
    except DBAPIError:
        raise ServiceUnavailable("The access feed is busy; retry shortly") from None
    return list(
        (
            await session.scalars(
                select(AccessChange)
                .where(AccessChange.id > after)
                .order_by(AccessChange.id)
                .limit(limit)
            )
        ).all()
    )


async def record_expired_access(
    factory: async_sessionmaker[AsyncSession], settings: Settings, now: datetime | None = None
) -> int:
    """Access also ends by time alone (a period ends, an extension runs out) with no Stripe
    event: append those changes to the feed; returns how many entries were appended. Run
    periodically by the background workers. Each channel's last entry is one probe of
    `ix_access_changes_channel_id_id`: the sweep reads as many entries as there are channels
    (every entry's channel has a row), never the feed's history.

    The channels whose feed lock another transaction holds are left to the next run (that
    writer appends what access is then, often this very end): an event batch takes feed
    locks once per group that changes access, so it may hold a later channel's and then
    want an earlier one's, and a sweep holding the earlier one while waiting for the later
    would deadlock with it (Postgres breaks that after `deadlock_timeout`, stalling the
    events ~1 s and failing one side)."""
    now = now or datetime.now(UTC)
    latest = (
        select(AccessChange.has_access, AccessChange.access_until)
        .where(AccessChange.channel_id == Channel.id)
        .order_by(AccessChange.id.desc())
        .limit(1)
        .lateral("last_change")
    )
    async with factory() as session, session.begin():
        expired = (
            await session.scalars(
                select(Channel.id)
                .join(latest, true())
                .where(latest.c.has_access.is_(True), latest.c.access_until <= now)
            )
        ).all()
        recorded = await record_access_changes(
            session, dict.fromkeys(expired, now), settings, skip_held=True
        )
    return len(recorded)
