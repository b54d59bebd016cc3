"""Maintenance windows (policy section 5): the three-business-day limit, client emails and the
access extension, pushed to Stripe.

Length. A window is half-open `[starts_at, ends_at)`; its length is the number of business days
(weekends and `BUSINESS_HOLIDAYS_COUNTRY` holidays excluded) it touches in `BUSINESS_TIMEZONE`.
Overlapping or adjoining windows are one suspension for the client, so the limit applies to the
business days touched by the window together with every window overlapping or adjoining it
(open windows by their planned end, completed ones by their actual end). A scheduled window
that would make that more than 3 is refused (422 `maintenance_too_long`); an emergency one is
recorded with `exceeds_policy_limit`. Completion recomputes both with the actual end: an overrun
cannot be refused after the fact, so it is flagged.

Completion (`complete_window`), idempotent:
1. One transaction: the window gets its actual end; every subscription live during it (a live
   status per app/subscriptions/access.py, or ended since at the end of its paid period because
   the client had turned off renewal, and a period `[current_period_start, access_until)`
   overlapping the window; or paid before the window's end for a period Stripe renewed only
   after the window's start (inside the window or after it), whatever its status now unless it
   has ended: a renewal declined since, `past_due` or `unpaid`, keeps the days for when it is
   paid; with `PAST_DUE_KEEPS_ACCESS`, one `unpaid` only since the window started
   (`status_since`) was `past_due` with access until then and counts as one `past_due` now;
   one live now whose period the window fell
   in was paid only after it was not live then: `incomplete`, or `past_due` without
   `PAST_DUE_KEEPS_ACCESS`) gets one `maintenance_extensions` row (unique per window and
   subscription) for the calendar days in `BUSINESS_TIMEZONE` the service was unavailable, less
   the dates an overlapping window already credited to it; `subscriptions.extension_days` grows
   by the same days, an `AccessChange` is appended, and one email per account whose
   subscriptions got days is queued in the outbox (`maintenance:<window>:<account>`). Repeating the completion finds the rows and adds
   nothing.
2. Stripe, per extension: `trial_end` = the new `access_until` with `proration_behavior=none`
   (Stripe makes the subscription `trialing`, a live state, and the next invoice moves by the
   same days, nothing is credited or charged for it), with the idempotency key
   `billing:maintenance-extension:<row id>`. The target is an absolute time fixed when the row
   is created (`stripe_trial_end`), together with `period_days_at_target`: the subscription's
   `extension_days` at that moment, which is how many extension days Stripe's period holds once
   Stripe's `trial_end` reaches the target. Sending the same absolute `trial_end` again, with
   the same key, changes nothing, so every retry is safe. Only `active` and `trialing`
   subscriptions are pushed (`past_due` ones would have their unpaid invoice side-stepped;
   others have no next charge), and not those Stripe is set to end before the target
   (`set_to_end_before`: the client turned off renewal, and Stripe would still end them at
   `cancel_at`, the days lost): the rest are `skipped`. A refusal from Stripe (e.g. the
   subscription ended there) marks the row `rejected`, and
   so does a target Stripe's period has already passed without it (pushing it would shorten a
   paid period into a trial, charged again at its end: judged on Stripe's subscription, read
   before each push, since our mirror may not have its renewal yet); either way the client keeps the extension through `access_until`.
3. Which days Stripe's period already includes is never a counter we must remember to bump: it
   is derived from the Stripe snapshot we hold (`count_extension_days_in_period`): the largest
   `period_days_at_target` of the subscription's pushed rows whose target Stripe's stored
   `trial_end` has reached. It is recomputed whenever that snapshot changes, by the webhook
   consumer (in the same transaction that stores Stripe's new period end) and by the pusher
   when it records Stripe's answer. So a crash anywhere (before the call, after Stripe applied
   it but before we recorded the answer, before the webhook arrives) never counts a day twice
   nor drops one: `access_until` = Stripe's period end + the days that period does not hold,
   both read from the same snapshot.
4. Pending pushes (Stripe down, or a crash) are retried with the same key by
   `retry_pending_extensions`: every minute in the background workers, or
   `billing push-extensions` where they are off; repeating the completion also retries.

A maintenance window never touches payments, invoices or refunds: it is never grounds for a
refund (policy section 5): the refund eligibility quote ends a paid period before the
extension days pushed to Stripe moved its end (app/refunds/service.py `_paid_period_ends`).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Literal

import structlog
from sqlalchemy import (
    ColumnElement,
    DateTime,
    String,
    any_,
    bindparam,
    func,
    literal_column,
    or_,
    select,
    text,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.calendar import BusinessCalendar
from app.config import Settings
from app.errors import (
    MaintenanceAlreadyCompleted,
    MaintenanceTooLong,
    NotFound,
    StripeUnavailable,
    Unprocessable,
)
from app.maintenance.schemas import (
    MaintenanceWindowComplete,
    MaintenanceWindowCreate,
    MaintenanceWindowList,
    MaintenanceWindowOut,
    StripeUpdates,
)
from app.models import (
    Account,
    Invoice,
    MaintenanceExtension,
    MaintenanceWindow,
    OutboxEmail,
    Payment,
    Subscription,
)
from app.notifications.outbox import enqueue_email
from app.stripe_gateway import StripeGateway, StripeRequestRejected, idempotency_key
from app.subscriptions.access import (
    LIVE_STATUSES,
    access_until,
    cancel_access_until,
    ended_at_period_end,
)
from app.subscriptions.service import record_access_change

log = structlog.get_logger()

POLICY_LIMIT_BUSINESS_DAYS = 3
STRIPE_PUSHABLE = frozenset({"active", "trialing"})
TERMINAL_STATUSES = frozenset({"canceled", "incomplete_expired"})
_LOCK = "billing:maintenance-windows"


class MaintenanceWindowNotFound(NotFound):
    code, title = "maintenance_window_not_found", "Maintenance window not found"


def dedupe_key(window_id: uuid.UUID, account_id: str) -> str:
    return f"maintenance:{window_id}:{account_id}"


def _effective_end(window: MaintenanceWindow) -> datetime:
    return window.ended_at if window.ended_at is not None else window.ends_at


async def _serialize(session: AsyncSession) -> None:
    """Window creation and completion run one at a time (the overlap rules read other windows)."""
    await session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": _LOCK})


async def _suspension_business_days(
    session: AsyncSession,
    calendar: BusinessCalendar,
    start: datetime,
    end: datetime,
    exclude: uuid.UUID | None,
) -> int:
    """Business days touched by [start, end) together with every window overlapping or
    adjoining it, transitively (one continuous suspension)."""
    windows = list((await session.execute(select(MaintenanceWindow))).scalars())
    cluster_start, cluster_end = start, end
    grown = True
    members: set[uuid.UUID] = set()
    while grown:
        grown = False
        for window in windows:
            if window.id == exclude or window.id in members:
                continue
            w_end = _effective_end(window)
            if window.starts_at <= cluster_end and w_end >= cluster_start:
                members.add(window.id)
                cluster_start = min(cluster_start, window.starts_at)
                cluster_end = max(cluster_end, w_end)
                grown = True
    days: set[date] = set(calendar.local_dates_touched(start, end))
    for window in windows:
        if window.id in members:
            days.update(calendar.local_dates_touched(window.starts_at, _effective_end(window)))
    return sum(1 for day in days if calendar.is_business_day(day))


async def create_window(
    session: AsyncSession, settings: Settings, body: MaintenanceWindowCreate, actor: str
) -> MaintenanceWindowOut:
    await _serialize(session)
    business_days = await _suspension_business_days(
        session, settings.calendar, body.starts_at, body.ends_at, exclude=None
    )
    exceeds = business_days > POLICY_LIMIT_BUSINESS_DAYS
    if exceeds and body.kind == "scheduled":
        raise MaintenanceTooLong(
            f"The suspension would touch {business_days} business days in "
            f"{settings.business_timezone}; scheduled maintenance may last at most "
            f"{POLICY_LIMIT_BUSINESS_DAYS}"
        )
    window = MaintenanceWindow(
        kind=body.kind,
        reason=body.reason,
        status="open",
        starts_at=body.starts_at,
        ends_at=body.ends_at,
        business_days=business_days,
        exceeds_policy_limit=exceeds,
        created_by=actor,
    )
    session.add(window)
    await session.flush()
    await session.refresh(window)
    log.info(
        "maintenance.window_created",
        window_id=str(window.id),
        kind=window.kind,
        business_days=business_days,
        exceeds_policy_limit=exceeds,
    )
    return await _out(session, window)


async def get_window(session: AsyncSession, window_id: uuid.UUID) -> MaintenanceWindowOut:
    window = await session.get(MaintenanceWindow, window_id)
    if window is None:
        raise MaintenanceWindowNotFound(f"No maintenance window {window_id}")
    return await _out(session, window)


async def list_windows(session: AsyncSession, limit: int = 100) -> MaintenanceWindowList:
    windows = (
        await session.execute(
            select(MaintenanceWindow)
            .order_by(MaintenanceWindow.starts_at.desc(), MaintenanceWindow.id)
            .limit(limit)
        )
    ).scalars()
    return MaintenanceWindowList(items=[await _out(session, window) for window in windows])


async def _out(session: AsyncSession, window: MaintenanceWindow) -> MaintenanceWindowOut:
    counts: dict[str, int] = {
        stripe_status: count
        for stripe_status, count in (
            await session.execute(
                select(MaintenanceExtension.stripe_status, func.count())
                .where(MaintenanceExtension.window_id == window.id)
                .group_by(MaintenanceExtension.stripe_status)
            )
        ).all()
    }
    notified = (
        await session.execute(
            select(func.count())
            .select_from(OutboxEmail)
            .where(OutboxEmail.dedupe_key.startswith(f"maintenance:{window.id}:", autoescape=True))
        )
    ).scalar_one()
    return MaintenanceWindowOut(
        id=window.id,
        kind=window.kind,
        reason=window.reason,
        status=window.status,
        starts_at=window.starts_at,
        ends_at=window.ends_at,
        ended_at=window.ended_at,
        business_days=window.business_days,
        exceeds_policy_limit=window.exceeds_policy_limit,
        unavailable_days=window.unavailable_days,
        created_by=window.created_by,
        created_at=window.created_at,
        completed_by=window.completed_by,
        completed_at=window.completed_at,
        subscriptions_extended=sum(counts.values()),
        accounts_notified=notified,
        stripe_updates=StripeUpdates(
            applied=counts.get("applied", 0),
            pending=counts.get("pending", 0),
            rejected=counts.get("rejected", 0),
            skipped=counts.get("skipped", 0),
        ),
    )


def _live_now(subscription: Subscription, settings: Settings) -> bool:
    """A live status (as app/subscriptions/access.py counts it), or ended at the end of its
    paid period (the client had turned off renewal: the days it lost follow its end)."""
    return (
        subscription.status in LIVE_STATUSES
        or (settings.past_due_keeps_access and subscription.status == "past_due")
        or ended_at_period_end(subscription)
    )


def _live_during(
    subscription: Subscription,
    start: datetime,
    end: datetime,
    settings: Settings,
    paid_before_end: bool = False,
    unpaid_during: str | None = None,
) -> bool:
    """A live status (as app/subscriptions/access.py counts it), or ended since at the end of
    its paid period (the client had turned off renewal: the days it lost follow its end), and a
    paid period `[current_period_start, access_until)` overlapping the half-open window; or,
    when Stripe has renewed it since the window started (inside it or after it), a payment
    made before the window's end (the period it paid ran until the renewal, so it covered the
    window, or its start up to the renewal), whatever its status now unless it has ended: live
    is what it was during the window, and a renewal declined since (`past_due` without access,
    `unpaid`) keeps the days for when it is paid.
    With `PAST_DUE_KEEPS_ACCESS`, one `unpaid` only since the window started (`status_since`)
    was `past_due` or paid until then, with access: judged as one `past_due` now.
    Likewise one live now whose period the window fell in was paid only after the window
    (`unpaid_during`, see `_unpaid_during`) was not live during it: `incomplete` then (its first
    payment in flight), or `past_due` (a declined renewal) without `PAST_DUE_KEEPS_ACCESS`."""
    if subscription.access_revoked_at is not None and subscription.access_revoked_at <= start:
        return False
    # `unpaid` only since the window started (with `PAST_DUE_KEEPS_ACCESS`): it was `past_due`
    # (or paid) until then, which kept access, so it was live during the window as one still
    # `past_due` is; its days count once it is paid.
    past_due_then = (
        settings.past_due_keeps_access
        and subscription.status == "unpaid"
        and subscription.status_since is not None
        and subscription.status_since > start
    )
    if not past_due_then and not _live_now(subscription, settings):
        # Its status now is not what it was during the window: a period paid before the
        # window's end ran until Stripe renewed it, inside or after the window, so it was live
        # then, and a renewal declined since (`past_due`, `unpaid`) does not take back the days
        # it lost: they count once it is paid again. One ended since (not at its period end)
        # never gives access again: nothing to extend.
        return (
            paid_before_end
            and subscription.access_revoked_at is None
            and subscription.status not in TERMINAL_STATUSES
        )
    if unpaid_during == "first" or (
        unpaid_during == "renewal" and not settings.past_due_keeps_access
    ):
        # live now, but its period was paid only after the window: it had no access during it
        return False
    until = access_until(subscription)
    period_start = subscription.current_period_start or start
    return until is not None and (period_start < end or paid_before_end) and until > start


@dataclass
class _WindowBilling:
    """What the subscriptions' invoices and payments say about the window, by Stripe id: where
    the period it fell in was billed from (`billed`: the latest invoice with something due,
    voided ones billing nothing, whose `period_end` is at or before the window's start; a
    subscription invoice's `period_end` is where the period it bills starts, Stripe's invoice
    `period_*` describing the one before), where its first invoice billed from (`first`), where
    its first invoice with something due billed from (`first_due`), and
    where each period paid before the window's end billed from: by a succeeded payment
    (`paid_by_payments`) or by Stripe's paid invoice (`paid_by_invoices`; its payment rows
    may not be mirrored yet)."""

    billed: dict[str, datetime] = field(default_factory=dict)
    first: dict[str, datetime] = field(default_factory=dict)
    first_due: dict[str, datetime] = field(default_factory=dict)
    paid_by_payments: dict[str, list[datetime | None]] = field(default_factory=dict)
    paid_by_invoices: dict[str, list[datetime]] = field(default_factory=dict)

    def paid_in_time(self, stripe_id: str, *, invoices: bool) -> bool:
        """A period from the one the window fell in on (any, when none was billed before it)
        was paid before the window's end; by Stripe's paid invoices too with `invoices`."""
        paid = list(self.paid_by_payments.get(stripe_id, []))
        if invoices:
            paid += self.paid_by_invoices.get(stripe_id, [])
        billed = self.billed.get(stripe_id)
        if billed is None:
            return bool(paid)
        return any(start is not None and start >= billed for start in paid)


async def _window_billing(
    session: AsyncSession, stripe_ids: Sequence[str], start: datetime, end: datetime
) -> _WindowBilling:
    """`_WindowBilling` of these subscriptions for the window `[start, end)`: one query for
    their invoices, one for their subscription payments made before `end`."""
    facts = _WindowBilling()
    if not stripe_ids:
        return facts
    # one array parameter, however many subscriptions (an `IN` list takes one per id, and
    # Postgres takes at most 32767)
    ids = bindparam("stripe_ids", list(stripe_ids), type_=ARRAY(String))
    invoices = await session.execute(
        select(
            Invoice.stripe_subscription_id,
            Invoice.period_end,
            Invoice.amount_due,
            Invoice.status,
            Invoice.paid_at,
        ).where(
            Invoice.stripe_subscription_id == any_(ids),
            Invoice.period_end.is_not(None),
        )
    )
    for of, period_end, amount_due, status, paid_at in invoices.all():
        if of is None or period_end is None:
            continue
        facts.first[of] = min(facts.first.get(of, period_end), period_end)
        if amount_due > 0 and status != "void":  # void: nothing due
            facts.first_due[of] = min(facts.first_due.get(of, period_end), period_end)
            if period_end <= start:
                facts.billed[of] = max(facts.billed.get(of, period_end), period_end)
        if status == "paid" and paid_at is not None and paid_at < end:
            facts.paid_by_invoices.setdefault(of, []).append(period_end)
    # A payment's subscription is its own, else (none mirrored on it) its invoice's: the two
    # cases read apart, each through an index (`coalesce` of the two could use none).
    paid_in_time = (
        Payment.purpose == "subscription",
        Payment.status == "succeeded",
        func.greatest(Invoice.paid_at, Payment.paid_at) < end,
    )
    period_from = func.coalesce(Invoice.period_end, Payment.paid_at)
    payments = await session.execute(
        union_all(
            select(Payment.stripe_subscription_id, period_from)
            .select_from(Payment)
            .outerjoin(Invoice, Invoice.stripe_id == Payment.stripe_invoice_id)
            .where(Payment.stripe_subscription_id == any_(ids), *paid_in_time),
            select(Invoice.stripe_subscription_id, period_from)
            .select_from(Payment)
            .join(Invoice, Invoice.stripe_id == Payment.stripe_invoice_id)
            .where(
                func.coalesce(Payment.stripe_subscription_id, "") == "",
                Invoice.stripe_subscription_id == any_(ids),
                *paid_in_time,
            ),
        )
    )
    for of, billed_from in payments.all():
        if of:
            facts.paid_by_payments.setdefault(of, []).append(billed_from)
    return facts


def _paid_before(
    subscriptions: Sequence[Subscription], billing: _WindowBilling, start: datetime
) -> set[str]:
    """Of these subscriptions renewed since the window started (current period starting
    after `start`: during the window, or after it), the Stripe ids of those that paid,
    before the window's end, the period the window fell in: a succeeded payment made before
    the end of the latest period billed at or before the window's start, or of one billed
    after it (`_WindowBilling`). That period ran until the renewal, so the subscription was
    live during the window, also when the renewal inside it was declined. An older payment
    does not count: a renewal declined before the window left it unpaid through it, however
    long ago it had been paid."""
    return {
        s.stripe_id
        for s in subscriptions
        if s.current_period_start is not None
        and s.current_period_start > start
        and billing.paid_in_time(s.stripe_id, invoices=False)
    }


def _unpaid_during(
    subscriptions: Sequence[Subscription],
    billing: _WindowBilling,
    settings: Settings,
    end: datetime,
) -> dict[str, str]:
    """Of these subscriptions live now with a current period that began before `end`, those
    whose period the window fell in was billed but not paid before `end` (paid in time: that
    period, or a later one, by Stripe's invoice or by a payment mirrored for it;
    `_WindowBilling`), by Stripe id: `first` when it was the subscription's first invoice (it
    was `incomplete` during the window), else `renewal` (`past_due`). A subscription begun
    during the window (none of its invoices billed before it started) whose first invoice, with
    something due, was not paid before `end` is `first` too: `incomplete` from its checkout
    through the window (a delayed payment method)."""
    unpaid: dict[str, str] = {}
    for s in subscriptions:
        if (
            s.current_period_start is None
            or s.current_period_start >= end
            or not _live_now(s, settings)
            or billing.paid_in_time(s.stripe_id, invoices=True)
        ):
            continue
        billed = billing.billed.get(s.stripe_id)
        first = billing.first.get(s.stripe_id)
        if billed is not None and first is not None:
            unpaid[s.stripe_id] = "first" if billed <= first else "renewal"
        elif (
            billed is None
            and first is not None
            and first < end
            and billing.first_due.get(s.stripe_id) == first  # not after a free trial
        ):
            unpaid[s.stripe_id] = "first"
    return unpaid


def _access_reaches_past(start: datetime) -> ColumnElement[bool]:
    """`access_until` (Stripe's period end plus the extension days its period does not hold)
    after `start`: only such a subscription can have been live during a window starting then
    (`_live_during` asks it of every one live now or ended at its period end; one paid before
    the window's end for a period renewed since the window started has a period end after
    that renewal, hence after `start`). Every subscription that ever ran is not read, only
    those whose period ends after `start` (`ix_subscriptions_current_period_end`) and those
    still holding days outside Stripe's period (`ix_subscriptions_days_outside_period`). Days
    are 24 hours, as in `access_until`."""
    outside = Subscription.extension_days - Subscription.extension_days_in_period
    return or_(
        Subscription.current_period_end > start,
        (Subscription.extension_days > Subscription.extension_days_in_period)
        & (
            Subscription.current_period_end + outside * literal_column("interval '24 hours'")
            > start
        ),
    )


async def complete_window(
    session_factory: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    settings: Settings,
    window_id: uuid.UUID,
    body: MaintenanceWindowComplete,
    actor: str,
    *,
    now: datetime | None = None,
) -> MaintenanceWindowOut:
    """Record the end, extend access and notify (one transaction), then push to Stripe."""
    moment = now or datetime.now(UTC)
    async with session_factory() as session, session.begin():
        await _record_completion(session, settings, window_id, body.ended_at, actor, moment)
    async with session_factory() as session:
        pending = list(
            (
                await session.execute(
                    select(MaintenanceExtension.subscription_id)
                    .where(
                        MaintenanceExtension.window_id == window_id,
                        MaintenanceExtension.stripe_status == "pending",
                    )
                    .order_by(MaintenanceExtension.id)
                )
            ).scalars()
        )
    for subscription_id in pending:
        # Stripe failing: the rest stay pending for the retry job, so the answer waits for
        # one push's timeouts and retries, not one per subscription of the window.
        if not await push_pending_extensions(session_factory, gateway, subscription_id):
            break
    async with session_factory() as session:
        window = await session.get(MaintenanceWindow, window_id)
        assert window is not None
        return await _out(session, window)


async def _record_completion(
    session: AsyncSession,
    settings: Settings,
    window_id: uuid.UUID,
    ended_at: datetime,
    actor: str,
    now: datetime,
) -> None:
    await _serialize(session)
    window = await session.get(MaintenanceWindow, window_id, with_for_update=True)
    if window is None:
        raise MaintenanceWindowNotFound(f"No maintenance window {window_id}")
    if window.status == "completed":
        if window.ended_at != ended_at:
            raise MaintenanceAlreadyCompleted(
                f"The window was completed with ended_at {window.ended_at.isoformat()}"
                if window.ended_at
                else "The window was completed"
            )
        return  # idempotent repeat: the extensions exist; Stripe pushes are retried by caller
    if ended_at <= window.starts_at:
        raise Unprocessable("ended_at must be after the window's starts_at")
    if ended_at > now:
        # Not back yet: the days credited are the dates the outage touched, so an end even a
        # few minutes ahead could credit a date on which nothing was unavailable.
        raise Unprocessable("ended_at is in the future; complete the window once it has ended")
    calendar = settings.calendar
    window.ended_at = ended_at
    window.status = "completed"
    window.completed_at = now
    window.completed_by = actor
    window.business_days = await _suspension_business_days(
        session, calendar, window.starts_at, ended_at, exclude=window.id
    )
    window.exceeds_policy_limit = window.business_days > POLICY_LIMIT_BUSINESS_DAYS
    window_dates = calendar.local_dates_touched(window.starts_at, ended_at)
    window.unavailable_days = len(window_dates)

    candidates = (
        await session.execute(
            select(Subscription)
            .where(
                _access_reaches_past(window.starts_at),
                or_(
                    Subscription.access_revoked_at.is_(None),
                    Subscription.access_revoked_at > window.starts_at,
                ),
            )
            # the order an event batch locks subscriptions in (by Stripe id): in any other,
            # holding one while waiting for another the batch holds could deadlock with it
            .order_by(Subscription.stripe_id)
            .with_for_update()
        )
    ).scalars()
    subscriptions = list(candidates)
    billing = await _window_billing(
        session, [s.stripe_id for s in subscriptions], window.starts_at, ended_at
    )
    paid_before_end = _paid_before(subscriptions, billing, window.starts_at)
    unpaid_during = _unpaid_during(subscriptions, billing, settings, ended_at)
    extended: dict[str, list[tuple[Subscription, int]]] = defaultdict(list)
    revoked: dict[str, list[Subscription]] = defaultdict(list)
    for subscription in subscriptions:
        if not _live_during(
            subscription,
            window.starts_at,
            ended_at,
            settings,
            paid_before_end=subscription.stripe_id in paid_before_end,
            unpaid_during=unpaid_during.get(subscription.stripe_id),
        ):
            continue
        if subscription.access_revoked_at is not None:
            # Live during the window, but a refund or a lost chargeback has ended its access
            # for good since (Stripe's cancellation may not be reported yet): the days would
            # give no access (as a finance `access_extension` is refused for it), so none are
            # added, and its client's notice says so instead of an access end it will not have.
            revoked[subscription.account_id].append(subscription)
            continue
        days = await _extend(session, settings, window, subscription, window_dates, now)
        if days:  # dates an overlapping window already credited give no days, and no notice
            extended[subscription.account_id].append((subscription, days))
    await _notify(session, settings, window, extended, revoked)
    log.info(
        "maintenance.window_completed",
        window_id=str(window.id),
        unavailable_days=window.unavailable_days,
        subscriptions=sum(len(v) for v in extended.values()),
        exceeds_policy_limit=window.exceeds_policy_limit,
    )


async def _extend(
    session: AsyncSession,
    settings: Settings,
    window: MaintenanceWindow,
    subscription: Subscription,
    window_dates: list[date],
    now: datetime,
) -> int:
    credited = set(
        (
            await session.execute(
                select(func.unnest(MaintenanceExtension.credited_dates)).where(
                    MaintenanceExtension.subscription_id == subscription.id
                )
            )
        ).scalars()
    )
    new_dates = [day for day in window_dates if day not in credited]
    days = len(new_dates)
    until_after = access_until(subscription)
    if until_after is not None:
        # Stripe speaks whole seconds; the target is compared with Stripe's trial_end.
        until_after = (until_after + timedelta(days=days)).replace(microsecond=0)
    pushable = (
        days > 0
        and until_after is not None
        and subscription.status in STRIPE_PUSHABLE
        and not set_to_end_before(subscription, until_after)
    )
    inserted = (
        await session.execute(
            insert(MaintenanceExtension)
            .values(
                window_id=window.id,
                subscription_id=subscription.id,
                account_id=subscription.account_id,
                channel_id=subscription.channel_id,
                days=days,
                credited_dates=new_dates,
                stripe_status="pending" if pushable else "skipped",
                stripe_trial_end=until_after if pushable else None,
                period_days_at_target=subscription.extension_days + days if pushable else None,
            )
            .on_conflict_do_nothing(
                index_elements=[
                    MaintenanceExtension.window_id,
                    MaintenanceExtension.subscription_id,
                ]
            )
            .returning(MaintenanceExtension.id)
        )
    ).scalar_one_or_none()
    if inserted is None or days == 0:
        return 0
    subscription.extension_days += days
    await session.flush()
    await record_access_change(session, subscription.channel_id, settings, now)
    return days


def set_to_end_before(subscription: Subscription, target: datetime) -> bool:
    """Stripe is set to end the subscription before `target`: its client turned off renewal
    (`cancel_at_period_end`, whose `cancel_at` is the period end) or a `cancel_at` comes
    first. Moving `trial_end` to the target would not move that end: Stripe would still cancel
    it at `cancel_at`, before its moved period end, and an end before the period end gives no
    days after it (`ended_at_period_end`), so the days would be lost. Such an extension is not
    pushed (`skipped`): it stays in `access_until`, and once Stripe ends the subscription at
    its period end the days follow that end."""
    return _ends_before(subscription.cancel_at_period_end, subscription.cancel_at, target)


def _ends_before(cancel_at_period_end: bool, cancel_at: datetime | None, target: datetime) -> bool:
    return cancel_at_period_end or (cancel_at is not None and cancel_at < target)


def _local(calendar: BusinessCalendar, moment: datetime) -> str:
    return moment.astimezone(calendar.zone).strftime("%Y-%m-%d %H:%M")


async def _notify(
    session: AsyncSession,
    settings: Settings,
    window: MaintenanceWindow,
    extended: dict[str, list[tuple[Subscription, int]]],
    revoked: dict[str, list[Subscription]],
) -> None:
    """One email per account with a subscription the window extended, or live during it
    whose access has ended since (`revoked`: listed with no days, as ended)."""
    if not extended and not revoked:
        return
    assert window.ended_at is not None
    calendar = settings.calendar
    accounts = {
        account.id: account
        for account in (
            await session.execute(
                select(Account).where(Account.id.in_(sorted({*extended, *revoked})))
            )
        ).scalars()
    }
    zone = settings.business_timezone
    start, end = _local(calendar, window.starts_at), _local(calendar, window.ended_at)
    for account_id in sorted({*extended, *revoked}):
        items = extended.get(account_id, [])
        account = accounts.get(account_id)
        if account is None or not account.email:
            log.warning("maintenance.no_billing_contact", account_id=account_id)
            continue
        lines = []
        for subscription, days in items:
            # the end the access check answers (`cancel_access_until`): Stripe set to end it at
            # a `cancel_at` inside its period ends it there, before the days could follow
            until = cancel_access_until(subscription)
            until_text = f", access now until {_local(calendar, until)}" if until else ""
            if until is not None and until != access_until(subscription):
                until_text = f", access until {_local(calendar, until)}, when it is set to end"
            if ended_at_period_end(subscription):
                until_text = f" after the end of its paid period{until_text}"
            elif not _live_now(subscription, settings):
                until_text = ", added to its access once its open invoice is paid"
            lines.append(f"- channel {subscription.channel_id}: +{days} day(s){until_text}")
        for ended in revoked.get(account_id, []):
            lines.append(
                f"- channel {ended.channel_id}: no days added, its access has ended "
                "(refunded or charged back)"
            )
        kind = "Scheduled maintenance" if window.kind == "scheduled" else "Emergency maintenance"
        body = (
            f"Hello,\n\n{kind} suspended the 1msg service from {start} to {end} ({zone}).\n"
            f"Reason: {window.reason}\n\n"
            "As set out in section 5 of our payments policy, the access period of your "
            "subscriptions is extended by the calendar days on which the service was "
            "unavailable, and the next charge of a renewing subscription moves by the same "
            "days:\n"
            + "\n".join(lines)
            + "\n\nThis work does not constitute a breach of the User Agreement and is not "
            "grounds for a refund. Questions: finance@1msg.io\n\n1msg billing\n"
        )
        await enqueue_email(
            session,
            dedupe_key=dedupe_key(window.id, account_id),
            to=account.email,
            subject=f"1msg service maintenance {start} – {end} ({zone})",
            body=body,
        )


async def push_pending_extensions(
    session_factory: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    subscription_id: uuid.UUID,
) -> bool:
    """Push the subscription's pending extensions to Stripe, oldest first (each target builds on
    the previous); stops at the first Stripe outage, leaving the rest pending, and then returns
    False (callers stop pushing other subscriptions too: Stripe is down for them as well).

    One pusher per subscription at a time (a transaction-level advisory lock, held across the
    Stripe call): a concurrent completion or retry job finds the lock taken and leaves the push
    to its holder; the answer is recorded in that same transaction. A row whose target Stripe's
    stored period already holds (its event arrived after a crash lost the answer) is confirmed
    without another call."""
    while True:
        async with session_factory() as session, session.begin():
            locked = (
                await session.execute(
                    text("SELECT pg_try_advisory_xact_lock(hashtext(:name))"),
                    {"name": f"billing:maintenance-push:{subscription_id}"},
                )
            ).scalar_one()
            if not locked:
                return True
            row = (
                await session.execute(
                    select(MaintenanceExtension, Subscription)
                    .join(Subscription, Subscription.id == MaintenanceExtension.subscription_id)
                    .where(
                        MaintenanceExtension.subscription_id == subscription_id,
                        MaintenanceExtension.stripe_status == "pending",
                    )
                    .order_by(MaintenanceExtension.id)
                    .limit(1)
                )
            ).first()
            if row is None:
                return True
            extension, subscription = row
            target = extension.stripe_trial_end
            assert target is not None
            settled = _settled(
                subscription.trial_end,
                subscription.current_period_end,
                subscription.cancel_at_period_end,
                subscription.cancel_at,
                target,
            )
            answer = None
            if settled is None:
                # Our mirror may lag Stripe (a renewal whose events have not arrived): pushing
                # a target the renewed period already passes would cut that paid period short
                # into a trial, and Stripe would charge again at its end. Stripe's own state
                # decides.
                try:
                    answer = await gateway.retrieve_subscription(subscription.stripe_id)
                    settled = _settled_at_stripe(answer, target)
                    if settled is None:
                        answer = await gateway.update_subscription(
                            subscription.stripe_id,
                            {"trial_end": int(target.timestamp()), "proration_behavior": "none"},
                            key=idempotency_key("maintenance-extension", extension.id),
                        )
                except StripeRequestRejected as exc:
                    extension.stripe_status = "rejected"
                    extension.last_error = str(exc)[:2000]
                    log.warning("maintenance.stripe_push_rejected", extension_id=extension.id)
                    continue
                except Exception as exc:  # Stripe unavailable: stays pending for a retry
                    log.warning(
                        "maintenance.stripe_push_failed",
                        extension_id=extension.id,
                        error_type=type(exc).__name__,
                    )
                    return False
            if settled == "target_passed":
                _reject_target_passed(extension)
            elif settled == "cancelling":
                _skip_cancelling(extension)
            elif answer is not None:  # pushed now, or by an attempt whose answer was lost
                await _record_stripe_answer(session, extension, answer)
            else:  # our stored snapshot holds it (its event came after a crash lost the answer)
                await _mark_applied(session, extension, subscription.current_period_end)
                await count_extension_days_in_period(session, subscription)
                log.info("maintenance.stripe_extension_confirmed", extension_id=extension.id)


Settled = Literal["applied", "target_passed", "cancelling"]


def _settled(
    trial_end: datetime | None,
    period_end: datetime | None,
    cancel_at_period_end: bool,
    cancel_at: datetime | None,
    target: datetime,
) -> Settled | None:
    """What a subscription's state (our stored snapshot, or Stripe's own) already decides about
    pushing `target`: `applied` (its `trial_end` holds it: an earlier push's answer was lost),
    `target_passed` (its period already reaches it: pushing would shorten a paid period),
    `cancelling` (renewal turned off since the row was made: Stripe would end it at
    `cancel_at`, `set_to_end_before`); None: push."""
    if trial_end is not None and trial_end >= target:
        return "applied"
    if period_end is not None and period_end >= target:
        return "target_passed"
    if _ends_before(cancel_at_period_end, cancel_at, target):
        return "cancelling"
    return None


def _settled_at_stripe(at_stripe: dict[str, object], target: datetime) -> Settled | None:
    """`_settled` of Stripe's subscription as Stripe answers it (its events not here yet)."""
    return _settled(
        _timestamp(at_stripe.get("trial_end")),
        _period_end(at_stripe),
        bool(at_stripe.get("cancel_at_period_end")),
        _timestamp(at_stripe.get("cancel_at")),
        target,
    )


STILL_PENDING = MaintenanceExtension.stripe_status == literal_column("'pending'")
"""In the SQL itself, not a parameter, so even a generic plan can use the partial index
`ix_maintenance_extensions_pending` (the pending rows, not every extension ever granted)."""


async def retry_pending_extensions(
    session_factory: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    *,
    limit: int = 200,
    raise_if_stripe_failed: bool = False,
) -> int:
    """Push every subscription's pending extensions again (same idempotency keys); the job of
    the background workers and of `billing push-extensions`. Returns how many rows left
    `pending`. Stripe failing stops the round (the next one tries again); with
    `raise_if_stripe_failed` (the command, so cron sees it) it then raises StripeUnavailable
    saying how many stay pending."""
    async with session_factory() as session:
        subscription_ids = list(
            (
                await session.execute(
                    select(MaintenanceExtension.subscription_id)
                    .where(STILL_PENDING)
                    .group_by(MaintenanceExtension.subscription_id)
                    .order_by(func.min(MaintenanceExtension.id))
                    .limit(limit)
                )
            ).scalars()
        )
        before = await _pending_count(session)
    stripe_failed = False
    for subscription_id in subscription_ids:
        if not await push_pending_extensions(session_factory, gateway, subscription_id):
            stripe_failed = True
            break  # Stripe failing: the next round tries again
    async with session_factory() as session:
        still_pending = await _pending_count(session)
    settled = before - still_pending
    if subscription_ids:
        log.info(
            "maintenance.pending_pushes_retried",
            subscriptions=len(subscription_ids),
            settled=settled,
        )
    if stripe_failed and raise_if_stripe_failed:
        raise StripeUnavailable(
            f"Stripe failed a maintenance extension push; settled {settled}, {still_pending}"
            " still pending (run again once Stripe answers: the same keys are sent)"
        )
    return settled


async def _pending_count(session: AsyncSession) -> int:
    return int(
        (
            await session.execute(
                select(func.count()).select_from(MaintenanceExtension).where(STILL_PENDING)
            )
        ).scalar_one()
    )


DAYS_HELD = select(func.coalesce(func.max(MaintenanceExtension.period_days_at_target), 0)).where(
    MaintenanceExtension.subscription_id == bindparam("subscription_id"),
    MaintenanceExtension.stripe_trial_end.is_not(None),
    MaintenanceExtension.stripe_trial_end <= bindparam("trial_end", type_=DateTime(timezone=True)),
)
"""Built once (run for every subscription event the processor applies)."""


async def extension_days_held(
    session: AsyncSession, subscription_id: uuid.UUID, trial_end: datetime | None
) -> int:
    """What `extension_days_in_period` is for a Stripe snapshot whose `trial_end` is this
    (see `count_extension_days_in_period`)."""
    if trial_end is None:
        return 0
    days = await session.scalar(
        DAYS_HELD, {"subscription_id": subscription_id, "trial_end": trial_end}
    )
    return int(days or 0)


async def count_extension_days_in_period(session: AsyncSession, subscription: Subscription) -> None:
    """Set `extension_days_in_period` to what the stored Stripe snapshot holds: the largest
    `period_days_at_target` among the subscription's pushed extensions whose target Stripe's
    `trial_end` has reached (0 when none has). Called by the webhook consumer whenever it
    stores a subscription and by the pusher when it records Stripe's answer, so the period end
    and the days it includes always come from the same snapshot (see the module docstring)."""
    held = await extension_days_held(session, subscription.id, subscription.trial_end)
    if subscription.extension_days_in_period != held:
        subscription.extension_days_in_period = held
        await session.flush()


def _timestamp(value: object) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if isinstance(value, int) else None


def _skip_cancelling(extension: MaintenanceExtension) -> None:
    extension.stripe_status = "skipped"
    extension.last_error = (
        "cancelling: Stripe ends the subscription before the target; the days stay in access_until"
    )
    log.info("maintenance.stripe_push_skipped_cancelling", extension_id=extension.id)


def _reject_target_passed(extension: MaintenanceExtension) -> None:
    extension.stripe_status = "rejected"
    extension.last_error = (
        "target_passed: Stripe's period already ends at or after the target; "
        "the days stay in access_until"
    )
    log.warning("maintenance.stripe_push_target_passed", extension_id=extension.id)


def _period_end(snapshot: dict[str, object]) -> datetime | None:
    """The period end of a Stripe subscription snapshot (on its items, in the pinned version)."""
    items = snapshot.get("items")
    ends = [
        item.get("current_period_end")
        for item in (items.get("data", []) if isinstance(items, dict) else [])
        if isinstance(item, dict)
    ]
    return _timestamp(max((end for end in ends if isinstance(end, int)), default=None))


async def _mark_applied(
    session: AsyncSession, extension: MaintenanceExtension, period_end: datetime | None
) -> None:
    extension.stripe_status = "applied"
    extension.included_in_period = True
    extension.stripe_period_end = period_end
    extension.last_error = None
    await session.flush()


async def _record_stripe_answer(
    session: AsyncSession, extension: MaintenanceExtension, answer: dict[str, object]
) -> None:
    """Stripe's answer is a snapshot of the subscription: stored unless the one we hold is
    newer (an answer replayed for a retry can be hours old: its period end is then behind the
    stored one), then the days in the period are derived from it."""
    period_end = _period_end(answer)
    subscription = await session.get(
        Subscription, extension.subscription_id, with_for_update=True, populate_existing=True
    )
    assert subscription is not None
    await _mark_applied(session, extension, period_end)
    stored_end = subscription.current_period_end
    if period_end is not None and (stored_end is None or period_end >= stored_end):
        subscription.current_period_end = period_end
        subscription.trial_end = _timestamp(answer.get("trial_end"))
        if isinstance(answer.get("status"), str) and subscription.status in STRIPE_PUSHABLE:
            subscription.status = str(answer["status"])
    await session.flush()
    await count_extension_days_in_period(session, subscription)
    log.info(
        "maintenance.stripe_extension_applied",
        extension_id=extension.id,
        period_end=period_end.isoformat() if period_end else None,
    )
