"""What a mirrored chargeback changes (called by the webhook consumer for every
`charge.dispute.*` event after it upserted the `disputes` row; inside the event's transaction).

Decided from the dispute's stored state, not the event type, so any order converges:
- A top-up or debt repayment under dispute: once Stripe has withdrawn the funds
  (`funds_withdrawn > 0`) the disputed amount leaves the balance (ledger `dispute_withdrawal`,
  source the dispute id, once); once Stripe reinstates them (`funds_reinstated > 0`, a won
  dispute) it comes back (`dispute_reinstatement`, once, only after a withdrawal).
- A subscription payment whose dispute is `lost`: when `DISPUTE_LOST_ENDS_ACCESS` (default
  true) the subscription's access ends at once (`access_revoked_at`, `disputes.access_ended`),
  and it is cancelled at Stripe right after the events are applied (app/disputes/cancels.py),
  so Stripe does not go on charging for periods without access.
- Open refund requests about the disputed payment are `closed`: a disputed payment is never
  also refunded (the approval refuses it too); a request received after the event of a
  dispute settled for us (`won`, or an inquiry `warning_closed`) stays open, however late
  Stripe delivers that event.
Each change is recorded once in `dispute_effects` for `GET /v1/finance/disputes`.

Disputes are applied together (`on_disputes_mirrored`): what their effects are decided on is
read for all of them in one statement per kind (their payments, ledger entries already
made, subscriptions, open refund requests), and the ledger entries and effect records are
written with one statement each; the result is the one applying them one after another in
the given order would give. The disputes come as their rows' columns (read and written with
Core by the webhook consumer); ORM rows are loaded only for refund requests to close.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import structlog
from sqlalchemy import (
    String,
    Table,
    Uuid,
    any_,
    bindparam,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession

from app.accounts.service import ledger_entries_in_account_currency
from app.config import Settings
from app.db import ArrayInsert, ArrayUpdate, DriverStatement, session_driver
from app.models import (
    Dispute,
    DisputeEffect,
    Invoice,
    Payment,
    RefundRequest,
    Subscription,
)
from app.refunds import repository as repo
from app.refunds.events import PAYMENT_FACTS
from app.refunds.service import OPEN_STATUSES, close_by_chargeback
from app.subscriptions.service import record_access_changes

log = structlog.get_logger()

DisputeRow = MutableMapping[str, Any]
"""A `disputes` row as column name -> value."""

# Built once, and run straight on the driver in the session's transaction (`DriverStatement`
# on `session_driver`): the event processor runs them for every group of dispute effects.
EFFECT_COLUMNS = ("dispute_id", "kind", "amount", "currency", "subscription_id")
"""What a new `dispute_effects` row is given (`id` and `at` are the database's)."""
RECORD_EFFECTS = ArrayInsert(
    cast(Table, DisputeEffect.__table__),
    EFFECT_COLUMNS,
    on_conflict_do_nothing=["dispute_id", "kind"],
)
"""Effect rows, each recorded once per (dispute, kind)."""
_PAYMENTS = cast(Table, Payment.__table__)
PAYMENTS_OF_DISPUTES = DriverStatement(
    select(*(_PAYMENTS.c[name] for name in PAYMENT_FACTS), _PAYMENTS.c.stripe_charge_id).where(
        (_PAYMENTS.c.stripe_id == any_(bindparam("payment_intents", type_=ARRAY(String))))
        | (_PAYMENTS.c.stripe_charge_id == any_(bindparam("charges", type_=ARRAY(String))))
    ),
    named=True,
)
"""The payments (`PAYMENT_FACTS` and the charge) of these payment intents or charges, as
rows with these attributes."""
DISPUTE_LEDGER_ENTRIES = DriverStatement(
    text(
        "SELECT entries.account_id, entries.kind, entries.source_id"
        " FROM unnest(CAST(:accounts AS text[]), CAST(:sources AS text[]))"
        " AS wanted(account_id, source_id)"
        " JOIN ledger_entries AS entries ON entries.account_id = wanted.account_id"
        " AND entries.kind IN ('dispute_withdrawal', 'dispute_reinstatement')"
        " AND entries.source_id = wanted.source_id"
    )
)
"""Which dispute ledger entries exist among (account, dispute) pairs: one index look-up per
pair (the unique (account, kind, source) index)."""
_SUBSCRIPTIONS = cast(Table, Subscription.__table__)
SUBSCRIPTIONS_OF_INVOICES = DriverStatement(
    select(Invoice.stripe_id, Invoice.stripe_subscription_id).where(
        Invoice.stripe_id == any_(bindparam("invoices", type_=ARRAY(String)))
    )
)
SUBSCRIPTIONS_TO_REVOKE = DriverStatement(
    select(
        _SUBSCRIPTIONS.c.id,
        _SUBSCRIPTIONS.c.stripe_id,
        _SUBSCRIPTIONS.c.channel_id,
        _SUBSCRIPTIONS.c.access_revoked_at,
    )
    .where(_SUBSCRIPTIONS.c.stripe_id == any_(bindparam("stripe_ids", type_=ARRAY(String))))
    .order_by(_SUBSCRIPTIONS.c.stripe_id)
    .with_for_update()
)
"""The subscriptions whose access lost disputes end, locked (as
`repo.subscription_of_payment(..., lock=True)` locks each)."""
REVOKE_ACCESS = ArrayUpdate(_SUBSCRIPTIONS, ["access_revoked_at"])
_DISPUTES = cast(Table, Dispute.__table__)
MARK_ACCESS_ENDED = DriverStatement(
    update(_DISPUTES)
    .where(
        _DISPUTES.c.id == any_(bindparam("dispute_ids", type_=ARRAY(Uuid))),
        _DISPUTES.c.access_ended.is_(False),
    )
    .values(access_ended=True)
)
OPEN_REQUESTS = DriverStatement(
    select(RefundRequest.id, RefundRequest.payment_id)
    .where(
        RefundRequest.payment_id == any_(bindparam("payment_ids", type_=ARRAY(Uuid))),
        RefundRequest.type == "refund",
        RefundRequest.status.in_([literal(status) for status in OPEN_STATUSES]),
    )
    .order_by(RefundRequest.id)
    .with_for_update()
)
"""The open refund requests about these payments, locked (a chargeback closes them)."""
REQUESTS_BY_ID = (
    select(RefundRequest)
    .where(RefundRequest.id == any_(bindparam("ids", type_=ARRAY(Uuid))))
    .order_by(RefundRequest.id)
    .execution_options(populate_existing=True)
)


class DisputedPayments:
    """Payments read by `PAYMENTS_OF_DISPUTES`, found as `repo.payment_by_intent`, then
    `repo.payment_by_charge`, would find them."""

    def __init__(self, rows: Iterable[Any]) -> None:
        self.by_intent: dict[str, Any] = {}
        self.by_charge: dict[str, Any] = {}
        for row in rows:
            self.by_intent[row.stripe_id] = row
            if row.stripe_charge_id:
                self.by_charge[row.stripe_charge_id] = row

    @classmethod
    async def read(
        cls,
        session: AsyncSession,
        payment_intents: Iterable[str | None],
        charges: Iterable[str | None],
    ) -> DisputedPayments:
        found = await PAYMENTS_OF_DISPUTES.fetch(
            await session_driver(session),
            payment_intents=sorted({pi for pi in payment_intents if pi}),
            charges=sorted({charge for charge in charges if charge}),
        )
        return cls(found)

    def of(self, payment_intent: str | None, charge: str | None) -> Any | None:
        """The payment of this payment intent, else of this charge."""
        found = self.by_intent.get(payment_intent) if payment_intent else None
        if found is None and charge:
            found = self.by_charge.get(charge)
        return found


@dataclass
class MirroredDispute:
    """A dispute whose effects to apply: its row (`access_ended` is updated here), the type
    of the event applying them (for the logs) and the time the effects are dated by."""

    row: DisputeRow
    event_type: str
    occurred_at: datetime


async def on_disputes_mirrored(
    session: AsyncSession,
    disputes: Sequence[MirroredDispute],
    settings: Settings,
    payments: DisputedPayments | None = None,
) -> None:
    """The effects of each dispute, as applying them one dispute after another in this order
    would have them. `occurred_at` is the Stripe event's time: effects are dated by what
    happened at Stripe, not by when this service processed it, so any delivery order dates
    them alike. `payments`: already read, when they include every dispute's."""
    for run in _distinct_runs(disputes):
        await _apply(session, run, settings, payments)


def _distinct_runs(disputes: Sequence[MirroredDispute]) -> Iterator[list[MirroredDispute]]:
    """Consecutive runs in which no dispute appears twice (a dispute's second application
    must see what its first one wrote)."""
    run: list[MirroredDispute] = []
    seen: set[uuid.UUID] = set()
    for dispute in disputes:
        if dispute.row["id"] in seen:
            yield run
            run, seen = [], set()
        run.append(dispute)
        seen.add(dispute.row["id"])
    if run:
        yield run


async def _apply(
    session: AsyncSession,
    disputes: list[MirroredDispute],
    settings: Settings,
    payments: DisputedPayments | None,
) -> None:
    """The effects of distinct disputes: the reads first, for all of them, then each
    dispute's decisions in order, then the writes that do not depend on each other. The
    statements run on the driver (`session_driver` flushes pending ORM changes first); the
    ORM changes of requests closed here are flushed at the end, as before."""
    driver = await session_driver(session)
    if payments is None:
        payments = await DisputedPayments.read(
            session,
            (d.row["stripe_payment_intent_id"] for d in disputes),
            (d.row["stripe_charge_id"] for d in disputes),
        )
    payment_of = [
        payments.of(d.row["stripe_payment_intent_id"], d.row["stripe_charge_id"]) for d in disputes
    ]
    paid = [
        (dispute, payment)
        for dispute, payment in zip(disputes, payment_of, strict=True)
        if payment is not None and payment.account_id is not None
    ]
    balance = [(d, p) for d, p in paid if p.purpose in repo.BALANCE_PURPOSES]
    ending = [(d, p) for d, p in paid if _ends_access(d, p, settings)]
    entries = await _dispute_ledger_entries(driver, balance)
    subscriptions = await _subscriptions_ending(driver, ending)
    requests = await _open_requests(
        session, driver, [p.id for _, p in paid], [p.account_id for _, p in paid]
    )
    ledger: list[dict[str, Any]] = []
    effects: list[dict[str, Any]] = []
    access_ended: list[uuid.UUID] = []
    ended = EndedAccess([], {})
    for dispute, payment in zip(disputes, payment_of, strict=True):
        if payment is None or payment.account_id is None:
            log.warning(
                "dispute.payment_unknown",
                dispute_id=dispute.row["stripe_id"],
                event_type=dispute.event_type,
            )
            continue
        if payment.purpose in repo.BALANCE_PURPOSES:
            _adjust_balance(dispute, payment, entries, ledger, effects)
        if _ends_access(dispute, payment, settings):
            ended_before = dispute.row["access_ended"]
            _end_access(dispute, payment, subscriptions, ended, effects)
            if dispute.row["access_ended"] and not ended_before:
                access_ended.append(dispute.row["id"])
        await _close_open_requests(session, dispute, payment, requests)
    # a chargeback of a payment never credited for its currency (see `on_checkout_events`)
    # moves no balance: the ledger keeps the account's one currency
    ledger, refused = await ledger_entries_in_account_currency(session, ledger)
    if refused:
        skipped = {(entry["source_id"], BALANCE_EFFECTS[entry["kind"]]) for entry in refused}
        stripe_ids = {dispute.row["id"]: dispute.row["stripe_id"] for dispute in disputes}
        effects = [
            effect
            for effect in effects
            if (stripe_ids.get(effect["dispute_id"]), effect["kind"]) not in skipped
        ]
    await repo.ADD_LEDGER_ENTRIES.execute(driver, ledger)
    await RECORD_EFFECTS.execute(driver, effects)
    if access_ended:
        await MARK_ACCESS_ENDED.execute(driver, dispute_ids=access_ended)
    if ended.revoked:
        await REVOKE_ACCESS.execute(driver, ended.revoked)
        await record_access_changes(session, ended.channels_at, settings)
    await session.flush()


def _ends_access(dispute: MirroredDispute, payment: Any, settings: Settings) -> bool:
    """A lost dispute of a subscription payment ends access (unless the settings say not)."""
    return (
        payment.purpose == "subscription"
        and dispute.row["status"] == "lost"
        and settings.dispute_lost_ends_access
    )


LedgerKey = tuple[str, str, str]
"""(account, kind, source) of a ledger entry."""


async def _dispute_ledger_entries(
    driver: Any, balance: list[tuple[MirroredDispute, Any]]
) -> set[LedgerKey]:
    """The dispute ledger entries that exist for these disputes of balance payments."""
    if not balance:
        return set()
    found = await DISPUTE_LEDGER_ENTRIES.fetch(
        driver,
        accounts=[payment.account_id for _, payment in balance],
        sources=[dispute.row["stripe_id"] for dispute, _ in balance],
    )
    return {(account, kind, source) for account, kind, source in found}


def _adjust_balance(
    dispute: MirroredDispute,
    payment: Any,
    entries: set[LedgerKey],
    ledger: list[dict[str, Any]],
    effects: list[dict[str, Any]],
) -> None:
    """The ledger entries (into `ledger`) and effects (into `effects`) of a dispute of a
    balance payment, given the dispute ledger `entries` that exist (each insert is `ON
    CONFLICT DO NOTHING`: it adds exactly those not in `entries`; under SERIALIZABLE an entry
    a concurrent transaction adds makes one of the two fail). The withdrawal is dated when
    the dispute opened at Stripe (when Stripe takes the funds), not by the dispute's closing
    (`occurred_at`), which the ruling's events, delivered before the withdrawal's, would
    otherwise give it; the reinstatement by the closing."""
    row, account_id = dispute.row, payment.account_id
    stripe_id, amount, currency = row["stripe_id"], row["amount"], row["currency"]
    withdrawn = (account_id, "dispute_withdrawal", stripe_id) in entries
    if row["funds_withdrawn"] > 0 and not withdrawn:
        ledger.append(
            {
                "account_id": account_id,
                "kind": "dispute_withdrawal",
                "source_id": stripe_id,
                "amount": -amount,
                "currency": currency,
                "description": f"Chargeback {stripe_id}: funds withdrawn by the bank",
                "occurred_at": row["stripe_created"] or dispute.occurred_at,
            }
        )
        effects.append(_effect(row, "balance_withdrawn", amount=-amount, currency=currency))
        entries.add((account_id, "dispute_withdrawal", stripe_id))
        withdrawn = True
    if row["funds_reinstated"] > 0 and withdrawn:
        key = (account_id, "dispute_reinstatement", stripe_id)
        if key not in entries:
            ledger.append(
                {
                    "account_id": account_id,
                    "kind": "dispute_reinstatement",
                    "source_id": stripe_id,
                    "amount": amount,
                    "currency": currency,
                    "description": f"Chargeback {stripe_id} won: funds reinstated",
                    "occurred_at": dispute.occurred_at,
                }
            )
            effects.append(_effect(row, "balance_reinstated", amount=amount, currency=currency))
            entries.add(key)


BALANCE_EFFECTS = {
    "dispute_withdrawal": "balance_withdrawn",
    "dispute_reinstatement": "balance_reinstated",
}
"""The effect recorded with each ledger entry of a dispute (`_adjust_balance`)."""


def _effect(
    row: DisputeRow,
    kind: str,
    *,
    amount: int | None = None,
    currency: str | None = None,
    subscription_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    """A `dispute_effects` row (`RECORD_EFFECTS`: recorded once per dispute and kind)."""
    return {
        "dispute_id": row["id"],
        "kind": kind,
        "amount": amount,
        "currency": currency,
        "subscription_id": subscription_id,
    }


SubscriptionRow = dict[str, Any]
"""A subscription's `SUBSCRIPTIONS_TO_REVOKE` columns."""


@dataclass
class EndingSubscriptions:
    """The subscriptions whose access lost disputes may end, locked, and the subscriptions
    of the invoices of payments that do not name theirs."""

    by_stripe_id: dict[str, SubscriptionRow]
    of_invoice: dict[str, str | None]

    def of(self, payment: Any) -> SubscriptionRow | None:
        """The payment's subscription, else its invoice's (`repo.subscription_of_payment`)."""
        stripe_id = payment.stripe_subscription_id
        if stripe_id is None and payment.stripe_invoice_id is not None:
            stripe_id = self.of_invoice.get(payment.stripe_invoice_id)
        return self.by_stripe_id.get(stripe_id) if stripe_id else None


async def _subscriptions_ending(
    driver: Any, ending: list[tuple[MirroredDispute, Any]]
) -> EndingSubscriptions:
    """The subscriptions of the payments whose lost disputes end access, locked (as
    `repo.subscription_of_payment(..., lock=True)` locks each)."""
    subscriptions = EndingSubscriptions({}, {})
    if not ending:
        return subscriptions
    invoices = sorted(
        {
            p.stripe_invoice_id
            for _, p in ending
            if p.stripe_subscription_id is None and p.stripe_invoice_id is not None
        }
    )
    if invoices:
        found = await SUBSCRIPTIONS_OF_INVOICES.fetch(driver, invoices=invoices)
        subscriptions.of_invoice = {invoice: subscription for invoice, subscription in found}
    wanted = {p.stripe_subscription_id for _, p in ending if p.stripe_subscription_id}
    wanted.update(
        subscription for subscription in subscriptions.of_invoice.values() if subscription
    )
    if wanted:
        locked = await SUBSCRIPTIONS_TO_REVOKE.fetch(driver, stripe_ids=sorted(wanted))
        subscriptions.by_stripe_id = {row["stripe_id"]: dict(row) for row in locked}
    return subscriptions


@dataclass
class EndedAccess:
    """The subscriptions whose access a group's lost disputes end (`REVOKE_ACCESS` rows) and
    their channels, each with the latest time access ended on it (the feed's entry is
    decided at that time, as the last of one-by-one entries would be)."""

    revoked: list[dict[str, Any]]
    channels_at: dict[str, datetime]


def _end_access(
    dispute: MirroredDispute,
    payment: Any,
    subscriptions: EndingSubscriptions,
    ended: EndedAccess,
    effects: list[dict[str, Any]],
) -> None:
    """A lost dispute of a subscription payment ends the subscription's access (collected in
    `ended`, written after the group's decisions: a later dispute of the same subscription
    sees it revoked here) and marks the dispute."""
    subscription = subscriptions.of(payment)
    if subscription is None:
        log.warning("dispute.subscription_unknown", dispute_id=dispute.row["stripe_id"])
        return
    if subscription["access_revoked_at"] is None:
        when = dispute.occurred_at
        subscription["access_revoked_at"] = when
        ended.revoked.append({"id": subscription["id"], "access_revoked_at": when})
        channel = subscription["channel_id"]
        ended.channels_at[channel] = max(ended.channels_at.get(channel, when), when)
    dispute.row["access_ended"] = True
    effects.append(_effect(dispute.row, "access_ended", subscription_id=subscription["id"]))


async def _open_requests(
    session: AsyncSession, driver: Any, payment_ids: list[uuid.UUID], account_ids: list[str]
) -> dict[uuid.UUID, list[RefundRequest]]:
    """The open refund requests of these payments, locked (on the driver), by payment; the
    ORM rows of those found are loaded (rare: they are closed here). The payments' accounts
    are locked first, as `repo.waiting_requests` locks them, so a request filed while these
    events are applied is not missed (its filing wrote its account's row: this transaction
    then fails to serialize and runs again, seeing it). Accounts before requests, the order
    of every transaction that takes both (a finance balance credit too): the other order
    could deadlock."""
    if not payment_ids:
        return {}
    await repo.LOCK_ACCOUNTS.execute(driver, ids=sorted(set(account_ids)))
    found = await OPEN_REQUESTS.fetch(driver, payment_ids=sorted(set(payment_ids)))
    if not found:
        return {}
    loaded = await session.scalars(REQUESTS_BY_ID, {"ids": [request_id for request_id, _ in found]})
    by_payment: dict[uuid.UUID, list[RefundRequest]] = {}
    for request in loaded.all():
        assert request.payment_id is not None
        by_payment.setdefault(request.payment_id, []).append(request)
    return by_payment


async def _close_open_requests(
    session: AsyncSession,
    dispute: MirroredDispute,
    payment: Any,
    requests: dict[uuid.UUID, list[RefundRequest]],
) -> None:
    """The payment's open requests are closed by the first of its disputes applied. A dispute
    settled for us (`won`, or an inquiry closed without a chargeback) leaves open a request
    received after the time its effects are dated by (`occurred_at`: a won dispute's closing
    at Stripe, an inquiry's opening): the payment was with us again when the client asked
    (quoted and refunded as any other), however late Stripe delivers that dispute's events.
    The dates are Stripe's, so any delivery order closes the same requests; they are whole
    seconds, so a request received within the second of that time counts as before it."""
    waiting = requests.pop(payment.id, [])
    settled = dispute.row["status"] in repo.SETTLED_FOR_US
    after = dispute.occurred_at + timedelta(seconds=1)
    later = [r for r in waiting if settled and r.received_at >= after]
    if later:
        requests[payment.id] = later
    for request in waiting:
        if request in later:
            continue
        await close_by_chargeback(
            session,
            request,
            dispute.row["stripe_id"],
            inquiry=repo.is_inquiry(dispute.row["status"]),
        )
