"""What each Stripe event does to the mirror, whatever the order it arrives in.

The sound rules that make any delivery order converge on Stripe's latest state:

- Objects with a one-way life (checkout sessions, invoices, payments, refunds, disputes) merge
  monotonically: a status only moves forward along its lifecycle rank, amounts refunded and
  withdrawn only grow, ids and fees once known are kept (`COALESCE`), so applying events in any
  order gives the same row.
- Subscriptions go back and forth (cancel at period end, resume, plan changes), so each row
  remembers the `created` of the newest event applied. An older event is ignored; a newer one
  is applied from its payload; one from the same second cannot be ordered by the payload, so the
  subscription is re-fetched from Stripe and Stripe's current state is applied. So is one
  rendered in another API version than the pinned one (listed from the Events API by
  `billing reconcile-events`): its payload is not in the shape read here (before basil, the
  period was not on the items). A `canceled` subscription never comes back to life. (An
  invoice event in another API version is read from the invoice re-fetched, likewise.)
- Effects happen once because the database says so: ledger entries are unique per
  (account, kind, source), the first payment is `LEAST(...)`, access changes are appended only
  when access differs from the last recorded one.

Checkout sessions, subscriptions and payment intents carry our metadata (`account_id`,
`purpose`, `checkout_session_id`, `channel_id`, `plan_code`), so every event can be linked to a
1msg account without depending on another event having arrived first.

How a transaction's events are applied (`apply_events`): by group (`GROUP_HANDLERS`:
subscriptions, checkout sessions, invoices, payments from charges and invoice payments,
refunds, disputes). A group locks its rows in one statement, folds every event into its row in
stored order in Python (the same rules, so one event or many end alike), writes the rows that
changed in one statement, and runs the effects once per object from the folded row. The
one-way merges commute, and a subscription's events keep their stored order among themselves
(the newest wins), so moving a group's events after the others in their transaction is one of
the "any order"s above. The per-event fallback applies an event as a group of one: the same
code. Refunds' effects follow each status a refund passes through (an execution that succeeded
and then failed is told both), so their fold keeps every distinct state of the row, and the
effects are applied to each in order (`on_refund_events`).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import orjson
import structlog
from sqlalchemy import (
    CompoundSelect,
    Select,
    String,
    Table,
    Uuid,
    any_,
    bindparam,
    literal,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.accounts.service import ensure_accounts, ledger_entries_in_account_currency
from app.config import Settings
from app.db import ArrayInsert, ArrayUpdate, DriverStatement, session_driver
from app.disputes import events as disputes_events
from app.disputes.events import DisputedPayments, MirroredDispute, on_disputes_mirrored
from app.maintenance.service import extension_days_held
from app.models import (
    Account,
    Channel,
    CheckoutSession,
    Dispute,
    Invoice,
    Payment,
    Refund,
    Subscription,
)
from app.notifications.outbox import plausible_email
from app.refunds.events import on_refunds_mirrored
from app.refunds.repository import ADD_LEDGER_ENTRIES
from app.refunds.service import identify_waiting_requests
from app.stripe_gateway import API_VERSION, StripeGateway
from app.subscriptions.access import LIVE_STATUSES
from app.subscriptions.service import record_access_changes
from app.webhooks.fees import fee_in_payment_currency, in_currency

log = structlog.get_logger()

Json = dict[str, Any]
TIMESTAMPS = ("created_at", "updated_at")


@dataclass
class EventContext:
    session: AsyncSession
    settings: Settings
    stripe: StripeGateway
    event: Json
    now: datetime

    @property
    def type(self) -> str:
        return str(self.event["type"])

    @property
    def object(self) -> Json:
        obj: Json = self.event["data"]["object"]
        return obj

    @property
    def created(self) -> datetime:
        return datetime.fromtimestamp(self.event["created"], UTC)

    @property
    def in_pinned_version(self) -> bool:
        """The payload is in the pinned API version's shape: webhook deliveries are; events
        listed from the Events API (`billing reconcile-events`) are rendered in the version
        current when they were created (the account's default), whose shape may differ."""
        return self.event.get("api_version") in (None, API_VERSION)


def ts(value: Any) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if isinstance(value, int) else None


def ref(value: Any) -> str | None:
    """An expandable Stripe field: an id, or the expanded object's id."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


def rank_merge(order: list[str], old: str | None, new: str | None) -> str | None:
    """The later of two statuses along a lifecycle (unknown statuses rank lowest)."""
    if old is None:
        return new
    if new is None:
        return old
    return new if _rank(order, new) >= _rank(order, old) else old


def _rank(order: list[str], status: str) -> int:
    return order.index(status) if status in order else -1


CHECKOUT_STATUS_ORDER = ["pending", "failed", "open", "expired", "complete"]
CHECKOUT_PAYMENT_ORDER = ["unpaid", "no_payment_required", "paid"]
INVOICE_STATUS_ORDER = ["draft", "open", "uncollectible", "void", "paid"]
PAYMENT_STATUS_ORDER = ["pending", "failed", "succeeded"]
# A succeeded refund can still fail at the bank (refund.updated status=failed), never the reverse.
REFUND_STATUS_ORDER = ["pending", "requires_action", "succeeded", "canceled", "failed"]
DISPUTE_STATUS_ORDER = [
    "warning_needs_response",
    "warning_under_review",
    "needs_response",
    "under_review",
    "warning_closed",
    "prevented",
    "won",
    "lost",
]
TERMINAL_SUBSCRIPTION_STATUSES = frozenset({"canceled", "incomplete_expired"})
ACCOUNT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # as the account routes accept them


# --- shared lookups ------------------------------------------------------------------------
# The statements run for most events are built once and executed with parameters: building a
# SQLAlchemy statement costs more CPU than Postgres spends running these.

ACCOUNTS = cast(Table, Account.__table__)
CHECKOUTS = cast(Table, CheckoutSession.__table__)
LINK_CUSTOMERS = ArrayUpdate(
    ACCOUNTS, ["stripe_customer_id"], where='"accounts".stripe_customer_id IS NULL'
)


async def link_customers(session: AsyncSession, links: Iterable[tuple[str, str | None]]) -> None:
    """Each account's Stripe customer, set once: of (account, customer) links in the order
    the events named them, the first of each account (as one UPDATE per event would)."""
    first: dict[str, str] = {}
    for account_id, customer_id in links:
        if customer_id is not None:
            first.setdefault(account_id, customer_id)
    await LINK_CUSTOMERS.execute(
        await session_driver(session),
        [{"id": account_id, "stripe_customer_id": c} for account_id, c in first.items()],
    )


RECORD_FIRST_PAYMENTS = ArrayUpdate(
    ACCOUNTS,
    ["first_paid_at", "currency"],
    values={  # the earliest payment time (LEAST skips a NULL), the bound currency kept
        "first_paid_at": "LEAST(accounts.first_paid_at, v.first_paid_at)",
        # as `BOUND_CURRENCY`: an account bound by its ledger (usage charged before any
        # payment) keeps that currency; a payment refused for its currency never rebinds it
        "currency": "COALESCE(NULLIF(accounts.currency, ''), (SELECT entries.currency"
        " FROM ledger_entries AS entries WHERE entries.account_id = accounts.id LIMIT 1),"
        " v.currency)",
    },
    where=(  # otherwise nothing changes: no row version written
        "(accounts.first_paid_at IS NULL OR accounts.first_paid_at > v.first_paid_at"
        " OR accounts.currency IS NULL)"
    ),
)
FILL_CONTACTS = ArrayUpdate(  # the email entered at Checkout, for an account without one
    ACCOUNTS, ["email"], where="COALESCE(\"accounts\".email, '') = ''"
)
NEW_CHANNELS = ArrayInsert(  # the first account named for a channel owns it
    cast(Table, Channel.__table__), ["id", "account_id"], on_conflict_do_nothing=["id"]
)
SUBSCRIPTIONS = cast(Table, Subscription.__table__)
SUBSCRIPTION_SNAPSHOT = (
    "account_id",
    "channel_id",
    "stripe_customer_id",
    "plan_code",
    "stripe_price_id",
    "status",
    "cancel_at_period_end",
    "cancel_at",
    "current_period_start",
    "current_period_end",
    "trial_end",
    "canceled_at",
    "ended_at",
    "source_event_created",
    "status_since",
    "extension_days_in_period",
)
"""The columns a subscription event writes (`on_subscription_events`)."""
LOCKED_SUBSCRIPTIONS = DriverStatement(
    select(
        SUBSCRIPTIONS.c.id,
        SUBSCRIPTIONS.c.stripe_id,
        *(SUBSCRIPTIONS.c[name] for name in SUBSCRIPTION_SNAPSHOT),
    )
    .where(SUBSCRIPTIONS.c.stripe_id == any_(bindparam("stripe_ids", type_=ARRAY(String))))
    .order_by(SUBSCRIPTIONS.c.stripe_id)
    .with_for_update()
)
NEW_SUBSCRIPTIONS = ArrayInsert(SUBSCRIPTIONS, ["id", "stripe_id", *SUBSCRIPTION_SNAPSHOT])
WRITE_SUBSCRIPTIONS = ArrayUpdate(SUBSCRIPTIONS, SUBSCRIPTION_SNAPSHOT)
DISPUTES = cast(Table, Dispute.__table__)


FirstPayments = dict[str, tuple[datetime, str]]
"""Payments to record as their accounts' (`RECORD_FIRST_PAYMENTS`): account -> (the earliest
paid time, the currency of the first recorded), as one statement per payment would."""


def add_first_payment(
    first_payments: FirstPayments, account_id: str, paid_at: datetime, currency: str
) -> None:
    earliest, first_currency = first_payments.get(account_id, (paid_at, currency))
    first_payments[account_id] = (min(earliest, paid_at), first_currency)


async def record_first_payments(session: AsyncSession, first_payments: FirstPayments) -> None:
    """The accounts' first payment time (the earliest) and currency (once bound, kept: its
    own, else its ledger's, else the first payment's), in one statement."""
    if first_payments:
        await RECORD_FIRST_PAYMENTS.execute(
            await session_driver(session),
            [
                {"id": account_id, "first_paid_at": paid_at, "currency": currency}
                for account_id, (paid_at, currency) in sorted(first_payments.items())
            ],
        )


PAYMENT_LINKS = (
    "account_id",
    "purpose",
    "stripe_invoice_id",
    "stripe_subscription_id",
    "stripe_charge_id",
)
"""What refund and dispute effects learn about a payment from (see `reapply_money_effects`)."""

MirrorDict = dict[str, Any]
"""A mirror row as column name -> value, read and written with Core (no ORM objects)."""
PAYMENTS = cast(Table, Payment.__table__)
INVOICES = cast(Table, Invoice.__table__)


def _mirror_statements(
    table: Table, starts_with: Sequence[str]
) -> tuple[DriverStatement, ArrayInsert, ArrayUpdate]:
    """(lock the rows of :stripe_ids, insert missing rows with `starts_with` columns, write
    rows by id), each one statement straight on the driver. The lock is `FOR NO KEY UPDATE`
    (the rows' ids never change): a route inserting a row that references one (a refund
    request naming its payment) does not wait for the events' transaction, which may be
    waiting for that route's account lock."""
    columns = [column for column in table.c if column.name not in TIMESTAMPS]
    locked = (
        select(*columns)
        .where(table.c.stripe_id == any_(bindparam("stripe_ids", type_=ARRAY(String))))
        .order_by(table.c.stripe_id)
        .with_for_update(key_share=True)
    )
    new = ArrayInsert(
        table, ["id", "stripe_id", *starts_with], on_conflict_do_nothing=["stripe_id"]
    )
    written = [column.name for column in columns if column.name not in ("id", "stripe_id")]
    return DriverStatement(locked), new, ArrayUpdate(table, written)


MIRROR_STATEMENTS = {
    PAYMENTS: _mirror_statements(PAYMENTS, ["amount", "currency", "status"]),
    INVOICES: _mirror_statements(INVOICES, ["currency"]),
    DISPUTES: _mirror_statements(DISPUTES, ["stripe_charge_id", "amount", "currency", "status"]),
}
"""Per mirror table: its `locked_rows` and `write_rows` statements; a new row starts with
the columns its group's `defaults` give."""


async def locked_rows(
    session: AsyncSession, table: Table, defaults: dict[str, dict[str, Any]]
) -> tuple[dict[str, MirrorDict], set[str]]:
    """The mirror rows of the Stripe ids in `defaults`, locked, and which of them were
    missing (created here with their `defaults`, the columns `MIRROR_STATEMENTS` starts a
    new row with; creation races are decided by the unique `stripe_id`). One statement when
    they all exist, three otherwise."""
    locked, new, _ = MIRROR_STATEMENTS[table]
    driver = await session_driver(session)
    found = await locked.fetch(driver, stripe_ids=sorted(defaults))
    rows = {row["stripe_id"]: dict(row) for row in found}
    missing = [stripe_id for stripe_id in sorted(defaults) if stripe_id not in rows]
    if missing:
        await new.execute(
            driver,
            [
                {"id": uuid.uuid4(), "stripe_id": stripe_id, **defaults[stripe_id]}
                for stripe_id in missing
            ],
        )
        found = await locked.fetch(driver, stripe_ids=missing)
        rows.update((row["stripe_id"], dict(row)) for row in found)
    return rows, set(missing)


async def write_rows(
    session: AsyncSession,
    table: Table,
    rows: dict[str, MirrorDict],
    stored: dict[str, MirrorDict],
) -> None:
    """Write the `rows` that differ from how they were `stored`, in one statement."""
    changed = [row for stripe_id, row in rows.items() if row != stored[stripe_id]]
    if changed:
        _, _, write = MIRROR_STATEMENTS[table]
        await write.execute(await session_driver(session), changed)


DISPUTES_OF_PAYMENTS = DriverStatement(
    select(
        Dispute.id, Dispute.account_id, Dispute.stripe_payment_intent_id, Dispute.stripe_charge_id
    ).where(
        (
            Dispute.stripe_payment_intent_id
            == any_(bindparam("payment_intents", type_=ARRAY(String)))
        )
        | (Dispute.stripe_charge_id == any_(bindparam("charges", type_=ARRAY(String))))
    )
)
LINK_DISPUTES = ArrayUpdate(DISPUTES, ["account_id"], where='"disputes".account_id IS NULL')


def _no_first_payment(row: MirrorDict) -> tuple[str, datetime] | None:
    return None


@dataclass
class PaymentChange:
    """What one event says about a payment: `values` by column (None: not known from this
    event), merged by `merge_payment`."""

    ctx: EventContext
    stripe_id: str
    values: dict[str, Any]
    first_payment: Callable[[MirrorDict], tuple[str, datetime] | None] = _no_first_payment
    """Given the merged row: the (account, paid at) this event records as a payment of the
    account (`RECORD_FIRST_PAYMENTS`, with the row's currency), if any."""


def merge_payment(row: MirrorDict, values: dict[str, Any]) -> None:
    """The monotonic merge of what an event says into a payment row: the status only moves
    forward, the amount refunded only grows, disputed stays, the earliest paid time wins, the
    amount and currency are the event's, the charge is the succeeded one's (a declined
    attempt's is kept only until then), and everything else is kept once known."""
    for key, value in values.items():
        if value is None:
            continue
        if key == "status":
            row[key] = rank_merge(PAYMENT_STATUS_ORDER, row[key], value) or value
        elif key == "amount_refunded":
            row[key] = max(row[key], value)
        elif key == "disputed":
            row[key] = row[key] or bool(value)
        elif key == "paid_at":
            row[key] = min(row[key], value) if row[key] else value
        elif key == "stripe_charge_id" and values.get("status") == "succeeded":
            # a payment intent may have declined charges before the one that succeeded
            row[key] = value
        elif key in ("amount", "currency") or row[key] is None:
            row[key] = value


async def apply_payment_changes(changes: Sequence[PaymentChange]) -> None:
    """Merge the changes into their payment rows, in order, with a handful of statements
    whatever their number: lock (and create) the rows, merge in Python, write the rows that
    changed, then the effects: disputes mirrored before their payment, the accounts' first
    payments, and the refund and dispute effects of every payment that is new or one of
    whose `PAYMENT_LINKS` became known (`reapply_money_effects`). The merges commute, so
    this ends where applying the events one by one would."""
    session = changes[0].ctx.session
    defaults: dict[str, dict[str, Any]] = {}
    for change in changes:  # a new row starts from its first change's values
        values = change.values
        defaults.setdefault(
            change.stripe_id,
            {
                "amount": _known(values, "amount", 0),
                "currency": _known(values, "currency", ""),
                "status": _known(values, "status", "pending"),
            },
        )
    rows, created = await locked_rows(session, PAYMENTS, defaults)
    stored = {stripe_id: dict(row) for stripe_id, row in rows.items()}
    first_payments: FirstPayments = {}
    learned_from: dict[str, EventContext] = {}  # payment -> the first event that taught
    # payment -> the first event that made it known by a reference a request may name: new,
    # linked, or named by its Checkout session (whose event follows the charge's)
    named_from: dict[str, EventContext] = {}
    for change in changes:
        row = rows[change.stripe_id]
        links_before = [row[link] for link in PAYMENT_LINKS]
        session_before = row["stripe_checkout_session_id"]
        merge_payment(row, change.values)
        if (first := change.first_payment(row)) is not None:
            add_first_payment(first_payments, *first, row["currency"])
        if change.stripe_id in created or links_before != [row[link] for link in PAYMENT_LINKS]:
            learned_from.setdefault(change.stripe_id, change.ctx)
            named_from.setdefault(change.stripe_id, change.ctx)
        elif row["stripe_checkout_session_id"] != session_before:
            named_from.setdefault(change.stripe_id, change.ctx)
    await _link_disputes(session, rows)
    await write_rows(session, PAYMENTS, rows, stored)
    await record_first_payments(session, first_payments)
    if named_from:
        # Requests about these payments that arrived before them can be identified now (first:
        # a chargeback mirrored before its payment then closes them, as any other).
        known = {stripe_id: rows[stripe_id] for stripe_id in named_from}
        accounts = sorted({row["account_id"] for row in known.values() if row["account_id"]})
        if accounts:
            await identify_waiting_requests(
                session,
                changes[0].ctx.settings,
                account_ids=accounts,
                known_at={row["id"]: named_from[sid].created for sid, row in known.items()},
                now=changes[0].ctx.now,
            )
    if learned_from:
        await reapply_money_effects(
            "id", {rows[stripe_id]["id"]: ctx for stripe_id, ctx in learned_from.items()}
        )


def _known(values: dict[str, Any], key: str, default: Any) -> Any:
    value = values.get(key)
    return default if value is None else value


async def _link_disputes(session: AsyncSession, rows: dict[str, MirrorDict]) -> None:
    """A dispute may have been mirrored before the payment it is about: the payment is
    marked disputed, and the dispute gets the payment's account if it still lacks one."""
    charges = {row["stripe_charge_id"]: row for row in rows.values() if row["stripe_charge_id"]}
    driver = await session_driver(session)
    disputes = await DISPUTES_OF_PAYMENTS.fetch(
        driver, payment_intents=list(rows), charges=list(charges)
    )
    unlinked: dict[uuid.UUID, str] = {}  # dispute -> the first account found for it
    for dispute_id, account_id, payment_intent, charge_id in disputes:
        for row in (rows.get(payment_intent or ""), charges.get(charge_id)):
            if row is None:
                continue
            row["disputed"] = True
            if account_id is None and row["account_id"] is not None:
                unlinked.setdefault(dispute_id, row["account_id"])
    await LINK_DISPUTES.execute(
        driver, [{"id": dispute_id, "account_id": a} for dispute_id, a in unlinked.items()]
    )


# --- checkout sessions ---------------------------------------------------------------------


CHECKOUT_EVENTS = frozenset(
    {
        "checkout.session.completed",
        "checkout.session.expired",
        "checkout.session.async_payment_succeeded",
        "checkout.session.async_payment_failed",
    }
)
CHECKOUT_MERGED = (
    "stripe_id",
    "status",
    "payment_status",
    "stripe_subscription_id",
    "stripe_payment_intent_id",
    "fulfilled_at",
)
"""The columns of our checkout sessions that their events change."""
LOCKED_CHECKOUTS = DriverStatement(
    select(
        CHECKOUTS.c.id,
        CHECKOUTS.c.account_id,
        CHECKOUTS.c.purpose,
        CHECKOUTS.c.currency,
        *(CHECKOUTS.c[name] for name in CHECKOUT_MERGED),
    )
    .where(
        (CHECKOUTS.c.stripe_id == any_(bindparam("stripe_ids", type_=ARRAY(String))))
        | (CHECKOUTS.c.id == any_(bindparam("ids", type_=ARRAY(Uuid))))
    )
    .order_by(CHECKOUTS.c.id)
    .with_for_update()
)
WRITE_CHECKOUTS = ArrayUpdate(CHECKOUTS, CHECKOUT_MERGED)
_subscription_ids = bindparam("subscriptions", type_=ARRAY(String))
FULFILLING_SUBSCRIPTIONS = DriverStatement(
    union_all(
        select(Subscription.stripe_id).where(
            Subscription.stripe_id == any_(_subscription_ids),
            Subscription.status.in_([literal(status) for status in sorted(LIVE_STATUSES)]),
        ),
        select(Invoice.stripe_subscription_id).where(
            Invoice.stripe_subscription_id == any_(_subscription_ids), Invoice.status == "paid"
        ),
    )
)
"""Of these subscriptions, those that fulfil their checkout: live, or with a paid invoice."""


async def on_checkout_events(ctxs: Sequence[EventContext]) -> None:
    """Checkout session events, applied together to our checkout sessions (found by Stripe
    id, else by our id in the metadata; unknown ones are logged and skipped), in order:
    status and payment status forward, Stripe ids kept once known, the account linked to its
    Stripe customer and, when it has no billing contact, given the email entered at Checkout
    (`FILL_CONTACTS`); a paid top-up or debt repayment credits the balance once (one ledger
    entry per session), mirrors its payment (`apply_payment_changes`) and is the account's
    payment. One paid in another currency than the account's (two balance checkouts opened
    in different currencies before the first payment: the first credited binds the account)
    is mirrored as a succeeded payment but neither credited nor fulfilled
    (`ledger_entries_in_account_currency`, log `ledger.currency_mismatch`); finance refunds it
    on review. A subscription checkout is fulfilled once its subscription is live or an
    invoice of it is paid."""
    session, now = ctxs[0].session, ctxs[0].now
    found = await LOCKED_CHECKOUTS.fetch(
        await session_driver(session),
        stripe_ids=sorted({ctx.object["id"] for ctx in ctxs}),
        ids=sorted({our_id for ctx in ctxs if (our_id := _our_checkout(ctx.object))}),
    )
    rows = {row["id"]: dict(row) for row in found}
    stored = {row_id: dict(row) for row_id, row in rows.items()}
    by_stripe_id = {row["stripe_id"]: row for row in rows.values() if row["stripe_id"]}
    customers: dict[tuple[str, str], None] = {}  # (account, Stripe customer), in order
    contacts: dict[str, str] = {}  # account -> the email entered at Checkout (the first)
    credits: list[dict[str, Any]] = []
    paid_at: dict[str, datetime] = {}  # credited Stripe session -> when it was paid
    payments: list[PaymentChange] = []
    first_payments: FirstPayments = {}
    learned_at: dict[uuid.UUID, datetime] = {}  # checkout -> its earliest event applied here
    for ctx in ctxs:
        obj = ctx.object
        our_id = _our_checkout(obj)
        row = by_stripe_id.get(obj["id"]) or (rows.get(our_id) if our_id else None)
        if row is None:
            log.info("checkout_session.unknown", stripe_id=obj.get("id"))
            continue
        learned_at[row["id"]] = min(learned_at.get(row["id"], ctx.created), ctx.created)
        row["stripe_id"] = row["stripe_id"] or obj["id"]
        by_stripe_id.setdefault(row["stripe_id"], row)
        row["status"] = (
            rank_merge(CHECKOUT_STATUS_ORDER, row["status"], obj.get("status")) or row["status"]
        )
        row["payment_status"] = rank_merge(
            CHECKOUT_PAYMENT_ORDER, row["payment_status"], obj.get("payment_status")
        )
        row["stripe_subscription_id"] = row["stripe_subscription_id"] or ref(
            obj.get("subscription")
        )
        row["stripe_payment_intent_id"] = row["stripe_payment_intent_id"] or ref(
            obj.get("payment_intent")
        )
        if (customer := ref(obj.get("customer"))) is not None:
            customers[(row["account_id"], customer)] = None
        if plausible_email(email := (obj.get("customer_details") or {}).get("email")):
            contacts.setdefault(row["account_id"], email)
        paid = (
            ctx.type == "checkout.session.completed" and obj.get("payment_status") == "paid"
        ) or ctx.type == "checkout.session.async_payment_succeeded"
        if row["purpose"] in ("top_up", "debt_repayment") and paid:
            credit = _credit(ctx, row, obj)
            credits.append(credit)
            row["fulfilled_at"] = row["fulfilled_at"] or now
            paid_at.setdefault(credit["source_id"], ctx.created)
            if (payment_intent := ref(obj.get("payment_intent"))) is not None:
                payments.append(_checkout_payment(ctx, payment_intent, credit))
    credits, refused = await ledger_entries_in_account_currency(session, credits)
    for credit in refused:  # paid in another currency than the account's: recorded, not credited
        row = by_stripe_id[credit["source_id"]]
        row["fulfilled_at"] = stored[row["id"]]["fulfilled_at"]
    for credit in credits:
        add_first_payment(
            first_payments, credit["account_id"], paid_at[credit["source_id"]], credit["currency"]
        )
    await _fulfil_waiting_subscription_checkouts(session, now, rows.values())
    changed = [row for row_id, row in rows.items() if row != stored[row_id]]
    await WRITE_CHECKOUTS.execute(await session_driver(session), changed)
    # A request naming a subscription's Checkout session names the payment it took once the
    # session is linked to its subscription (`find_payment_by_reference`), which may come
    # after that payment's own events: requests still waiting are identified now, their clock
    # from receipt if Stripe had completed the session by then.
    linked: dict[str, datetime] = {}
    for row in changed:
        if row["purpose"] == "subscription" and row["stripe_subscription_id"]:
            at = learned_at[row["id"]]
            linked[row["account_id"]] = min(linked.get(row["account_id"], at), at)
    if linked:
        await identify_waiting_requests(
            session,
            ctxs[0].settings,
            account_ids=sorted(linked),
            known_at={},
            now=ctxs[0].now,
            since=linked,
        )
    await link_customers(session, customers)
    await FILL_CONTACTS.execute(
        await session_driver(session), [{"id": a, "email": e} for a, e in contacts.items()]
    )
    if credits:
        await ADD_LEDGER_ENTRIES.execute(await session_driver(session), credits)
    if payments:
        await apply_payment_changes(payments)
    await record_first_payments(session, first_payments)


def _our_checkout(checkout_session: Json) -> uuid.UUID | None:
    """Our checkout session's id, from the Stripe session's metadata."""
    return _uuid((checkout_session.get("metadata") or {}).get("checkout_session_id"))


def _credit(ctx: EventContext, row: MirrorDict, obj: Json) -> dict[str, Any]:
    """The ledger entry crediting a paid top-up or debt repayment (once per session)."""
    amount = obj.get("amount_total")
    if not isinstance(amount, int) or amount <= 0:
        raise ValueError(f"checkout session {obj['id']} has no amount_total")
    return {
        "account_id": row["account_id"],
        "kind": row["purpose"],
        "source_id": obj["id"],
        "amount": amount,
        "currency": str(obj.get("currency") or row["currency"]),
        "description": "Balance top-up" if row["purpose"] == "top_up" else "Debt repayment",
        "occurred_at": ts(obj.get("created")) or ctx.created,
    }


def _checkout_payment(
    ctx: EventContext, payment_intent: str, credit: dict[str, Any]
) -> PaymentChange:
    """The payment of a paid top-up or debt repayment."""
    values = {
        "account_id": credit["account_id"],
        "purpose": credit["kind"],
        "stripe_checkout_session_id": ctx.object["id"],
        "amount": credit["amount"],
        "currency": credit["currency"],
        "status": "succeeded",
        "paid_at": ctx.created,
    }
    return PaymentChange(ctx, payment_intent, values)


async def _fulfil_waiting_subscription_checkouts(
    session: AsyncSession, now: datetime, rows: Iterable[MirrorDict]
) -> None:
    """Subscription checkouts not fulfilled yet are fulfilled (`fulfilled_at` set in `rows`)
    when their subscription is live or has a paid invoice."""
    waiting: dict[str, list[MirrorDict]] = {}
    for row in rows:
        subscription_id = row["stripe_subscription_id"]
        if row["purpose"] == "subscription" and subscription_id and row["fulfilled_at"] is None:
            waiting.setdefault(subscription_id, []).append(row)
    if not waiting:
        return
    found = await FULFILLING_SUBSCRIPTIONS.fetch(
        await session_driver(session), subscriptions=sorted(waiting)
    )
    for subscription_id in {row[0] for row in found}:
        for row in waiting[subscription_id]:
            row["fulfilled_at"] = now


# --- subscriptions -------------------------------------------------------------------------


SUBSCRIPTION_EVENTS = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.paused",
        "customer.subscription.resumed",
    }
)


@dataclass
class _Links:
    """What a subscription group links, written in three statements: the accounts (ensured),
    their Stripe customers (set once) and the channels (created with their owner)."""

    customers: dict[tuple[str, str | None], None] = field(default_factory=dict)
    channels: dict[tuple[str, str], None] = field(default_factory=dict)

    async def write(self, session: AsyncSession) -> None:
        """In first-seen order, as one statement per event would (the first link wins)."""
        await ensure_accounts(session, (account for account, _ in self.customers))
        await link_customers(session, self.customers)
        if self.channels:
            await NEW_CHANNELS.execute(
                await session_driver(session),
                [{"id": channel, "account_id": account} for channel, account in self.channels],
            )
        self.customers.clear()
        self.channels.clear()


async def on_subscription_events(ctxs: Sequence[EventContext]) -> None:
    """Subscription events, applied together: each subscription's events folded into its row
    in stored order by the newest-event-wins rule (module docstring), then the new rows
    inserted and the changed ones written, the accounts' customers and the channels linked,
    the live subscriptions' checkouts fulfilled and the channels' access feed appended, each
    in one statement for the group; a subscription new to the mirror then completes the money
    effects that were waiting for it (`reapply_money_effects`, in the context of the event
    that created it). The feed gets each channel's access after the group rather than after
    every event: the entries in between depend on the delivery order anyway."""
    session, settings = ctxs[0].session, ctxs[0].settings
    found = await LOCKED_SUBSCRIPTIONS.fetch(
        await session_driver(session), stripe_ids=sorted({ctx.object["id"] for ctx in ctxs})
    )
    stored = {row["stripe_id"]: dict(row) for row in found}
    rows: dict[str, MirrorDict] = {stripe_id: dict(row) for stripe_id, row in stored.items()}
    created: dict[str, EventContext] = {}  # new to the mirror: the event that created it
    links = _Links()
    channels: set[str] = set()
    fulfilled: dict[tuple[str, uuid.UUID | None], None] = {}
    for ctx in ctxs:
        obj = ctx.object
        row = rows.get(obj["id"])
        refetch = not ctx.in_pinned_version  # another version's shape (e.g. no item periods)
        if row is not None and row["source_event_created"] is not None:
            if ctx.created < row["source_event_created"]:
                # routine when Stripe delivers out of order: debug, not info
                log.debug("subscription.stale_event_ignored", stripe_id=obj["id"], type=ctx.type)
                continue
            refetch = refetch or ctx.created == row["source_event_created"]
        if refetch:
            obj = await ctx.stripe.retrieve_subscription(obj["id"])
        metadata = obj.get("metadata") or {}
        customer_id = ref(obj.get("customer"))
        account_id = metadata.get("account_id") or (row["account_id"] if row else None)
        if account_id is None and customer_id is not None:
            await links.write(session)  # the customer may have been linked by this group
            account_id = (await _accounts_of_customers(session, [customer_id])).get(customer_id)
        channel_id = metadata.get("channel_id") or (row["channel_id"] if row else None)
        if account_id is None or channel_id is None:
            log.warning("subscription.unlinked", stripe_id=obj["id"])
            continue
        links.customers[(account_id, customer_id)] = None
        links.channels[(channel_id, account_id)] = None
        values = _subscription_values(settings, obj, account_id, channel_id, ctx.created)
        if row is not None and row["status"] in TERMINAL_SUBSCRIPTION_STATUSES:
            values["status"] = row["status"]  # a canceled subscription never comes back
        # the event that first showed this status (events are applied oldest first)
        values["status_since"] = (
            row["status_since"]
            if row is not None and row["status"] == values["status"]
            else ctx.created
        )
        if row is None:
            rows[obj["id"]] = {"id": None, "extension_days_in_period": 0, **values}
            created[obj["id"]] = ctx
        else:
            row.update(values)
        if values["status"] in LIVE_STATUSES:
            fulfilled[(obj["id"], _uuid(metadata.get("checkout_session_id")))] = None
        channels.add(channel_id)
    await links.write(session)
    if created:
        await NEW_SUBSCRIPTIONS.execute(
            await session_driver(session),
            [
                {
                    "id": uuid.uuid4(),
                    "stripe_id": stripe_id,
                    **{name: rows[stripe_id][name] for name in SUBSCRIPTION_SNAPSHOT},
                }
                for stripe_id in created
            ],
        )
    changed = []
    for stripe_id, before in stored.items():
        row = rows[stripe_id]
        # with the maintenance days this snapshot's period holds
        row["extension_days_in_period"] = await extension_days_held(
            session, row["id"], row["trial_end"]
        )
        if any(before[name] != row[name] for name in SUBSCRIPTION_SNAPSHOT):
            changed.append(row)
    await WRITE_SUBSCRIPTIONS.execute(await session_driver(session), changed)
    await fulfil_subscription_checkouts(session, ctxs[0].now, list(fulfilled))
    await record_access_changes(session, dict.fromkeys(channels, ctxs[0].now), settings)
    if created:  # effects that needed the subscription row can complete now
        await reapply_money_effects("stripe_subscription_id", created)


def _subscription_values(
    settings: Settings, obj: Json, account_id: str, channel_id: str, created: datetime
) -> dict[str, Any]:
    """The subscription row as this snapshot says (`SUBSCRIPTION_SNAPSHOT` but the
    maintenance days), `created` being its event's. The plan is the catalog's plan of the
    item's price (`_plan_item`: of several items, the one of a catalog price); a price
    outside the catalog keeps the plan its checkout named (metadata `plan_code`, e.g. a plan
    taken off sale) unless that plan is on sale at another price: then the price was changed
    away from it (e.g. in Stripe's dashboard) and it is no plan of ours (None)."""
    metadata = obj.get("metadata") or {}
    item = _plan_item(settings, obj)
    price_id = ref(item.get("price")) if item else None
    plan = next((p for p in settings.plans if p.stripe_price_id == price_id), None)
    named = metadata.get("plan_code")
    if plan is None and price_id is not None and settings.plan(str(named)) is not None:
        named = None  # its checkout's plan is sold at another price: not this one
    return {
        "account_id": account_id,
        "channel_id": channel_id,
        "stripe_customer_id": ref(obj.get("customer")),
        "plan_code": plan.code if plan else named,
        "stripe_price_id": price_id,
        "status": str(obj.get("status")),
        "cancel_at_period_end": bool(obj.get("cancel_at_period_end")),
        "cancel_at": ts(obj.get("cancel_at")),
        "current_period_start": ts(item.get("current_period_start")) if item else None,
        "current_period_end": ts(item.get("current_period_end")) if item else None,
        "trial_end": ts(obj.get("trial_end")),
        "canceled_at": ts(obj.get("canceled_at")),
        "ended_at": ts(obj.get("ended_at")),
        "source_event_created": created,  # never older than the stored one (see above)
    }


FULFIL_SUBSCRIPTION_CHECKOUTS = (  # sent straight to asyncpg
    "WITH v AS (SELECT * FROM unnest($1::varchar[], $2::uuid[])"
    " WITH ORDINALITY AS v(subscription, checkout, n)),"
    " matched AS ("  # two joins, not one on an OR (a nested loop over every checkout)
    " SELECT checkout_sessions.id, v.subscription, v.n FROM v"
    " JOIN checkout_sessions ON checkout_sessions.stripe_subscription_id = v.subscription"
    " UNION ALL SELECT checkout_sessions.id, v.subscription, v.n FROM v"
    " JOIN checkout_sessions ON checkout_sessions.id = v.checkout)"
    " UPDATE checkout_sessions"
    " SET fulfilled_at = $3, stripe_subscription_id = first.subscription, updated_at = now()"
    " FROM (SELECT DISTINCT ON (id) id, subscription FROM matched ORDER BY id, n) AS first"
    " WHERE checkout_sessions.id = first.id AND checkout_sessions.fulfilled_at IS NULL"
)
"""Fulfils the checkouts of ($1 Stripe subscriptions, $2 our checkout ids or NULLs) pairs at
$3, as one `UPDATE` per pair, in order, would: a pair fulfils the unfulfilled checkouts of
its subscription or with its checkout id, and sets their subscription (a checkout matched
by several pairs takes the first one's)."""


async def fulfil_subscription_checkouts(
    session: AsyncSession, now: datetime, checkouts: Sequence[tuple[str, uuid.UUID | None]]
) -> None:
    """A subscription checkout is fulfilled once its subscription is live or an invoice of it
    is paid, whichever event is applied first (the checkout event itself checks too).
    `checkouts`: (Stripe subscription, our checkout session id from its metadata if any), in
    one statement (`FULFIL_SUBSCRIPTION_CHECKOUTS`)."""
    if checkouts:
        await (await session_driver(session)).execute(
            FULFIL_SUBSCRIPTION_CHECKOUTS,
            [subscription for subscription, _ in checkouts],
            [checkout for _, checkout in checkouts],
            now,
        )


def _plan_item(settings: Settings, subscription: Json) -> Json | None:
    """The subscription's item of a catalog price, else its first item. A subscription may
    have several items (an add-on price added in Stripe's Dashboard, listed in any place):
    the plan is the one of the catalog's price it bills, not of whichever item comes first."""
    items = subscription.get("items")
    data = items.get("data") if isinstance(items, dict) else None
    if not isinstance(data, list):
        return None
    found = [item for item in data if isinstance(item, dict)]
    catalog = {plan.stripe_price_id for plan in settings.plans}
    return next((item for item in found if ref(item.get("price")) in catalog), None) or (
        found[0] if found else None
    )


# --- invoices and payments -----------------------------------------------------------------


async def on_invoice_events(ctxs: Sequence[EventContext]) -> None:
    """Invoice events, applied together: each merged into its invoice row in order (status
    forward, amount paid only grows, account, subscription and paid time kept once known,
    amount due and period as the latest event says), the rows written in one statement; then
    the subscription checkouts of paid invoices fulfilled, the invoices' payments given the
    account and subscription (`LINK_INVOICE_PAYMENTS`), and the refund and dispute effects of
    every invoice that is new or taught its payments something applied again. An invoice
    event rendered in another API version (`EventContext.in_pinned_version`) is read as
    Stripe has the invoice now, in the pinned one: before basil an invoice named its
    subscription and our metadata elsewhere (no `parent`)."""
    session, now = ctxs[0].session, ctxs[0].now
    objects: list[Json] = [
        ctx.object if ctx.in_pinned_version else await ctx.stripe.retrieve_invoice(ctx.object["id"])
        for ctx in ctxs
    ]
    accounts = await _accounts_of_customers(
        session,
        (
            ref(obj.get("customer"))
            for obj in objects
            if not _invoice_metadata(obj).get("account_id")
        ),
    )
    await ensure_accounts(
        session,
        (
            account_id
            for obj in objects
            if isinstance(account_id := _invoice_metadata(obj).get("account_id"), str)
            and account_id
        ),
    )
    defaults = {
        obj["id"]: {"currency": obj.get("currency") or ""} for obj in reversed(objects)
    }  # reversed: a new row starts from its first event's currency
    rows, created = await locked_rows(session, INVOICES, defaults)
    stored = {stripe_id: dict(row) for stripe_id, row in rows.items()}
    taught: dict[str, EventContext] = {
        obj["id"]: ctx for ctx, obj in reversed(list(zip(ctxs, objects, strict=True)))
    }
    payment_links: dict[str, list[str | None]] = {}  # invoice -> [account, subscription]
    fulfilled: dict[tuple[str, uuid.UUID | None], None] = {}
    for obj in objects:
        metadata = _invoice_metadata(obj)
        subscription_id = ref(
            ((obj.get("parent") or {}).get("subscription_details") or {}).get("subscription")
        )
        account_id = metadata.get("account_id") or accounts.get(ref(obj.get("customer")) or "")
        row = rows[obj["id"]]
        row["account_id"] = row["account_id"] or account_id
        row["stripe_subscription_id"] = row["stripe_subscription_id"] or subscription_id
        row["status"] = rank_merge(INVOICE_STATUS_ORDER, row["status"], obj.get("status"))
        row["amount_due"] = int(obj.get("amount_due") or 0)
        row["amount_paid"] = max(row["amount_paid"], int(obj.get("amount_paid") or 0))
        row["period_start"] = ts(obj.get("period_start"))
        row["period_end"] = ts(obj.get("period_end"))
        transitions = obj.get("status_transitions") or {}
        row["paid_at"] = row["paid_at"] or ts(transitions.get("paid_at"))
        if row["status"] == "paid" and subscription_id is not None:
            fulfilled[(subscription_id, _uuid(metadata.get("checkout_session_id")))] = None
        links = payment_links.setdefault(obj["id"], [None, None])
        links[0] = links[0] or account_id
        links[1] = links[1] or subscription_id
    await write_rows(session, INVOICES, rows, stored)
    await fulfil_subscription_checkouts(session, now, list(fulfilled))
    linked = await (await session_driver(session)).fetch(
        LINK_INVOICE_PAYMENTS,
        list(payment_links),
        [account for account, _ in payment_links.values()],
        [subscription for _, subscription in payment_links.values()],
    )
    learned = (
        created
        | {row["invoice_id"] for row in linked}
        | {
            stripe_id
            for stripe_id, row in rows.items()
            if (row["account_id"], row["stripe_subscription_id"])
            != (stored[stripe_id]["account_id"], stored[stripe_id]["stripe_subscription_id"])
        }
    )
    if learned:
        await reapply_money_effects(
            "stripe_invoice_id", {stripe_id: taught[stripe_id] for stripe_id in sorted(learned)}
        )


def _invoice_metadata(invoice: Json) -> Json:
    """Our metadata on the invoice's subscription (`account_id`, `checkout_session_id`)."""
    details = (invoice.get("parent") or {}).get("subscription_details") or {}
    metadata: Json = details.get("metadata") or {}
    return metadata


async def _accounts_of_customers(
    session: AsyncSession, customers: Iterable[str | None]
) -> dict[str, str]:
    """The accounts of these Stripe customers (those known), in one statement."""
    wanted = sorted({customer for customer in customers if customer is not None})
    if not wanted:
        return {}
    found = await ACCOUNTS_OF_CUSTOMERS.fetch(await session_driver(session), customers=wanted)
    return {str(customer): account_id for customer, account_id in found}


LINK_INVOICE_PAYMENTS = (  # sent straight to asyncpg: $1 invoices, $2 accounts, $3 subscriptions
    "UPDATE payments"
    " SET account_id = coalesce(payments.account_id, v.account_id),"
    " stripe_subscription_id = coalesce(payments.stripe_subscription_id, v.subscription_id),"
    # an invoice of no subscription, paid before its invoice was mirrored: not one's payment
    " purpose = CASE WHEN v.subscription_id IS NULL AND payments.stripe_subscription_id IS NULL"
    " AND payments.purpose = 'subscription' THEN NULL ELSE payments.purpose END,"
    " updated_at = now()"
    " FROM unnest($1::text[], $2::text[], $3::text[])"
    " AS v(invoice_id, account_id, subscription_id)"
    " WHERE payments.stripe_invoice_id = v.invoice_id"
    " AND ((payments.account_id IS NULL AND v.account_id IS NOT NULL)"
    " OR (payments.stripe_subscription_id IS NULL AND v.subscription_id IS NOT NULL)"
    " OR (v.subscription_id IS NULL AND payments.stripe_subscription_id IS NULL"
    " AND payments.purpose = 'subscription'))"
    " RETURNING v.invoice_id"
)
"""The payments of each invoice get the account and subscription its events named (the
first each named, as one `UPDATE` per event would); returns the invoices whose payments
learned something. An invoice of no subscription (`parent` null: one made in Stripe's
Dashboard) is no subscription's payment: an invoice payment applied before its invoice was
taken for one (`invoice_payment_change`) and loses that purpose here."""


INVOICE_EVENTS = frozenset(
    {
        "invoice.paid",
        "invoice.payment_failed",
        "invoice.finalized",
        "invoice.voided",
        "invoice.marked_uncollectible",
    }
)
CHARGE_EVENTS = frozenset(
    {"charge.succeeded", "charge.updated", "charge.refunded", "charge.failed"}
)
ACCOUNTS_OF_CUSTOMERS = DriverStatement(
    select(Account.stripe_customer_id, Account.id).where(
        Account.stripe_customer_id == any_(bindparam("customers", type_=ARRAY(String)))
    )
)
INVOICE_LINKS = DriverStatement(
    select(Invoice.stripe_id, Invoice.account_id, Invoice.stripe_subscription_id).where(
        Invoice.stripe_id == any_(bindparam("invoices", type_=ARRAY(String)))
    )
)


async def on_payment_events(ctxs: Sequence[EventContext]) -> None:
    """Charge and invoice payment events, applied together (`apply_payment_changes`): the
    accounts of charges' customers and the invoices of invoice payments are looked up in one
    statement each."""
    session = ctxs[0].session
    charges = [ctx for ctx in ctxs if ctx.type in CHARGE_EVENTS]
    accounts = await _accounts_of_customers(
        session,
        (
            ref(ctx.object.get("customer"))
            for ctx in charges
            if not (ctx.object.get("metadata") or {}).get("account_id")
        ),
    )
    invoice_ids = {
        invoice_id
        for ctx in ctxs
        if ctx.type not in CHARGE_EVENTS and (invoice_id := ref(ctx.object.get("invoice")))
    }
    invoices: dict[str, tuple[str | None, str | None]] = {}
    if invoice_ids:
        links = await INVOICE_LINKS.fetch(
            await session_driver(session), invoices=sorted(invoice_ids)
        )
        invoices = {stripe_id: (account, sub) for stripe_id, account, sub in links}
    await ensure_accounts(
        session,
        (
            account_id
            for ctx in charges
            if isinstance(account_id := (ctx.object.get("metadata") or {}).get("account_id"), str)
            and account_id
        ),
    )
    changes = [
        change
        for ctx in ctxs
        if (
            change := charge_change(ctx, accounts)
            if ctx.type in CHARGE_EVENTS
            else invoice_payment_change(ctx, invoices)
        )
        is not None
    ]
    if changes:
        await apply_payment_changes(changes)


def invoice_payment_change(
    ctx: EventContext, invoices: dict[str, tuple[str | None, str | None]]
) -> PaymentChange | None:
    """`invoices`: (account, subscription) of the invoices mirrored so far."""
    obj = ctx.object
    payment = obj.get("payment") or {}
    payment_intent = ref(payment.get("payment_intent"))
    if payment_intent is None:
        log.info("invoice_payment.not_a_payment_intent", stripe_id=obj.get("id"))
        return None
    invoice_id = ref(obj.get("invoice"))
    account_id, subscription_id = invoices.get(invoice_id or "", (None, None))
    # An invoice mirrored without a subscription (`parent` null: made in Stripe's Dashboard)
    # is paid by no subscription payment: no refund right, no period. One not mirrored yet is
    # taken for a subscription's until its invoice says otherwise (`LINK_INVOICE_PAYMENTS`).
    one_off = invoice_id in invoices and subscription_id is None
    transitions = obj.get("status_transitions") or {}
    paid_at = ts(transitions.get("paid_at")) or ctx.created
    paid = obj.get("status") == "paid"

    def first_payment(row: MirrorDict) -> tuple[str, datetime] | None:
        if row["account_id"] and row["status"] == "succeeded":
            return row["account_id"], paid_at
        return None

    return PaymentChange(
        ctx,
        payment_intent,
        {
            "purpose": None if one_off else "subscription",
            "stripe_invoice_id": invoice_id,
            "stripe_subscription_id": subscription_id,
            "account_id": account_id,
            "amount": int(obj.get("amount_paid") or obj.get("amount_requested") or 0),
            "currency": obj.get("currency"),
            "status": "succeeded" if paid else None,
            "paid_at": paid_at if paid else None,
        },
        first_payment=first_payment,
    )


def charge_change(ctx: EventContext, accounts: dict[str, str]) -> PaymentChange | None:
    """`accounts`: the accounts of Stripe customers (for charges without our metadata)."""
    obj = ctx.object
    payment_intent = ref(obj.get("payment_intent"))
    if payment_intent is None:
        log.info("charge.without_payment_intent", stripe_id=obj.get("id"))
        return None
    metadata = obj.get("metadata") or {}
    account_id = metadata.get("account_id") or accounts.get(ref(obj.get("customer")) or "")
    succeeded = obj.get("status") == "succeeded" and bool(obj.get("paid"))
    paid_at = ts(obj.get("created")) or ctx.created
    transaction = obj.get("balance_transaction")

    def first_payment(row: MirrorDict) -> tuple[str, datetime] | None:
        return (account_id, paid_at) if succeeded and account_id is not None else None

    return PaymentChange(
        ctx,
        payment_intent,
        {
            "account_id": account_id,
            "purpose": metadata.get("purpose"),
            "stripe_charge_id": obj.get("id"),
            "amount": int(obj.get("amount") or 0),
            "currency": obj.get("currency"),
            "status": "succeeded" if succeeded else obj.get("status"),
            "amount_refunded": int(obj.get("amount_refunded") or 0),
            "disputed": bool(obj.get("disputed")),
            "paid_at": ts(obj.get("created")) if succeeded else None,
            "stripe_balance_transaction_id": ref(transaction),
            # expanded, it carries the fee; an id is looked up later (app/webhooks/fees.py)
            "fee": (
                fee_in_payment_currency(transaction, str(obj.get("currency")))
                if isinstance(transaction, dict)
                else None
            ),
        },
        first_payment=first_payment,
    )


def accounts_named(events: Sequence[Json]) -> set[str]:
    """The 1msg accounts these events' handlers link objects to, by our metadata (checkout
    sessions, subscriptions, charges, invoices of subscriptions): ensured in one statement
    for a batch (`ensure_accounts`) instead of one per event."""
    named: set[str] = set()
    for event in events:
        obj = event["data"]["object"]
        parent = obj.get("parent") if event["type"].startswith("invoice.") else None
        details = (parent or {}).get("subscription_details") or {}
        for metadata in (obj.get("metadata"), details.get("metadata")):
            account_id = metadata.get("account_id") if isinstance(metadata, dict) else None
            if isinstance(account_id, str) and ACCOUNT_ID.fullmatch(account_id):
                named.add(account_id)
    return named


# --- refunds and disputes ------------------------------------------------------------------


REFUNDS = cast(Table, Refund.__table__)
REFUND_COLUMNS = [column for column in REFUNDS.c if column.name not in TIMESTAMPS]
REFUND_MERGED = (
    "stripe_payment_intent_id",
    "stripe_charge_id",
    "status",
    "reason",
    "metadata",
    "stripe_created",
)
"""The columns of a refund row that its events change (`merge_refund`)."""
REFUND_EVENTS = frozenset({"refund.created", "refund.updated", "refund.failed"})
LOCKED_REFUNDS = (
    select(*REFUND_COLUMNS)
    .where(REFUNDS.c.stripe_id == any_(bindparam("stripe_ids", type_=ARRAY(String))))
    .order_by(REFUNDS.c.stripe_id)
    .with_for_update()
)
NEW_REFUNDS = (
    insert(REFUNDS)
    .on_conflict_do_nothing(index_elements=["stripe_id"])
    .returning(REFUNDS.c.id, REFUNDS.c.stripe_id)
)
"""Refunds' first rows (a list of rows: one statement, SQLAlchemy's "insertmanyvalues");
returns those inserted (and so locked by this transaction), not those another transaction
created first."""
WRITE_REFUNDS = ArrayUpdate(REFUNDS, REFUND_MERGED)
"""Changed refund rows, `metadata` as JSON text (as the driver takes `jsonb`)."""
REFUNDS_BY_ID = select(*REFUND_COLUMNS).where(
    REFUNDS.c.id == any_(bindparam("ids", type_=ARRAY(Uuid)))
)
DISPUTES_BY_ID = select(*(column for column in DISPUTES.c if column.name not in TIMESTAMPS)).where(
    DISPUTES.c.id == any_(bindparam("ids", type_=ARRAY(Uuid)))
)
DISPUTES_IN_ORDER = (
    select(DISPUTES.c.stripe_id)
    .where(DISPUTES.c.stripe_id == any_(bindparam("stripe_ids", type_=ARRAY(String))))
    .order_by(DISPUTES.c.stripe_id)
)
"""Disputes in the database's order of their Stripe ids (its collation decides)."""


def merge_refund(row: MirrorDict, refund: Json) -> None:
    """What a refund event says, merged into its row: the status only moves forward, ids and
    Stripe's creation time are kept once known, the reason is the latest known, metadata
    keys are added or replaced."""
    row["stripe_payment_intent_id"] = row["stripe_payment_intent_id"] or ref(
        refund.get("payment_intent")
    )
    row["stripe_charge_id"] = row["stripe_charge_id"] or ref(refund.get("charge"))
    row["status"] = (
        rank_merge(REFUND_STATUS_ORDER, row["status"], refund.get("status")) or "pending"
    )
    row["reason"] = refund.get("reason") or row["reason"]
    row["metadata"] = {**row["metadata"], **(refund.get("metadata") or {})}
    row["stripe_created"] = row["stripe_created"] or ts(refund.get("created"))


def _new_refund(refund: Json) -> MirrorDict:
    """A refund's row before any event is merged in: its first event's amount, currency and
    status."""
    return {
        "stripe_id": refund["id"],
        "amount": int(refund.get("amount") or 0),
        "currency": refund.get("currency") or "",
        "status": refund.get("status") or "pending",
        "stripe_payment_intent_id": None,
        "stripe_charge_id": None,
        "reason": None,
        "metadata": {},
        "stripe_created": None,
    }


RefundStates = list[tuple[EventContext, MirrorDict]]
"""The distinct states a refund's row passed through, in order, each with the event that
led to it."""


def _fold_refund(row: MirrorDict, ctxs: Sequence[EventContext]) -> RefundStates:
    """`row` (left unchanged) with each event merged in, in order (`merge_refund`): the
    state after the first event, then each state that differs from the one before (the
    effects of an unchanged state change nothing more)."""
    states: RefundStates = []
    for ctx in ctxs:
        row = dict(row)
        merge_refund(row, ctx.object)
        if not states or row != states[-1][1]:
            states.append((ctx, row))
    return states


async def on_refund_events(ctxs: Sequence[EventContext]) -> None:
    """Refund events, applied together: the refunds' rows locked in one statement, the
    missing ones inserted as their events leave them in one more (one that lost a creation
    race to another transaction is read again, locked, and folded like the others), each
    refund's events folded in stored order (`_fold_refund`), the changed rows written in one
    statement; then the effects of every state each refund passed through
    (`apply_refund_effects`): a refund that succeeded and then failed within the group is
    debited and credited back, and our execution is told both, as one event per transaction
    would have them."""
    session = ctxs[0].session
    events: dict[str, list[EventContext]] = {}
    for ctx in ctxs:
        events.setdefault(ctx.object["id"], []).append(ctx)
    found = await session.execute(LOCKED_REFUNDS, {"stripe_ids": sorted(events)})
    stored = {row["stripe_id"]: dict(row) for row in found.mappings()}
    folds: dict[str, RefundStates] = {}
    new = {
        stripe_id: _fold_refund(_new_refund(its[0].object), its)
        for stripe_id, its in sorted(events.items())
        if stripe_id not in stored
    }
    if new:
        created = await session.execute(NEW_REFUNDS, [states[-1][1] for states in new.values()])
        for row_id, stripe_id in created.all():
            for _, row in new[stripe_id]:
                row["id"] = row_id
            folds[stripe_id] = new[stripe_id]
        lost = [stripe_id for stripe_id in new if stripe_id not in folds]
        if lost:
            found = await session.execute(LOCKED_REFUNDS, {"stripe_ids": lost})
            stored.update((row["stripe_id"], dict(row)) for row in found.mappings())
    for stripe_id, row in stored.items():
        folds[stripe_id] = _fold_refund(row, events[stripe_id])
    changed = [
        states[-1][1]
        for stripe_id, states in folds.items()
        if stripe_id in stored and states[-1][1] != stored[stripe_id]
    ]
    if changed:
        await WRITE_REFUNDS.execute(
            await session_driver(session),
            [{**row, "metadata": orjson.dumps(row["metadata"]).decode()} for row in changed],
        )
    await apply_refund_effects([folds[stripe_id] for stripe_id in events])  # as they came


DISPUTE_EVENTS = frozenset(
    {
        "charge.dispute.created",
        "charge.dispute.updated",
        "charge.dispute.closed",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.funds_reinstated",
    }
)
PAYMENTS_OF_DISPUTES = disputes_events.PAYMENTS_OF_DISPUTES
"""The payments (ids, account, purpose, subscription, invoice, charge) of payment intents or
charges (`DisputedPayments`)."""
MARK_DISPUTED = (
    update(PAYMENTS)
    .where(
        PAYMENTS.c.id == any_(bindparam("payment_ids", type_=ARRAY(Uuid))),
        PAYMENTS.c.disputed.is_(False),
    )
    .values(disputed=True)
)


async def on_dispute_events(ctxs: Sequence[EventContext]) -> None:
    """Dispute events, applied together: each merged into its dispute row in order (status
    forward, funds withdrawn and reinstated only grow, ids, account and Stripe's creation
    time kept once known, the earliest closing kept), the rows written in one statement, their
    payments marked disputed in one more; then the effects of each dispute, once, from its
    merged state, in the order of their Stripe ids (`apply_dispute_effects`, each in the
    context of its last event). The payments are read once, for the merge and the effects."""
    session = ctxs[0].session
    objects = [ctx.object for ctx in ctxs]
    defaults = {
        obj["id"]: {
            "stripe_charge_id": ref(obj.get("charge")) or "",
            "amount": int(obj.get("amount") or 0),
            "currency": obj.get("currency") or "",
            "status": obj.get("status") or "needs_response",
        }
        for obj in reversed(objects)  # a new row starts from its first event's values
    }
    rows, _ = await locked_rows(session, DISPUTES, defaults)
    stored = {stripe_id: dict(row) for stripe_id, row in rows.items()}
    payments = await DisputedPayments.read(
        session,
        [
            *(ref(obj.get("payment_intent")) for obj in objects),
            *(row["stripe_payment_intent_id"] for row in rows.values()),
        ],
        [
            *(ref(obj.get("charge")) for obj in objects),
            *(row["stripe_charge_id"] for row in rows.values()),
        ],
    )
    disputed: set[uuid.UUID] = set()
    last_event: dict[str, EventContext] = {}
    for ctx in ctxs:
        obj = ctx.object
        payment_intent = ref(obj.get("payment_intent"))
        payment = payments.of(payment_intent, ref(obj.get("charge")))
        row = rows[obj["id"]]
        row["stripe_payment_intent_id"] = row["stripe_payment_intent_id"] or payment_intent
        row["account_id"] = row["account_id"] or (payment.account_id if payment else None)
        row["status"] = rank_merge(DISPUTE_STATUS_ORDER, row["status"], obj.get("status")) or ""
        row["reason"] = obj.get("reason") or row["reason"]
        withdrawn, reinstated = _dispute_funds(obj)
        row["funds_withdrawn"] = max(row["funds_withdrawn"], withdrawn)
        row["funds_reinstated"] = max(row["funds_reinstated"], reinstated)
        row["stripe_created"] = row["stripe_created"] or ts(obj.get("created"))
        if obj.get("status") in ("won", "lost"):
            row["closed_at"] = min(row["closed_at"] or ctx.created, ctx.created)
        if payment is not None:
            disputed.add(payment.id)
        last_event[obj["id"]] = ctx
    await write_rows(session, DISPUTES, rows, stored)
    if disputed:
        await session.execute(MARK_DISPUTED, {"payment_ids": sorted(disputed)})
    order = list(rows)
    if len(order) > 1:  # as the effects were applied before: in the database's order
        order = list(await session.scalars(DISPUTES_IN_ORDER, {"stripe_ids": order}))
    await apply_dispute_effects(
        [(last_event[stripe_id], rows[stripe_id]) for stripe_id in order], payments
    )


async def apply_refund_effects(refunds: Sequence[RefundStates]) -> None:
    """The effects of these refunds, each following the states its row passed through
    (`on_refunds_mirrored`). Each state is dated by Stripe's refund time (else by the time of
    the event that led to it), so every delivery order dates the effects alike."""
    if not refunds:
        return
    first = refunds[0][0][0]
    await on_refunds_mirrored(
        first.session,
        [
            [(row, row["stripe_created"] or ctx.created) for ctx, row in states]
            for states in refunds
        ],
        first.settings,
    )


async def apply_dispute_effects(
    disputes: Sequence[tuple[EventContext, MirrorDict]],
    payments: DisputedPayments | None = None,
) -> None:
    """The effects of these disputes (each with the context of the event applying them), as
    one after another in this order (`on_disputes_mirrored`). Each is dated by the dispute's
    closing (or creation) at Stripe, whatever the delivery order. `payments`: already read,
    when they include every dispute's."""
    if not disputes:
        return
    first = disputes[0][0]
    await on_disputes_mirrored(
        first.session,
        [
            MirroredDispute(
                row,
                ctx.type,
                occurred_at=row["closed_at"] or row["stripe_created"] or ctx.created,
            )
            for ctx, row in disputes
        ],
        first.settings,
        payments,
    )


def _money_effects_statement(payment_column: str) -> CompoundSelect[int, uuid.UUID, Any]:
    """The refunds, then the disputes, of the payments whose `payment_column` is one of
    :values, with that value."""
    column = getattr(Payment, payment_column)
    of_payments = column == any_(bindparam("values", type_=ARRAY(column.type)))
    refunds = (
        select(literal(0), Refund.id, column)
        .join(Payment, Refund.stripe_payment_intent_id == Payment.stripe_id)
        .where(of_payments)
    )
    disputes = (
        select(literal(1), Dispute.id, column)
        .join(
            Payment,
            (Dispute.stripe_payment_intent_id == Payment.stripe_id)
            | (Dispute.stripe_charge_id == Payment.stripe_charge_id),
        )
        .where(of_payments)
    )
    return refunds.union_all(disputes).order_by(text("1, 2"))


MONEY_EFFECTS_OF = {
    column: DriverStatement(_money_effects_statement(column))
    for column in ("id", "stripe_invoice_id", "stripe_subscription_id")
}


async def reapply_money_effects(payment_column: str, taught: dict[Any, EventContext]) -> None:
    """Refund and dispute effects depend on what is known about their payment (account,
    purpose, subscription). When events teach us more about the payments whose
    `payment_column` is a key of `taught`, the effects of their refunds and disputes mirrored
    earlier are applied again (in the context of the event that taught); they are
    idempotent, so whichever event arrives last completes them. One statement finds them
    (most payments have neither); their rows are read with one more each for refunds and
    disputes; the refunds' effects are applied together (each in its current state), then
    the disputes'."""
    session = next(iter(taught.values())).session
    found = await MONEY_EFFECTS_OF[payment_column].fetch(
        await session_driver(session), values=list(taught)
    )
    if not found:
        return
    refund_ids = [row_id for kind, row_id, _ in found if kind == 0]
    dispute_ids = [row_id for kind, row_id, _ in found if kind == 1]
    if refund_ids:
        refunds = await _rows_by_id(session, REFUNDS_BY_ID, refund_ids)
        taught_by = {row_id: taught[value] for kind, row_id, value in found if kind == 0}
        await apply_refund_effects([[(ctx, refunds[row_id])] for row_id, ctx in taught_by.items()])
    if dispute_ids:
        disputes = await _rows_by_id(session, DISPUTES_BY_ID, dispute_ids)
        await apply_dispute_effects(
            [(taught[value], disputes[row_id]) for kind, row_id, value in found if kind == 1]
        )


async def _rows_by_id(
    session: AsyncSession, statement: Select[Any], ids: list[uuid.UUID]
) -> dict[uuid.UUID, MirrorDict]:
    """Rows by id, read as mappings (a row found twice is one dict, so what applying it the
    first time changes is seen the second time)."""
    found = await session.execute(statement, {"ids": sorted(set(ids))})
    return {row["id"]: dict(row) for row in found.mappings()}


def _dispute_funds(dispute: Json) -> tuple[int, int]:
    """(withdrawn, reinstated) in the dispute's currency (its minor units), from its balance
    transactions (in the settlement currency when it differs)."""
    withdrawn = reinstated = 0
    for transaction in dispute.get("balance_transactions") or []:
        if not isinstance(transaction, dict):
            continue
        amount = in_currency(
            int(transaction.get("amount") or 0), transaction, str(dispute.get("currency") or "")
        )
        if amount < 0:
            withdrawn += -amount
        else:
            reinstated += amount
    return withdrawn, reinstated


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value)) if value else None
    except ValueError:
        return None


GroupHandler = Callable[[Sequence[EventContext]], Awaitable[None]]

GROUP_HANDLERS: dict[str, GroupHandler] = {  # the groups run in this order (see below)
    **{event_type: on_subscription_events for event_type in sorted(SUBSCRIPTION_EVENTS)},
    **{event_type: on_checkout_events for event_type in sorted(CHECKOUT_EVENTS)},
    **{event_type: on_invoice_events for event_type in sorted(INVOICE_EVENTS)},
    "invoice_payment.paid": on_payment_events,
    **{event_type: on_payment_events for event_type in sorted(CHARGE_EVENTS)},
    **{event_type: on_refund_events for event_type in sorted(REFUND_EVENTS)},
    **{event_type: on_dispute_events for event_type in sorted(DISPUTE_EVENTS)},
}
"""Every handled event type and its group: a batch's events of one group are applied
together. The one-way objects' merges are monotonic and commute, and a subscription's events are folded in their stored order (see
the module docstring), so applying them as one group ends where applying them one by one in
any order would, with a few statements per group instead of several per event.
Subscriptions first (a checkout is fulfilled once its subscription is live), checkout
sessions, invoices (invoice payments take the invoice's account and subscription), payments,
refunds (a refund finds its payment even when this batch mirrored it, so for Stripe's order,
a payment's events then its refund's, one batch ends where one event per transaction does: a
refund that succeeded and then failed is debited and credited back), disputes (a dispute
takes its payment's account; it comes after refunds, as when refunds ran one by one first).
One difference is left, when a refund's events come before its payment's in one batch: the
batch applies every state of the refund with the payment known, where one event per
transaction applies only the refund's state when the payment arrives, so a refund that had
also failed by then gets a debit and its reversal (net nothing) instead of neither, one of the
outcomes different delivery orders already give."""
HANDLED_EVENT_TYPES = frozenset(GROUP_HANDLERS)


def lock_key(event: Json) -> str:
    """The Stripe object whose events must not interleave. An invoice and its invoice
    payments share the invoice's key (each reads what the other wrote); payment events share
    the payment intent's; everything else is keyed by its own object. Rows that several keys
    touch (payments) merge commutatively under a row lock."""
    obj = event.get("data", {}).get("object", {})
    event_type = str(event.get("type", ""))
    if event_type == "invoice_payment.paid":
        return ref(obj.get("invoice")) or str(obj.get("id"))
    if event_type.startswith(("charge.", "refund.")):
        return ref(obj.get("payment_intent")) or str(obj.get("id"))
    return str(obj.get("id"))


async def apply_events(
    ctxs: Sequence[EventContext], after_each: Callable[[], Awaitable[None]]
) -> None:
    """Apply the events of one transaction: the events of each `GROUP_HANDLERS` handler
    together, the groups in their order, each followed by `after_each`."""
    groups: dict[GroupHandler, list[EventContext]] = {
        group: []
        for group in GROUP_HANDLERS.values()  # in their order
    }
    for ctx in ctxs:
        if (group := GROUP_HANDLERS.get(ctx.type)) is not None:
            groups[group].append(ctx)
    for group, members in groups.items():
        if members:
            await group(members)
            await after_each()


async def apply_event(ctx: EventContext) -> None:
    """One event, as a group of one."""
    if (group := GROUP_HANDLERS.get(ctx.type)) is not None:
        await group([ctx])
