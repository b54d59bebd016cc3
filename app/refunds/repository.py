"""Queries for refunds, refund requests and the facts eligibility depends on."""

from __future__ import annotations

import contextlib
import uuid
from datetime import date, datetime, time, timedelta, tzinfo
from typing import Any, cast

from sqlalchemy import (
    String,
    Table,
    and_,
    any_,
    bindparam,
    exists,
    func,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.dialects.postgresql import array as pg_array
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import ArrayInsert, DriverStatement, asked_keys, session_driver
from app.models import (
    Account,
    Activity,
    CheckoutSession,
    Dispute,
    Invoice,
    LedgerEntry,
    MaintenanceExtension,
    Payment,
    Refund,
    RefundExecution,
    RefundRequest,
    RefundRequestAudit,
    RefundRequestResponse,
    Subscription,
)

USAGE_LEDGER_KINDS = ("conversation", "meta_fee")
BALANCE_PURPOSES = ("top_up", "debt_repayment")
# Stripe refund statuses under which the money is (or is on its way) back with the client.
LIVE_REFUND_STATUSES = ("pending", "requires_action", "succeeded")
# A request's statuses while it is open (not decided or closed): one in them may still be
# identified when its payment arrives.
OPEN_STATUSES = ("needs_information", "received", "acknowledged", "in_review")
# The fields of a request that identify its payment.
PAYMENT_FIELDS = ("payment_reference", "payment_date", "amount", "currency")
# Dispute statuses after which the payment stayed with us: the bank decided the chargeback for
# us (`won`, also a withdrawn one) or an inquiry closed without becoming one. Such a payment is
# refundable again here and Stripe has the last word (should it refuse, the approval is 502
# `stripe_request_rejected` and the request stays undecided); while a chargeback is open Stripe
# refuses, and after a lost one the client already has the money back.
SETTLED_FOR_US = ("won", "warning_closed")


def _disputes_of(payments: Any) -> Any:
    """SQL: a row of `disputes` is about the payment (a row of `payments`): its payment intent
    or its charge."""
    disputes = cast(Table, Dispute.__table__)
    return or_(
        disputes.c.stripe_payment_intent_id == payments.c.stripe_id,
        disputes.c.stripe_charge_id == payments.c.stripe_charge_id,
    )


def under_chargeback(payments: Any) -> Any:
    """SQL: the payment (a row of `payments`) is under a chargeback, so it is never also
    refunded: Stripe marked it disputed and not every one of its disputes mirrored here has
    been settled for us (`SETTLED_FOR_US`); disputed with none mirrored yet counts as under
    one."""
    disputes = cast(Table, Dispute.__table__)
    of_payment = _disputes_of(payments)
    settled = exists().where(of_payment) & ~exists().where(
        of_payment, disputes.c.status.not_in(_constants(SETTLED_FOR_US))
    )
    return and_(payments.c.disputed, ~settled)


# Built once: the event processor runs these for every refund and dispute effect (building a
# SQLAlchemy statement costs more CPU than Postgres spends running them).
LEDGER_ENTRIES = cast(Table, LedgerEntry.__table__)
ACCOUNT_EMAIL = select(Account.email).where(Account.id == bindparam("account_id"))
ADD_LEDGER_ENTRY = (
    insert(LEDGER_ENTRIES)
    .on_conflict_do_nothing(index_elements=["account_id", "kind", "source_id"])
    .returning(LEDGER_ENTRIES.c.id)
)
LEDGER_ENTRY_COLUMNS = (
    "account_id",
    "kind",
    "source_id",
    "amount",
    "currency",
    "description",
    "occurred_at",
)
"""What a new ledger entry is given (`id` and `created_at` are the database's)."""
ADD_LEDGER_ENTRIES = ArrayInsert(
    LEDGER_ENTRIES,
    LEDGER_ENTRY_COLUMNS,
    on_conflict_do_nothing=["account_id", "kind", "source_id"],
)
"""`add_ledger_entry` for several entries at once, in one statement, each a dict of
`LEDGER_ENTRY_COLUMNS` (on `session_driver`: the checkout, refund and dispute groups'
entries); of entries sharing (account, kind, source), the first is applied."""
REFUND_DEBITS = DriverStatement(
    text(
        "SELECT entries.account_id, entries.source_id"
        " FROM unnest(CAST(:accounts AS text[]), CAST(:sources AS text[]))"
        " AS wanted(account_id, source_id)"
        " JOIN ledger_entries AS entries ON entries.account_id = wanted.account_id"
        " AND entries.kind = 'refund' AND entries.source_id = wanted.source_id"
    )
)
"""Which (account, Stripe refund) pairs have their `refund` debit in the ledger: one index
look-up per pair (the unique (account, kind, source) index)."""
PAYMENT_BY_INTENT = select(Payment).where(Payment.stripe_id == bindparam("stripe_id"))
PAYMENT_BY_CHARGE = select(Payment).where(Payment.stripe_charge_id == bindparam("charge_id"))
SUBSCRIPTION_OF_INVOICE = select(Invoice.stripe_subscription_id).where(
    Invoice.stripe_id == bindparam("invoice_id")
)
SUBSCRIPTION_BY_STRIPE_ID = select(Subscription).where(
    Subscription.stripe_id == bindparam("stripe_id")
)
LOCKED_SUBSCRIPTION_BY_STRIPE_ID = SUBSCRIPTION_BY_STRIPE_ID.with_for_update().execution_options(
    populate_existing=True
)


async def account_email(session: AsyncSession, account_id: str) -> str | None:
    return (await session.execute(ACCOUNT_EMAIL, {"account_id": account_id})).scalar_one_or_none()


async def lock_account(session: AsyncSession, account_id: str) -> None:
    """The account's row lock (`FOR NO KEY UPDATE`, as `ledger_entries_in_account_currency`
    takes it): serialised with the account's other money movements, not with rows that merely
    reference the account (a request being filed checks its foreign key with `FOR KEY SHARE`,
    which `FOR UPDATE` would wait for, and could deadlock with)."""
    await session.execute(
        select(Account.id).where(Account.id == account_id).with_for_update(key_share=True)
    )


async def add_ledger_entry(
    session: AsyncSession,
    *,
    account_id: str,
    kind: str,
    source_id: str,
    amount: int,
    currency: str,
    description: str,
    occurred_at: datetime,
) -> bool:
    """Apply one ledger movement once per (account, kind, source); True when newly applied."""
    entry = {
        "account_id": account_id,
        "kind": kind,
        "source_id": source_id,
        "amount": amount,
        "currency": currency,
        "description": description,
        "occurred_at": occurred_at,
    }
    return (await session.execute(ADD_LEDGER_ENTRY, entry)).scalar_one_or_none() is not None


async def refund_debits(
    session: AsyncSession, refunds: list[tuple[str, str]]
) -> set[tuple[str, str]]:
    """Of these (account, Stripe refund) pairs, those debited in the ledger (`REFUND_DEBITS`,
    on `session_driver`)."""
    found = await REFUND_DEBITS.fetch(
        await session_driver(session),
        accounts=[account for account, _ in refunds],
        sources=[s for _, s in refunds],
    )
    return {(account, source) for account, source in found}


async def subscription_payments(session: AsyncSession, account_id: str) -> list[Payment]:
    statement = (
        select(Payment)
        .where(Payment.account_id == account_id, Payment.purpose == "subscription")
        .order_by(Payment.paid_at.desc().nulls_last(), Payment.created_at.desc())
    )
    return list((await session.execute(statement)).scalars())


def _constants(values: tuple[str, ...]) -> list[Any]:
    """Our own constant strings inlined in the SQL (`IN ('a', 'b')`), so a cached statement
    needs no per-execution expansion of the list into parameters."""
    assert all(value.isidentifier() for value in values)
    return [literal_column(f"'{value}'") for value in values]


def _eligibility_facts() -> Any:
    """One statement with everything a refund-eligibility quote needs, for each account id in
    `keys` (for `Reader.by_key`: the account id first), one row per subscription payment of
    the account (newest first): the payment, the subscription it paid for (its own
    id, else its invoice's) with that subscription's `current_period_end`, what Stripe has
    refunded (mirrored refunds still live, and those that failed), what this service has asked Stripe to refund that
    Stripe has not reported yet, whether the account has any usage, and `maintenance_days`:
    the maintenance extension days pushed to Stripe that the subscription's current period
    holds (what Stripe's stored period holds, less what it held when that period started);
    and `next_billed_from`: where the subscription's next billed period after the payment's
    own invoice starts (the earliest `period_end` of a later invoice with something due: a
    subscription invoice's `period_end` is where the period it bills starts), paid or not."""
    payments = Payment.__table__
    invoices = Invoice.__table__
    subscriptions = Subscription.__table__
    refunds = Refund.__table__
    executions = RefundExecution.__table__
    asked = asked_keys("account_id")
    account_id = asked.c.account_id
    subscription_id = func.coalesce(
        func.nullif(payments.c.stripe_subscription_id, ""),
        func.nullif(invoices.c.stripe_subscription_id, ""),
    )
    mirrored = (
        select(func.coalesce(func.sum(refunds.c.amount), 0))
        .where(
            refunds.c.stripe_payment_intent_id == payments.c.stripe_id,
            refunds.c.status.in_(_constants(LIVE_REFUND_STATUSES)),
        )
        .scalar_subquery()
    )
    failed = (  # the charge's `amount_refunded` is the highest seen: it still counts these
        select(func.coalesce(func.sum(refunds.c.amount), 0))
        .where(
            refunds.c.stripe_payment_intent_id == payments.c.stripe_id,
            refunds.c.status.not_in(_constants(LIVE_REFUND_STATUSES)),
        )
        .scalar_subquery()
    )
    known = refunds.alias("known")
    unmirrored = (
        select(func.coalesce(func.sum(executions.c.amount), 0))
        .where(
            executions.c.payment_id == payments.c.id,
            executions.c.status.in_(_constants(("pending", "submitted"))),
            or_(
                executions.c.stripe_refund_id.is_(None),
                ~exists().where(known.c.stripe_id == executions.c.stripe_refund_id),
            ),
        )
        .scalar_subquery()
    )
    extensions = MaintenanceExtension.__table__
    held_at_period_start = (
        select(func.coalesce(func.max(extensions.c.period_days_at_target), 0))
        .where(
            extensions.c.subscription_id == subscriptions.c.id,
            extensions.c.stripe_trial_end.is_not(None),
            extensions.c.stripe_trial_end <= subscriptions.c.current_period_start,
        )
        .scalar_subquery()
    )
    later = invoices.alias("later")
    next_billed_from = (
        select(func.min(later.c.period_end))
        .where(
            later.c.stripe_subscription_id == subscription_id,
            later.c.amount_due > 0,
            later.c.period_end > invoices.c.period_end,
        )
        .scalar_subquery()
    )
    maintenance_days = func.coalesce(
        subscriptions.c.extension_days_in_period - held_at_period_start, 0
    )
    used = or_(
        exists().where(Activity.__table__.c.account_id == account_id),
        exists().where(
            LedgerEntry.__table__.c.account_id == account_id,
            LedgerEntry.__table__.c.kind.in_(_constants(USAGE_LEDGER_KINDS)),
        ),
    )
    return (
        select(
            account_id,
            payments.c.id,
            payments.c.amount,
            payments.c.currency,
            payments.c.status,
            payments.c.fee,
            under_chargeback(payments).label("disputed"),
            payments.c.amount_refunded,
            payments.c.paid_at,
            subscription_id.label("subscription_id"),
            invoices.c.period_end.label("billed_from"),
            subscriptions.c.current_period_start,
            subscriptions.c.current_period_end,
            maintenance_days.label("maintenance_days"),
            next_billed_from.label("next_billed_from"),
            mirrored.label("mirrored_refunds"),
            failed.label("failed_refunds"),
            unmirrored.label("unmirrored_refunds"),
            used.label("usage_detected"),
        )
        .select_from(
            asked.join(payments, payments.c.account_id == account_id)
            .outerjoin(invoices, invoices.c.stripe_id == payments.c.stripe_invoice_id)
            .outerjoin(subscriptions, subscriptions.c.stripe_id == subscription_id)
        )
        .where(payments.c.purpose == "subscription")
        .order_by(payments.c.paid_at.desc().nulls_last(), payments.c.created_at.desc())
    )


ELIGIBILITY_FACTS = _eligibility_facts()
"""See `_eligibility_facts`; parameter `account_id`."""


def refunded_total(amount_refunded: int, failed: int, mirrored: int, unmirrored: int) -> int:
    """What of a payment has gone back or is on its way back, from: the charge's
    `amount_refunded` (mirrored as the highest value seen, since events arrive in any order,
    so refunds that later failed, `failed`, are taken out of it again), Stripe's refunds
    mirrored and still live (`mirrored`), and refunds this service has asked for that no
    refund event has reported yet (`unmirrored`). The charge's `charge.refunded` event may
    arrive before a refund's own `refund.*` event, and its `amount_refunded` then already
    holds that refund: an unreported refund of ours is counted once, in whichever of the two
    is larger, never added to the charge's total (which counted a partial refund twice and
    refused the rest of the payment). Stripe itself never refunds more than the charge."""
    return max(amount_refunded - failed, mirrored + unmirrored)


async def already_refunded(session: AsyncSession, payment: Payment) -> int:
    """What has gone back or is on its way back (`refunded_total`): Stripe's refunds
    (mirrored, and the charge's `amount_refunded`) and refunds this service has asked for that
    Stripe has not yet reported."""
    mirrored, failed = (
        await session.execute(
            select(
                func.coalesce(
                    func.sum(Refund.amount).filter(Refund.status.in_(LIVE_REFUND_STATUSES)), 0
                ),
                func.coalesce(
                    func.sum(Refund.amount).filter(Refund.status.not_in(LIVE_REFUND_STATUSES)), 0
                ),
            ).where(Refund.stripe_payment_intent_id == payment.stripe_id)
        )
    ).one()
    unmirrored = (
        await session.execute(
            select(func.coalesce(func.sum(RefundExecution.amount), 0)).where(
                RefundExecution.payment_id == payment.id,
                RefundExecution.status.in_(("pending", "submitted")),
                or_(
                    RefundExecution.stripe_refund_id.is_(None),
                    ~exists().where(Refund.stripe_id == RefundExecution.stripe_refund_id),
                ),
            )
        )
    ).scalar_one()
    return refunded_total(payment.amount_refunded, int(failed), int(mirrored), int(unmirrored))


async def unconfirmed_balance_refunds(session: AsyncSession, account_id: str, currency: str) -> int:
    """What this service has asked Stripe to refund from the account's balance payments
    (top-ups, debt repayments) in `currency` that Stripe has not reported yet: the ledger is
    debited only when Stripe's refund event arrives, so until then this is still in the
    balance (refunds of payments in another currency never move it)."""
    statement = (
        select(func.coalesce(func.sum(RefundExecution.amount), 0))
        .join(Payment, Payment.id == RefundExecution.payment_id)
        .where(
            RefundExecution.account_id == account_id,
            Payment.purpose.in_(BALANCE_PURPOSES),
            Payment.currency == currency,
            RefundExecution.status.in_(("pending", "submitted")),
            or_(
                RefundExecution.stripe_refund_id.is_(None),
                ~exists().where(Refund.stripe_id == RefundExecution.stripe_refund_id),
            ),
        )
    )
    return int((await session.execute(statement)).scalar_one())


async def goodwill_credits(session: AsyncSession, account_id: str, currency: str) -> int:
    """The balance credits finance granted the account in `currency` (`balance_credit`
    entries): balance no money was received for, so never refunded to a card."""
    statement = select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
        LedgerEntry.account_id == account_id,
        LedgerEntry.kind == "balance_credit",
        LedgerEntry.currency == currency,
    )
    return int((await session.execute(statement)).scalar_one())


async def find_payment_by_reference(
    session: AsyncSession, account_id: str, reference: str
) -> Payment | None:
    """The account's payment `reference` names: our payment id, or a Stripe payment intent,
    charge, invoice or Checkout session id. A subscription's Checkout session (the
    `session_id` its client came back with) names the payment it took: the subscription's
    first."""
    conditions = [
        Payment.stripe_id == reference,
        Payment.stripe_charge_id == reference,
        Payment.stripe_invoice_id == reference,
        Payment.stripe_checkout_session_id == reference,
    ]
    with contextlib.suppress(ValueError):
        conditions.append(Payment.id == uuid.UUID(reference))
    statement = (
        select(Payment)
        .where(Payment.account_id == account_id, or_(*conditions))
        .order_by(Payment.created_at)
    )
    payment = (await session.execute(statement)).scalars().first()
    if payment is not None:
        return payment
    subscription = await session.scalar(
        select(CheckoutSession.stripe_subscription_id).where(
            CheckoutSession.account_id == account_id,
            CheckoutSession.stripe_id == reference,
            CheckoutSession.purpose == "subscription",
        )
    )
    if not subscription:
        return None
    invoices = select(Invoice.stripe_id).where(Invoice.stripe_subscription_id == subscription)
    first = (
        select(Payment)
        .where(
            Payment.account_id == account_id,
            or_(
                Payment.stripe_subscription_id == subscription,
                Payment.stripe_invoice_id.in_(invoices),
            ),
        )
        .order_by(Payment.created_at)
        .limit(1)
    )
    return (await session.execute(first)).scalars().first()


async def find_payments_by_details(
    session: AsyncSession, account_id: str, *, amount: int, currency: str, day: date, zone: tzinfo
) -> list[Payment]:
    """The account's payments of this amount and currency made on this local day in `zone`:
    the day's bounds are computed here, not with PostgreSQL's zone names (a BUSINESS_TIMEZONE
    Python knows may be missing from the database server's tz data)."""
    start = datetime.combine(day, time(), tzinfo=zone)
    end = datetime.combine(day + timedelta(days=1), time(), tzinfo=zone)
    made = func.coalesce(Payment.paid_at, Payment.created_at)
    statement = select(Payment).where(
        Payment.account_id == account_id,
        Payment.amount == amount,
        Payment.currency == currency,
        made >= start,
        made < end,
    )
    return list((await session.execute(statement)).scalars())


async def announce_matching(session: AsyncSession, account_id: str) -> None:
    """Write a new version of the account's row (and hold its lock) before a request about a
    payment is matched (filed, or its details added): see `waiting_requests`; the dispute
    handler relies on it too (app/disputes/events.py `_open_requests`)."""
    await session.execute(
        update(Account).where(Account.id == account_id).values(updated_at=func.now())
    )


async def waiting_requests(session: AsyncSession, account_ids: list[str]) -> list[RefundRequest]:
    """The accounts' requests still waiting for their payment to be identified, locked, after
    the accounts' rows: open ones about a payment and not matched to one, whether in
    `needs_information` (no clock yet) or already running (a request filed about no payment
    whose client then named one Stripe's events had not brought yet: identified all the same,
    its clock kept).

    So a request filed while the payment's events are being applied is not missed by either
    side: a filing writes its account's row before it matches (`announce_matching`), and so
    does a PATCH that may identify it. If the events' transaction locks the row first, the
    filing waits and then sees the payment; if the filing wrote it first, the events'
    transaction (SERIALIZABLE) fails to serialize on that lock and runs again, seeing the
    request. The account before its waiting requests: the events' transaction has often
    locked it already (a top-up's credit, a first payment), and a PATCH or a finance reply
    about such a request takes them in that order too; the other order, in either, could
    deadlock with it."""
    await LOCK_ACCOUNTS.execute(await session_driver(session), ids=sorted(set(account_ids)))
    statement = (
        select(RefundRequest)
        .where(
            RefundRequest.status.in_(OPEN_STATUSES),
            RefundRequest.about_payment.is_(True),
            RefundRequest.payment_id.is_(None),
            RefundRequest.account_id.in_(account_ids),
        )
        .order_by(RefundRequest.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return list((await session.execute(statement)).scalars())


LOCK_ACCOUNTS = DriverStatement(
    select(Account.id)
    .where(Account.id == any_(bindparam("ids", type_=ARRAY(String))))
    .order_by(Account.id)
    .with_for_update(key_share=True)
)
"""The accounts' rows (`ids`: sorted), locked in id order (`FOR NO KEY UPDATE`, as every lock
of them): after a request's filing wrote one (`announce_matching`), the transaction applying
events about its payment fails to serialize and runs again, seeing the request."""


async def is_under_chargeback(session: AsyncSession, payment: Payment) -> bool:
    """`under_chargeback` for one payment (a refund of it is 409 `payment_disputed`)."""
    if not payment.disputed:
        return False
    payments = cast(Table, Payment.__table__)
    return bool(
        await session.scalar(select(under_chargeback(payments)).where(payments.c.id == payment.id))
    )


async def chargeback_of(session: AsyncSession, payment: Payment) -> tuple[str | None, str | None]:
    """The Stripe id and status of a dispute of the payment not settled for us (open, or
    lost), if one is mirrored (a payment Stripe marked disputed may have none yet); a
    chargeback before an inquiry."""
    disputes = cast(Table, Dispute.__table__)
    payments = cast(Table, Payment.__table__)
    row = (
        await session.execute(
            select(disputes.c.stripe_id, disputes.c.status)
            .where(
                payments.c.id == payment.id,
                _disputes_of(payments),
                disputes.c.status.not_in(_constants(SETTLED_FOR_US)),
            )
            .order_by(disputes.c.status.startswith("warning_"), disputes.c.stripe_id)
            .limit(1)
        )
    ).first()
    return (row[0], row[1]) if row is not None else (None, None)


def is_inquiry(status: str | None) -> bool:
    """A dispute status of an inquiry (`warning_needs_response`, `warning_under_review`,
    `warning_closed`): the bank asking about the payment, not (yet) a chargeback."""
    return status is not None and status.startswith("warning_")


async def get_payment(
    session: AsyncSession, payment_id: uuid.UUID, *, lock: bool = False
) -> Payment | None:
    """`lock`: `FOR NO KEY UPDATE`, which rows referencing the payment (a request filed about
    it) do not wait for; see `lock_account`."""
    statement = select(Payment).where(Payment.id == payment_id)
    if lock:
        statement = statement.with_for_update(key_share=True).execution_options(
            populate_existing=True
        )
    return (await session.execute(statement)).scalar_one_or_none()


async def payment_by_intent(session: AsyncSession, payment_intent: str | None) -> Payment | None:
    if not payment_intent:
        return None
    found = await session.execute(PAYMENT_BY_INTENT, {"stripe_id": payment_intent})
    return found.scalar_one_or_none()


async def payment_by_charge(session: AsyncSession, charge_id: str | None) -> Payment | None:
    if not charge_id:
        return None
    found = await session.execute(PAYMENT_BY_CHARGE, {"charge_id": charge_id})
    return found.scalar_one_or_none()


async def get_request(
    session: AsyncSession,
    request_id: uuid.UUID,
    *,
    account_id: str | None = None,
    lock: bool = False,
) -> RefundRequest | None:
    statement = select(RefundRequest).where(RefundRequest.id == request_id)
    if account_id is not None:
        statement = statement.where(RefundRequest.account_id == account_id)
    if lock:
        statement = statement.with_for_update().execution_options(populate_existing=True)
    return (await session.execute(statement)).scalar_one_or_none()


async def execution_for_request(
    session: AsyncSession, request_id: uuid.UUID, *, lock: bool = False
) -> RefundExecution | None:
    """The request's latest refund attempt."""
    statement = (
        select(RefundExecution)
        .where(RefundExecution.request_id == request_id)
        .order_by(RefundExecution.attempt.desc())
        .limit(1)
    )
    if lock:
        statement = statement.with_for_update().execution_options(populate_existing=True)
    return (await session.execute(statement)).scalar_one_or_none()


async def lock_execution(session: AsyncSession, execution_id: uuid.UUID) -> RefundExecution | None:
    statement = (
        select(RefundExecution)
        .where(RefundExecution.id == execution_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return (await session.execute(statement)).scalar_one_or_none()


async def executions_for_requests(
    session: AsyncSession, request_ids: list[uuid.UUID]
) -> dict[uuid.UUID, RefundExecution]:
    """Each request's latest refund attempt."""
    if not request_ids:
        return {}
    rows = await session.execute(
        select(RefundExecution)
        .where(RefundExecution.request_id.in_(request_ids))
        .order_by(RefundExecution.attempt)
    )
    return {execution.request_id: execution for execution in rows.scalars()}


async def responses_for_requests(
    session: AsyncSession, request_ids: list[uuid.UUID]
) -> dict[uuid.UUID, list[RefundRequestResponse]]:
    result: dict[uuid.UUID, list[RefundRequestResponse]] = {rid: [] for rid in request_ids}
    if not request_ids:
        return result
    rows = await session.execute(
        select(RefundRequestResponse)
        .where(RefundRequestResponse.request_id.in_(request_ids))
        .order_by(RefundRequestResponse.created_at, RefundRequestResponse.id)
    )
    for response in rows.scalars():
        result[response.request_id].append(response)
    return result


async def payment_details_added_at(session: AsyncSession, request_id: uuid.UUID) -> datetime | None:
    """When payment details were last added to the request (its latest `details_added` step
    naming one of `PAYMENT_FIELDS`), or None if it has only those it was filed with."""
    statement = select(func.max(RefundRequestAudit.at)).where(
        RefundRequestAudit.request_id == request_id,
        RefundRequestAudit.action == "details_added",
        RefundRequestAudit.details["fields"].has_any(cast(Any, pg_array(list(PAYMENT_FIELDS)))),
    )
    return cast(datetime | None, (await session.execute(statement)).scalar_one())


async def audit_for_request(
    session: AsyncSession, request_id: uuid.UUID
) -> list[RefundRequestAudit]:
    rows = await session.execute(
        select(RefundRequestAudit)
        .where(RefundRequestAudit.request_id == request_id)
        .order_by(RefundRequestAudit.id)
    )
    return list(rows.scalars())


def overdue_condition(now: datetime) -> Any:
    """A due date passed without the reply it asks for: the first reply by
    `first_response_due`; a decision or interim reply by `decision_due`; after an interim
    reply, the decision by its `next_step_due`, also one given while the request still waits
    for its details (no clock, so no other due date, but a date promised to the client). Only
    open requests can be overdue: the condition is rendered in the SQL (not as parameters), so
    every plan can read them from the partial index `ix_refund_requests_open` instead of every
    request ever filed."""
    return and_(
        RefundRequest.decided_at.is_(None),
        RefundRequest.status != literal_column("'closed'"),
        or_(
            and_(
                RefundRequest.first_responded_at.is_(None),
                RefundRequest.first_response_due < now,
            ),
            and_(
                RefundRequest.interim_responded_at.is_(None),
                RefundRequest.decision_due < now,
            ),
            and_(
                RefundRequest.next_step_due.is_not(None),
                RefundRequest.next_step_due < now,
            ),
        ),
    )


async def list_requests(
    session: AsyncSession,
    *,
    account_id: str | None = None,
    status: str | None = None,
    overdue_at: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[RefundRequest]:
    statement = select(RefundRequest)
    if account_id is not None:
        statement = statement.where(RefundRequest.account_id == account_id)
    if status is not None:
        statement = statement.where(RefundRequest.status == status)
    if overdue_at is not None:
        statement = statement.where(overdue_condition(overdue_at))
    statement = (
        statement.order_by(RefundRequest.received_at.desc(), RefundRequest.id)
        .limit(limit)
        .offset(offset)
    )
    return list((await session.execute(statement)).scalars())


async def count_overdue(session: AsyncSession, now: datetime) -> int:
    statement = select(func.count()).select_from(RefundRequest).where(overdue_condition(now))
    return int((await session.execute(statement)).scalar_one())


async def subscription_of_payment(
    session: AsyncSession, payment: Payment, *, lock: bool = False
) -> Subscription | None:
    """The subscription a subscription payment paid for (via its invoice when the payment row
    does not name it yet)."""
    stripe_id = payment.stripe_subscription_id
    if stripe_id is None and payment.stripe_invoice_id is not None:
        found = await session.execute(
            SUBSCRIPTION_OF_INVOICE, {"invoice_id": payment.stripe_invoice_id}
        )
        stripe_id = found.scalar_one_or_none()
    return await subscription_by_stripe_id(session, stripe_id, lock=lock)


async def subscription_by_stripe_id(
    session: AsyncSession, stripe_id: str | None, *, lock: bool = False
) -> Subscription | None:
    if not stripe_id:
        return None
    statement = LOCKED_SUBSCRIPTION_BY_STRIPE_ID if lock else SUBSCRIPTION_BY_STRIPE_ID
    return (await session.execute(statement, {"stripe_id": stripe_id})).scalar_one_or_none()


async def subscription_of(
    session: AsyncSession,
    stripe_subscription_id: str | None,
    stripe_invoice_id: str | None,
    *,
    lock: bool = False,
) -> Subscription | None:
    """`subscription_of_payment` for a payment read as columns (its Stripe subscription and
    invoice ids) rather than loaded as a `Payment`."""
    stripe_id = stripe_subscription_id
    if stripe_id is None and stripe_invoice_id is not None:
        found = await session.execute(SUBSCRIPTION_OF_INVOICE, {"invoice_id": stripe_invoice_id})
        stripe_id = found.scalar_one_or_none()
    return await subscription_by_stripe_id(session, stripe_id, lock=lock)
