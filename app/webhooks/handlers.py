"""What each Stripe event does to the mirror, whatever the order it arrives in.

The sound rules that make any delivery order converge on Stripe's latest state:

- Objects with a one-way life (checkout sessions, invoices, payments, refunds, disputes) merge
  monotonically: a status only moves forward along its lifecycle rank, amounts refunded and
  withdrawn only grow, ids and fees once known are kept (`COALESCE`), so applying events in any
  order gives the same row.
- Subscriptions go back and forth (cancel at period end, resume, plan changes), so each row
  remembers the `created` of the newest event applied. An older event is ignored; a newer one
  is applied from its payload; one from the same second cannot be ordered by the payload, so the
  subscription is re-fetched from Stripe and Stripe's current state is applied. A `canceled`
  subscription never comes back to life.
- Effects happen once because the database says so: ledger entries are unique per
  (account, kind, source), the first payment is `LEAST(...)`, access changes are appended only
  when access differs from the last recorded one.

Checkout sessions, subscriptions and payment intents carry our metadata (`account_id`,
`purpose`, `checkout_session_id`, `channel_id`, `plan_code`), so every event can be linked to a
1msg account without depending on another event having arrived first.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import structlog
from sqlalchemy import (
    CompoundSelect,
    DateTime,
    Select,
    bindparam,
    func,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.accounts.service import ensure_account
from app.config import Settings
from app.disputes.events import on_dispute_mirrored
from app.maintenance.service import count_extension_days_in_period
from app.models import (
    Account,
    Channel,
    CheckoutSession,
    Dispute,
    Invoice,
    LedgerEntry,
    Payment,
    Refund,
    Subscription,
)
from app.refunds.events import on_refund_mirrored
from app.stripe_gateway import StripeGateway
from app.subscriptions.access import LIVE_STATUSES
from app.subscriptions.service import record_access_change

log = structlog.get_logger()

Json = dict[str, Any]
PrefetchedObjects = dict[str, Json | Exception]
"""Stripe objects by id, or the error fetching one raised (not fetched again in the batch)."""
MirrorRow = TypeVar("MirrorRow", Invoice, Payment, Refund, Dispute)


@dataclass
class EventContext:
    session: AsyncSession
    settings: Settings
    stripe: StripeGateway
    event: Json
    now: datetime
    prefetched: PrefetchedObjects = field(default_factory=dict)
    """Fetched ahead for a batch of events (see `prefetch_balance_transactions`)."""

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

ACCOUNT_OF_CUSTOMER = select(Account.id).where(Account.stripe_customer_id == bindparam("customer"))
LINK_CUSTOMER = (
    update(Account)
    .where(Account.id == bindparam("account"), Account.stripe_customer_id.is_(None))
    .values(stripe_customer_id=bindparam("customer"))
)
_paid_at = bindparam("paid_at", type_=DateTime(timezone=True))
RECORD_FIRST_PAYMENT = (
    update(Account)
    .where(
        Account.id == bindparam("account"),
        Account.first_paid_at.is_(None)
        | (Account.first_paid_at > _paid_at)
        | Account.currency.is_(None),  # otherwise nothing changes: no row version written
    )
    .values(
        first_paid_at=func.least(func.coalesce(Account.first_paid_at, _paid_at), _paid_at),
        currency=func.coalesce(Account.currency, bindparam("currency")),
    )
)
LOCKED_MIRROR_ROW = {
    model: select(model).where(model.stripe_id == bindparam("stripe_id")).with_for_update()
    for model in (Invoice, Payment, Refund, Dispute)
}
LOCKED_SUBSCRIPTION = (
    select(Subscription).where(Subscription.stripe_id == bindparam("stripe_id")).with_for_update()
)
INVOICE = select(Invoice).where(Invoice.stripe_id == bindparam("stripe_id"))
PAYMENT_OF_DISPUTE = select(Payment).where(
    (Payment.stripe_id == bindparam("payment_intent"))
    | (Payment.stripe_charge_id == bindparam("charge"))
)
DISPUTES_OF_PAYMENT = select(Dispute.id, Dispute.account_id).where(
    (Dispute.stripe_payment_intent_id == bindparam("payment_intent"))
    | (Dispute.stripe_charge_id == bindparam("charge"))
)


async def account_for_customer(session: AsyncSession, customer_id: str | None) -> str | None:
    if customer_id is None:
        return None
    account_id: str | None = await session.scalar(ACCOUNT_OF_CUSTOMER, {"customer": customer_id})
    return account_id


async def link_customer(session: AsyncSession, account_id: str, customer_id: str | None) -> None:
    await ensure_account(session, account_id)
    if customer_id:
        await session.execute(LINK_CUSTOMER, {"account": account_id, "customer": customer_id})


async def record_first_payment(
    session: AsyncSession, account_id: str, paid_at: datetime, currency: str
) -> None:
    await ensure_account(session, account_id)
    await session.execute(
        RECORD_FIRST_PAYMENT, {"account": account_id, "paid_at": paid_at, "currency": currency}
    )


async def locked_mirror_row(
    session: AsyncSession, model: type[MirrorRow], stripe_id: str, **defaults: Any
) -> tuple[MirrorRow, bool]:
    """The mirror row for a Stripe object, created with `defaults` if missing, locked for
    this transaction (creation races are decided by the unique `stripe_id`), and whether it
    was missing. A row that exists, the usual case (an object has several events), costs one
    statement."""
    locked = cast(Select[MirrorRow], LOCKED_MIRROR_ROW[model])
    row = await session.scalar(locked, {"stripe_id": stripe_id})
    if row is not None:
        return row, False
    await session.execute(
        insert(model)
        .values(stripe_id=stripe_id, **defaults)
        .on_conflict_do_nothing(index_elements=["stripe_id"])
    )
    row = await session.scalar(locked, {"stripe_id": stripe_id})
    assert row is not None
    return row, True


PAYMENT_LINKS = (
    "account_id",
    "purpose",
    "stripe_invoice_id",
    "stripe_subscription_id",
    "stripe_charge_id",
)
"""What refund and dispute effects learn about a payment from (see `reapply_money_effects`)."""


async def upsert_payment(
    session: AsyncSession, stripe_id: str, **values: Any
) -> tuple[Payment, bool]:
    """Insert or merge a payment row; `None` values never overwrite what is known. Also
    says whether the row is new or one of its `PAYMENT_LINKS` became known."""
    known = {key: value for key, value in values.items() if value is not None}
    payment, created = await locked_mirror_row(
        session,
        Payment,
        stripe_id,
        amount=known.get("amount", 0),
        currency=known.get("currency", ""),
        status=known.get("status", "pending"),
    )
    links_before = [getattr(payment, link) for link in PAYMENT_LINKS]
    for key, value in known.items():
        if key == "status":
            payment.status = rank_merge(PAYMENT_STATUS_ORDER, payment.status, value) or value
        elif key == "amount_refunded":
            payment.amount_refunded = max(payment.amount_refunded, value)
        elif key == "disputed":
            payment.disputed = payment.disputed or bool(value)
        elif key == "paid_at":
            payment.paid_at = min(payment.paid_at, value) if payment.paid_at else value
        elif key in ("amount", "currency") or getattr(payment, key) is None:
            setattr(payment, key, value)
    # a dispute may have been mirrored before the payment it is about (one look for both:
    # whether there is one, and whether it still lacks the account)
    disputes = (
        await session.execute(
            DISPUTES_OF_PAYMENT, {"payment_intent": stripe_id, "charge": payment.stripe_charge_id}
        )
    ).all()
    payment.disputed = payment.disputed or bool(disputes)
    unlinked = [dispute_id for dispute_id, account_id in disputes if account_id is None]
    if payment.account_id is not None and unlinked:
        await session.execute(
            update(Dispute)
            .where(Dispute.id.in_(unlinked), Dispute.account_id.is_(None))
            .values(account_id=payment.account_id)
        )
    await session.flush()
    learned = links_before != [getattr(payment, link) for link in PAYMENT_LINKS]
    return payment, created or learned


# --- checkout sessions ---------------------------------------------------------------------


async def on_checkout_session(ctx: EventContext) -> None:
    obj = ctx.object
    metadata = obj.get("metadata") or {}
    row = await ctx.session.scalar(
        select(CheckoutSession).where(CheckoutSession.stripe_id == obj["id"]).with_for_update()
    )
    if row is None and (our_id := _uuid(metadata.get("checkout_session_id"))) is not None:
        row = await ctx.session.scalar(
            select(CheckoutSession).where(CheckoutSession.id == our_id).with_for_update()
        )
    if row is None:
        log.info("checkout_session.unknown", stripe_id=obj.get("id"))
        return
    row.stripe_id = row.stripe_id or obj["id"]
    row.status = rank_merge(CHECKOUT_STATUS_ORDER, row.status, obj.get("status")) or row.status
    row.payment_status = rank_merge(
        CHECKOUT_PAYMENT_ORDER, row.payment_status, obj.get("payment_status")
    )
    row.stripe_subscription_id = row.stripe_subscription_id or ref(obj.get("subscription"))
    row.stripe_payment_intent_id = row.stripe_payment_intent_id or ref(obj.get("payment_intent"))
    await link_customer(ctx.session, row.account_id, ref(obj.get("customer")))

    paid = (ctx.type == "checkout.session.completed" and obj.get("payment_status") == "paid") or (
        ctx.type == "checkout.session.async_payment_succeeded"
    )
    if row.purpose in ("top_up", "debt_repayment") and paid:
        await _credit_balance(ctx, row, obj)
    elif row.purpose == "subscription" and row.stripe_subscription_id and row.fulfilled_at is None:
        subscription_id = row.stripe_subscription_id
        live = select(Subscription.id).where(
            Subscription.stripe_id == subscription_id, Subscription.status.in_(LIVE_STATUSES)
        )
        paid = select(Invoice.id).where(
            Invoice.stripe_subscription_id == subscription_id, Invoice.status == "paid"
        )
        if await ctx.session.scalar(live.union_all(paid).limit(1)) is not None:
            row.fulfilled_at = ctx.now
    await ctx.session.flush()


async def _credit_balance(ctx: EventContext, row: CheckoutSession, obj: Json) -> None:
    amount = obj.get("amount_total")
    currency = str(obj.get("currency") or row.currency)
    if not isinstance(amount, int) or amount <= 0:
        raise ValueError(f"checkout session {obj['id']} has no amount_total")
    await ctx.session.execute(
        insert(LedgerEntry)
        .values(
            account_id=row.account_id,
            kind=row.purpose,
            source_id=obj["id"],
            amount=amount,
            currency=currency,
            description="Balance top-up" if row.purpose == "top_up" else "Debt repayment",
            occurred_at=ts(obj.get("created")) or ctx.created,
        )
        .on_conflict_do_nothing(index_elements=["account_id", "kind", "source_id"])
    )
    if row.fulfilled_at is None:
        row.fulfilled_at = ctx.now
    payment_intent = ref(obj.get("payment_intent"))
    if payment_intent:
        _, learned = await upsert_payment(
            ctx.session,
            payment_intent,
            account_id=row.account_id,
            purpose=row.purpose,
            stripe_checkout_session_id=obj["id"],
            amount=amount,
            currency=currency,
            status="succeeded",
            paid_at=ctx.created,
        )
        if learned:
            await reapply_money_effects(ctx, "stripe_id", payment_intent)
    await record_first_payment(ctx.session, row.account_id, ctx.created, currency)


# --- subscriptions -------------------------------------------------------------------------


async def on_subscription(ctx: EventContext) -> None:
    obj = ctx.object
    existing = await ctx.session.scalar(LOCKED_SUBSCRIPTION, {"stripe_id": obj["id"]})
    if existing is not None and existing.source_event_created is not None:
        if ctx.created < existing.source_event_created:
            log.info("subscription.stale_event_ignored", stripe_id=obj["id"], type=ctx.type)
            return
        if ctx.created == existing.source_event_created:
            obj = await ctx.stripe.retrieve_subscription(obj["id"])
    metadata = obj.get("metadata") or {}
    customer_id = ref(obj.get("customer"))
    account_id = metadata.get("account_id") or (existing.account_id if existing else None)
    account_id = account_id or await account_for_customer(ctx.session, customer_id)
    channel_id = metadata.get("channel_id") or (existing.channel_id if existing else None)
    if account_id is None or channel_id is None:
        log.warning("subscription.unlinked", stripe_id=obj["id"])
        return
    await link_customer(ctx.session, account_id, customer_id)
    await ctx.session.execute(
        insert(Channel)
        .values(id=channel_id, account_id=account_id)
        .on_conflict_do_nothing(index_elements=[Channel.id])
    )
    status = str(obj.get("status"))
    if existing is not None and existing.status in TERMINAL_SUBSCRIPTION_STATUSES:
        status = existing.status
    item = _first_item(obj)
    price_id = ref(item.get("price")) if item else None
    plan = next((p for p in ctx.settings.plans if p.stripe_price_id == price_id), None)
    values: dict[str, Any] = {
        "account_id": account_id,
        "channel_id": channel_id,
        "stripe_customer_id": customer_id,
        "plan_code": plan.code if plan else metadata.get("plan_code"),
        "stripe_price_id": price_id,
        "status": status,
        "cancel_at_period_end": bool(obj.get("cancel_at_period_end")),
        "cancel_at": ts(obj.get("cancel_at")),
        "current_period_start": ts(item.get("current_period_start")) if item else None,
        "current_period_end": ts(item.get("current_period_end")) if item else None,
        "trial_end": ts(obj.get("trial_end")),
        "canceled_at": ts(obj.get("canceled_at")),
        "ended_at": ts(obj.get("ended_at")),
        "source_event_created": ctx.created,  # never older than the stored one (see above)
    }
    if existing is None:
        ctx.session.add(Subscription(stripe_id=obj["id"], **values))
    else:
        for key, value in values.items():
            setattr(existing, key, value)
    await ctx.session.flush()
    if existing is not None:  # the maintenance days this snapshot's period holds
        await count_extension_days_in_period(ctx.session, existing)
    if status in LIVE_STATUSES:
        await fulfil_subscription_checkout(ctx, obj["id"], metadata)
    await record_access_change(ctx.session, channel_id, ctx.settings, ctx.now)
    if existing is None:  # effects that needed the subscription row can complete now
        await reapply_money_effects(ctx, "stripe_subscription_id", obj["id"])


async def fulfil_subscription_checkout(
    ctx: EventContext, subscription_id: str, metadata: dict[str, Any]
) -> None:
    """A subscription checkout is fulfilled once its subscription is live or an invoice of it
    is paid, whichever event is applied first (the checkout event itself checks too)."""
    ours = CheckoutSession.stripe_subscription_id == subscription_id
    if (our_checkout := _uuid(metadata.get("checkout_session_id"))) is not None:
        ours = ours | (CheckoutSession.id == our_checkout)
    await ctx.session.execute(
        update(CheckoutSession)
        .where(ours, CheckoutSession.fulfilled_at.is_(None))
        .values(fulfilled_at=ctx.now, stripe_subscription_id=subscription_id)
    )


def _first_item(subscription: Json) -> Json | None:
    items = subscription.get("items")
    data = items.get("data") if isinstance(items, dict) else None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        first: Json = data[0]
        return first
    return None


# --- invoices and payments -----------------------------------------------------------------


async def on_invoice(ctx: EventContext) -> None:
    obj = ctx.object
    parent = obj.get("parent") or {}
    details = parent.get("subscription_details") or {}
    subscription_id = ref(details.get("subscription"))
    account_id = (details.get("metadata") or {}).get("account_id") or await account_for_customer(
        ctx.session, ref(obj.get("customer"))
    )
    if account_id is not None:
        await ensure_account(ctx.session, account_id)
    invoice, created = await locked_mirror_row(
        ctx.session, Invoice, obj["id"], currency=obj.get("currency") or ""
    )
    links_before = (invoice.account_id, invoice.stripe_subscription_id)
    invoice.account_id = invoice.account_id or account_id
    invoice.stripe_subscription_id = invoice.stripe_subscription_id or subscription_id
    invoice.status = rank_merge(INVOICE_STATUS_ORDER, invoice.status, obj.get("status"))
    invoice.amount_due = int(obj.get("amount_due") or 0)
    invoice.amount_paid = max(invoice.amount_paid, int(obj.get("amount_paid") or 0))
    invoice.period_start = ts(obj.get("period_start"))
    invoice.period_end = ts(obj.get("period_end"))
    transitions = obj.get("status_transitions") or {}
    invoice.paid_at = invoice.paid_at or ts(transitions.get("paid_at"))
    await ctx.session.flush()
    if invoice.status == "paid" and subscription_id is not None:
        await fulfil_subscription_checkout(ctx, subscription_id, details.get("metadata") or {})
    linked_payments = await ctx.session.scalars(
        update(Payment)
        .where(
            Payment.stripe_invoice_id == obj["id"],
            (Payment.account_id.is_(None) & literal(account_id is not None))
            | (Payment.stripe_subscription_id.is_(None) & literal(subscription_id is not None)),
        )
        .values(
            account_id=func.coalesce(Payment.account_id, account_id),
            stripe_subscription_id=func.coalesce(Payment.stripe_subscription_id, subscription_id),
        )
        .returning(Payment.id)
    )
    learned = links_before != (invoice.account_id, invoice.stripe_subscription_id)
    if created or learned or linked_payments.first() is not None:
        await reapply_money_effects(ctx, "stripe_invoice_id", obj["id"])


async def on_invoice_payment(ctx: EventContext) -> None:
    obj = ctx.object
    payment = obj.get("payment") or {}
    payment_intent = ref(payment.get("payment_intent"))
    if payment_intent is None:
        log.info("invoice_payment.not_a_payment_intent", stripe_id=obj.get("id"))
        return
    invoice_id = ref(obj.get("invoice"))
    invoice = await ctx.session.scalar(INVOICE, {"stripe_id": invoice_id})
    transitions = obj.get("status_transitions") or {}
    paid_at = ts(transitions.get("paid_at")) or ctx.created
    row, learned = await upsert_payment(
        ctx.session,
        payment_intent,
        purpose="subscription",
        stripe_invoice_id=invoice_id,
        stripe_subscription_id=invoice.stripe_subscription_id if invoice else None,
        account_id=invoice.account_id if invoice else None,
        amount=int(obj.get("amount_paid") or obj.get("amount_requested") or 0),
        currency=obj.get("currency"),
        status="succeeded" if obj.get("status") == "paid" else None,
        paid_at=paid_at if obj.get("status") == "paid" else None,
    )
    if row.account_id and row.status == "succeeded":
        await record_first_payment(ctx.session, row.account_id, paid_at, row.currency)
    if learned:
        await reapply_money_effects(ctx, "id", row.id)


async def on_charge(ctx: EventContext) -> None:
    obj = ctx.object
    payment_intent = ref(obj.get("payment_intent"))
    if payment_intent is None:
        log.info("charge.without_payment_intent", stripe_id=obj.get("id"))
        return
    metadata = obj.get("metadata") or {}
    account_id = metadata.get("account_id") or await account_for_customer(
        ctx.session, ref(obj.get("customer"))
    )
    if account_id is not None:
        await ensure_account(ctx.session, account_id)
    succeeded = obj.get("status") == "succeeded" and bool(obj.get("paid"))
    row, learned = await upsert_payment(
        ctx.session,
        payment_intent,
        account_id=account_id,
        purpose=metadata.get("purpose"),
        stripe_charge_id=obj.get("id"),
        amount=int(obj.get("amount") or 0),
        currency=obj.get("currency"),
        status="succeeded" if succeeded else obj.get("status"),
        amount_refunded=int(obj.get("amount_refunded") or 0),
        disputed=bool(obj.get("disputed")),
        paid_at=ts(obj.get("created")) if succeeded else None,
    )
    balance_transaction = obj.get("balance_transaction")
    if row.fee is None and balance_transaction is not None:
        if not isinstance(balance_transaction, dict):
            known = ctx.prefetched.get(str(balance_transaction))
            if isinstance(known, Exception):
                raise known
            balance_transaction = known or await ctx.stripe.retrieve_balance_transaction(
                str(balance_transaction)
            )
        row.fee = fee_in_payment_currency(balance_transaction, row.currency)
    if succeeded and account_id is not None:
        await record_first_payment(
            ctx.session, account_id, ts(obj.get("created")) or ctx.created, row.currency
        )
    await ctx.session.flush()
    if learned:
        await reapply_money_effects(ctx, "id", row.id)


PREFETCH_CONCURRENCY = 8


async def prefetch_balance_transactions(
    session: AsyncSession, stripe: StripeGateway, events: Sequence[Json]
) -> PrefetchedObjects:
    """The balance transactions that `on_charge` will fetch for these events (fees not known
    yet), fetched concurrently instead of one after another. A fetch that fails is kept as
    its error: the event's handler raises it (the attempt fails and is retried later) rather
    than asking Stripe again at once."""
    wanted: dict[str, str] = {}  # payment intent -> balance transaction
    for event in events:
        obj = event["data"]["object"]
        if HANDLERS.get(str(event["type"])) is on_charge:
            payment_intent, transaction = (
                ref(obj.get("payment_intent")),
                obj.get("balance_transaction"),
            )
            if payment_intent and isinstance(transaction, str):
                wanted[payment_intent] = transaction
    if not wanted:
        return {}
    known = await session.scalars(
        select(Payment.stripe_id).where(Payment.stripe_id.in_(wanted), Payment.fee.is_not(None))
    )
    for payment_intent in known:
        wanted.pop(payment_intent, None)
    limit = asyncio.Semaphore(PREFETCH_CONCURRENCY)

    async def fetch(transaction_id: str) -> Json:
        async with limit:
            return dict(await stripe.retrieve_balance_transaction(transaction_id))

    ids = sorted(set(wanted.values()))
    results = await asyncio.gather(*(fetch(i) for i in ids), return_exceptions=True)
    return {
        i: r
        for i, r in zip(ids, results, strict=True)
        if isinstance(r, dict | Exception)  # not CancelledError and the like
    }


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


def fee_in_payment_currency(balance_transaction: Json, payment_currency: str) -> int:
    """Stripe's fee is in the settlement currency; convert it back when that differs."""
    fee = int(balance_transaction.get("fee") or 0)
    rate = balance_transaction.get("exchange_rate")
    if balance_transaction.get("currency") != payment_currency and rate:
        return round(fee / float(rate))
    return fee


# --- refunds and disputes ------------------------------------------------------------------


async def on_refund(ctx: EventContext) -> None:
    obj = ctx.object
    refund, _ = await locked_mirror_row(
        ctx.session,
        Refund,
        obj["id"],
        amount=int(obj.get("amount") or 0),
        currency=obj.get("currency") or "",
        status=obj.get("status") or "pending",
    )
    refund.stripe_payment_intent_id = refund.stripe_payment_intent_id or ref(
        obj.get("payment_intent")
    )
    refund.stripe_charge_id = refund.stripe_charge_id or ref(obj.get("charge"))
    refund.status = rank_merge(REFUND_STATUS_ORDER, refund.status, obj.get("status")) or "pending"
    refund.reason = obj.get("reason") or refund.reason
    refund.metadata_ = {**refund.metadata_, **(obj.get("metadata") or {})}
    refund.stripe_created = refund.stripe_created or ts(obj.get("created"))
    await ctx.session.flush()
    await apply_refund_effects(ctx, refund)


async def on_dispute(ctx: EventContext) -> None:
    obj = ctx.object
    charge_id = ref(obj.get("charge")) or ""
    payment_intent = ref(obj.get("payment_intent"))
    payment = await ctx.session.scalar(
        PAYMENT_OF_DISPUTE, {"payment_intent": payment_intent, "charge": charge_id}
    )
    dispute, _ = await locked_mirror_row(
        ctx.session,
        Dispute,
        obj["id"],
        stripe_charge_id=charge_id,
        amount=int(obj.get("amount") or 0),
        currency=obj.get("currency") or "",
        status=obj.get("status") or "needs_response",
    )
    dispute.stripe_payment_intent_id = dispute.stripe_payment_intent_id or payment_intent
    dispute.account_id = dispute.account_id or (payment.account_id if payment else None)
    dispute.status = rank_merge(DISPUTE_STATUS_ORDER, dispute.status, obj.get("status")) or ""
    dispute.reason = obj.get("reason") or dispute.reason
    withdrawn, reinstated = _dispute_funds(obj)
    dispute.funds_withdrawn = max(dispute.funds_withdrawn, withdrawn)
    dispute.funds_reinstated = max(dispute.funds_reinstated, reinstated)
    dispute.stripe_created = dispute.stripe_created or ts(obj.get("created"))
    if obj.get("status") in ("won", "lost"):
        dispute.closed_at = min(dispute.closed_at or ctx.created, ctx.created)
    if payment is not None:
        payment.disputed = True
    await ctx.session.flush()
    await apply_dispute_effects(ctx, dispute)


async def apply_refund_effects(ctx: EventContext, refund: Refund) -> None:
    """Dated by Stripe's refund time, so every delivery order dates the effect alike."""
    await on_refund_mirrored(
        ctx.session,
        refund,
        ctx.settings,
        ctx.stripe,
        occurred_at=refund.stripe_created or ctx.created,
    )


async def apply_dispute_effects(ctx: EventContext, dispute: Dispute) -> None:
    """Dated by the dispute's closing (or creation) at Stripe, whatever the delivery order."""
    await on_dispute_mirrored(
        ctx.session,
        dispute,
        ctx.type,
        ctx.settings,
        occurred_at=dispute.closed_at or dispute.stripe_created or ctx.created,
    )


def _money_effects_statement(payment_column: str) -> CompoundSelect[int, uuid.UUID]:
    """The refunds, then the disputes, of the payments whose `payment_column` is :value."""
    of_payments = getattr(Payment, payment_column) == bindparam("value")
    refunds = (
        select(literal(0), Refund.id)
        .join(Payment, Refund.stripe_payment_intent_id == Payment.stripe_id)
        .where(of_payments)
    )
    disputes = (
        select(literal(1), Dispute.id)
        .join(
            Payment,
            (Dispute.stripe_payment_intent_id == Payment.stripe_id)
            | (Dispute.stripe_charge_id == Payment.stripe_charge_id),
        )
        .where(of_payments)
    )
    return refunds.union_all(disputes).order_by(text("1, 2"))


MONEY_EFFECTS_OF = {
    column: _money_effects_statement(column)
    for column in ("id", "stripe_id", "stripe_invoice_id", "stripe_subscription_id")
}


async def reapply_money_effects(ctx: EventContext, payment_column: str, value: object) -> None:
    """Refund and dispute effects depend on what is known about their payment (account,
    purpose, subscription). When an event teaches us more about the payments whose
    `payment_column` is `value`, the effects of their refunds and disputes mirrored earlier
    are applied again; they are idempotent, so whichever event arrives last completes them.
    One statement finds them (most payments have neither)."""
    found = (await ctx.session.execute(MONEY_EFFECTS_OF[payment_column], {"value": value})).all()
    for kind, row_id in found:
        if kind == 0:
            refund = await ctx.session.get(Refund, row_id)
            assert refund is not None
            await apply_refund_effects(ctx, refund)
        else:
            dispute = await ctx.session.get(Dispute, row_id)
            assert dispute is not None
            await apply_dispute_effects(ctx, dispute)


def _dispute_funds(dispute: Json) -> tuple[int, int]:
    """(withdrawn, reinstated) in the dispute's currency, from its balance transactions."""
    withdrawn = reinstated = 0
    for transaction in dispute.get("balance_transactions") or []:
        if not isinstance(transaction, dict):
            continue
        amount = int(transaction.get("amount") or 0)
        rate = transaction.get("exchange_rate")
        if transaction.get("currency") != dispute.get("currency") and rate:
            amount = round(amount / float(rate))
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


Handler = Callable[[EventContext], Awaitable[None]]

HANDLERS: dict[str, Handler] = {
    "checkout.session.completed": on_checkout_session,
    "checkout.session.expired": on_checkout_session,
    "checkout.session.async_payment_succeeded": on_checkout_session,
    "checkout.session.async_payment_failed": on_checkout_session,
    "customer.subscription.created": on_subscription,
    "customer.subscription.updated": on_subscription,
    "customer.subscription.deleted": on_subscription,
    "customer.subscription.paused": on_subscription,
    "customer.subscription.resumed": on_subscription,
    "invoice.paid": on_invoice,
    "invoice.payment_failed": on_invoice,
    "invoice.finalized": on_invoice,
    "invoice.voided": on_invoice,
    "invoice.marked_uncollectible": on_invoice,
    "invoice_payment.paid": on_invoice_payment,
    "charge.succeeded": on_charge,
    "charge.updated": on_charge,
    "charge.refunded": on_charge,
    "charge.failed": on_charge,
    "refund.created": on_refund,
    "refund.updated": on_refund,
    "refund.failed": on_refund,
    "charge.dispute.created": on_dispute,
    "charge.dispute.updated": on_dispute,
    "charge.dispute.closed": on_dispute,
    "charge.dispute.funds_withdrawn": on_dispute,
    "charge.dispute.funds_reinstated": on_dispute,
}
HANDLED_EVENT_TYPES = frozenset(HANDLERS)


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


async def apply_event(ctx: EventContext) -> None:
    handler = HANDLERS.get(ctx.type)
    if handler is not None:
        await handler(ctx)
