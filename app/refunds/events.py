"""What mirrored Stripe refunds change (called by the webhook consumer after it upserted the
`refunds` rows, inside the events' transaction: flush only).

- Our refunds are matched by `metadata.refund_execution_id` (set when we created them), or by
  Stripe refund id; a refund event may arrive before our own approval recorded Stripe's
  answer, in which case the execution is completed here and the approval adopts its status.
- The request moves to `refunded` / `refund_failed` once.
- A refund of a top-up or debt repayment debits the ledger once (kind `refund`, source the
  Stripe refund id), whoever made it (our approval or the Dashboard); if Stripe later reports it
  failed or canceled, a `refund_reversal` credit restores the balance once.
- Our approved refund of a subscription payment ends that subscription's access at once
  (`access_revoked_at`) and records it for cancelling at Stripe (`cancel_subscription_id`),
  without proration or a final invoice: the cancellation is sent after the events are applied,
  beside the event loop (app/refunds/cancels.py), so a Stripe outage delays only it, never the
  refund's events. Refunds made in the Dashboard do not cancel anything here.
Every step is idempotent: the hook runs again for every event about the same refund.

Refunds are applied together (`on_refunds_mirrored`), each as the states its row passed
through, in order (a refund that succeeded and then failed in one batch of events debits and
then reverses, and our execution is told both): the end is the one applying each state in its
own transaction gives. The states arrive as their rows' columns (`RefundRow`, read and written
with Core by the webhook consumer). One statement (`REFUND_FACTS`) reads what the effects are
decided on for all of them: our execution (if any), its request's latest attempt, and the
refunded payment; one more reads the debits failed refunds may reverse, and one writes the
ledger entries. Only our own refunds (rare) load ORM rows: the request and execution they
change, locked, one refund after another.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import column, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.accounts.service import ledger_entries_in_account_currency
from app.config import Settings
from app.db import DriverStatement, session_driver
from app.models import RefundExecution, RefundRequest
from app.notifications.outbox import enqueue_email, format_amount
from app.refunds import repository as repo
from app.refunds.service import audit_step
from app.subscriptions.service import record_access_change

log = structlog.get_logger()

SUCCEEDED = ("succeeded",)
FAILED = ("failed", "canceled")
ACTOR = "stripe"

RefundRow = Mapping[str, Any]
"""A `refunds` row as column name -> value (`metadata` is the JSON object)."""
RefundState = tuple[RefundRow, datetime]
"""A state a refund's row passed through, and the time its effects are dated by (what
happened at Stripe, not when this service processed it, so any delivery order dates them
alike)."""
PAYMENT_FACTS = (
    "id",
    "stripe_id",
    "account_id",
    "purpose",
    "stripe_subscription_id",
    "stripe_invoice_id",
)
"""The payment columns refund and dispute effects are decided on."""

REFUND_FACT_COLUMNS = (
    "n",
    "execution_id",
    "request_id",
    "latest_id",
    *(f"payment_{name}" for name in PAYMENT_FACTS),
)
REFUND_FACTS = DriverStatement(
    text(
        "SELECT wanted.n, ours.execution_id, ours.request_id, ours.latest_id,"
        " payment.id AS payment_id, payment.stripe_id AS payment_stripe_id,"
        " payment.account_id AS payment_account_id, payment.purpose AS payment_purpose,"
        " payment.stripe_subscription_id AS payment_stripe_subscription_id,"
        " payment.stripe_invoice_id AS payment_stripe_invoice_id"
        " FROM unnest(CAST(:execution_ids AS uuid[]), CAST(:stripe_ids AS text[]),"
        " CAST(:payment_intents AS text[]), CAST(:charges AS text[]))"
        " WITH ORDINALITY AS wanted(execution_id, stripe_id, payment_intent, charge, n)"
        " LEFT JOIN LATERAL ("
        " SELECT matched.id AS execution_id, matched.request_id,"
        " (SELECT attempts.id FROM refund_executions AS attempts"
        " WHERE attempts.request_id = matched.request_id"
        " ORDER BY attempts.attempt DESC LIMIT 1) AS latest_id"
        " FROM (SELECT id, request_id FROM refund_executions WHERE id = wanted.execution_id"
        " UNION ALL SELECT id, request_id FROM refund_executions"
        " WHERE wanted.execution_id IS NULL AND stripe_refund_id = wanted.stripe_id) AS matched"
        " ) AS ours ON true"
        " LEFT JOIN LATERAL ("
        " SELECT 0 AS rank, payments.id, payments.stripe_id, payments.account_id,"
        " payments.purpose, payments.stripe_subscription_id, payments.stripe_invoice_id"
        " FROM payments WHERE payments.stripe_id = wanted.payment_intent"
        " UNION ALL"
        " SELECT 1 AS rank, payments.id, payments.stripe_id, payments.account_id,"
        " payments.purpose, payments.stripe_subscription_id, payments.stripe_invoice_id"
        " FROM payments WHERE payments.stripe_charge_id = wanted.charge"
        " ORDER BY rank LIMIT 1"
        " ) AS payment ON true"
    ).columns(*(column(name) for name in REFUND_FACT_COLUMNS)),
    named=True,
)
"""For each (:execution_ids, :stripe_ids, :payment_intents, :charges), numbered `n` from 1:
our execution (`execution_id`, `request_id`, and `latest_id`, its request's latest attempt;
NULL when the refund is not ours), matched by the execution id the refund names, else by
the Stripe refund id it recorded; and the refunded payment's `PAYMENT_FACTS` (as
`payment_<column>`; found by payment intent, else by charge; NULL when unknown), as
attributes of its rows. Plain reads: the execution and its request are locked afterwards,
request first."""

FactsKey = tuple[uuid.UUID | None, str, str | None, str | None]
"""What a refund state's facts are read by: (the execution it names, its Stripe id, its
payment intent, its charge)."""
LedgerKey = tuple[str, str]
"""(account, Stripe refund id) of a refund's ledger entries."""


async def on_refunds_mirrored(
    session: AsyncSession,
    refunds: Sequence[Sequence[RefundState]],
    settings: Settings,
) -> None:
    """The effects of these refunds (each given as the distinct states its row passed
    through, in order), as applying every state in its own transaction, one after another,
    would leave them."""
    if not refunds:
        return
    facts = await _facts(session, (row for states in refunds for row, _ in states))
    await _adjust_ledger(session, refunds, facts)
    for states in refunds:
        if any(facts[_facts_key(row)].execution_id is not None for row, _ in states):
            await _apply_ours(session, states, facts, settings)
    await session.flush()


def _facts_key(refund: RefundRow) -> FactsKey:
    return (
        _execution_named(refund["metadata"]),
        refund["stripe_id"],
        refund["stripe_payment_intent_id"] or None,
        refund["stripe_charge_id"] or None,
    )


async def _facts(session: AsyncSession, refunds: Iterable[RefundRow]) -> dict[FactsKey, Any]:
    """What the effects of these refund states are decided on (`REFUND_FACTS`), in one
    statement (on `session_driver`: pending ORM changes are flushed first)."""
    keys = list(dict.fromkeys(_facts_key(refund) for refund in refunds))
    found = await REFUND_FACTS.fetch(
        await session_driver(session),
        execution_ids=[key[0] for key in keys],
        stripe_ids=[key[1] for key in keys],
        payment_intents=[key[2] for key in keys],
        charges=[key[3] for key in keys],
    )
    return {keys[row.n - 1]: row for row in found}


def _execution_named(metadata: Mapping[str, Any] | None) -> uuid.UUID | None:
    """Our execution's id from the refund's metadata (None when absent or not an id)."""
    raw = (metadata or {}).get("refund_execution_id")
    if isinstance(raw, str):
        try:
            return uuid.UUID(raw)
        except ValueError:
            return None
    return None


def _balance_account(facts: Any) -> str | None:
    """The account whose balance a refund of this payment moves (top-ups and debt
    repayments), if known."""
    if facts.payment_id is None or facts.payment_purpose not in repo.BALANCE_PURPOSES:
        return None
    account: str | None = facts.payment_account_id or None
    return account


async def _adjust_ledger(
    session: AsyncSession,
    refunds: Sequence[Sequence[RefundState]],
    facts: dict[FactsKey, Any],
) -> None:
    """The ledger entries of refunds of balance payments, in one statement: a live state
    debits (once), a failed or canceled state after a debit credits it back (once). The
    debit is this fold's (an earlier live state) or already in the ledger (read in one
    statement for the refunds that fail without a live state here). Each insert is `ON
    CONFLICT DO NOTHING`, as `repo.add_ledger_entry`: the first state that makes an entry
    dates it."""
    debited: set[LedgerKey] = set()
    unsure: list[LedgerKey] = []
    for states in refunds:
        for row, _ in states:
            account = _balance_account(facts[_facts_key(row)])
            if account is None:
                continue
            key = (account, row["stripe_id"])
            if row["status"] in repo.LIVE_REFUND_STATUSES:
                debited.add(key)
            elif row["status"] in FAILED and key not in debited:
                unsure.append(key)
    if unsure:
        debited |= await repo.refund_debits(session, unsure)
    entries: dict[tuple[str, str, str], dict[str, Any]] = {}
    for states in refunds:
        for row, occurred_at in states:
            payment = facts[_facts_key(row)]
            account = _balance_account(payment)
            if account is None:
                continue
            stripe_id, amount = row["stripe_id"], row["amount"]
            if row["status"] in repo.LIVE_REFUND_STATUSES:
                entries.setdefault(
                    (account, "refund", stripe_id),
                    {
                        "amount": -amount,
                        "description": (
                            f"Refund of {payment.payment_purpose} payment "
                            f"{payment.payment_stripe_id}"
                        ),
                        "currency": row["currency"],
                        "occurred_at": occurred_at,
                    },
                )
            elif row["status"] in FAILED and (account, stripe_id) in debited:
                entries.setdefault(
                    (account, "refund_reversal", stripe_id),
                    {
                        "amount": amount,
                        "description": f"Refund {stripe_id} failed at Stripe",
                        "currency": row["currency"],
                        "occurred_at": occurred_at,
                    },
                )
    if entries:
        # a refund of a payment never credited for its currency (see `on_checkout_events`)
        # moves no balance: the ledger keeps the account's one currency
        kept, _refused = await ledger_entries_in_account_currency(
            session,
            [
                {"account_id": account, "kind": kind, "source_id": source, **entry}
                for (account, kind, source), entry in entries.items()
            ],
        )
        await repo.ADD_LEDGER_ENTRIES.execute(await session_driver(session), kept)


async def _apply_ours(
    session: AsyncSession,
    states: Sequence[RefundState],
    facts: dict[FactsKey, Any],
    settings: Settings,
) -> None:
    """Each state of one of our refunds, in order: the execution (and its request) told,
    then, for a live refund of a subscription payment, the subscription's access ended and
    its cancellation at Stripe recorded (once)."""
    locked: dict[uuid.UUID, tuple[RefundRequest, RefundExecution | None]] = {}
    for refund, occurred_at in states:
        known = facts[_facts_key(refund)]
        if known.execution_id is None:
            continue
        if known.execution_id not in locked:
            # Lock in the same order as the approval: request, then execution. The refund
            # names its own attempt, which need not be the request's latest one.
            request = await repo.get_request(session, known.request_id, lock=True)
            assert request is not None
            execution = await repo.lock_execution(session, known.execution_id)
            locked[known.execution_id] = (request, execution)
        request, execution = locked[known.execution_id]
        if execution is None:
            continue
        current = known.latest_id == execution.id
        await _complete_execution(session, execution, request, refund, current=current)
        if (
            known.payment_id is not None
            and known.payment_purpose == "subscription"
            and refund["status"] in repo.LIVE_REFUND_STATUSES
            and execution.cancel_subscription_id is None
            and execution.subscription_cancelled_at is None
        ):
            await _end_subscription(session, execution, known, settings, occurred_at)


async def _complete_execution(
    session: AsyncSession,
    execution: RefundExecution,
    request: RefundRequest,
    refund: RefundRow,
    *,
    current: bool,
) -> None:
    """`request`: the execution's, locked; `current`: the execution is the request's latest
    attempt (only the latest attempt moves the request: an earlier attempt's late event
    must not)."""
    stripe_id, status = refund["stripe_id"], refund["status"]
    if execution.stripe_refund_id is None:
        execution.stripe_refund_id = stripe_id
    elif execution.stripe_refund_id != stripe_id:
        log.warning(
            "refund.execution_mismatch",
            refund_id=str(execution.id),
            stripe_refund_id=stripe_id,
        )
        return
    if status in SUCCEEDED and execution.status in ("pending", "submitted"):
        execution.status = "succeeded"
        # refund_failed: a retry whose answer we never recorded (the retry adopts it too).
        if current and request.status in ("refund_pending", "refund_failed"):
            request.status = "refunded"
        audit_step(session, request, "refund_succeeded", ACTOR, stripe_refund_id=stripe_id)
        await _email(session, request, execution, succeeded=True)
    elif status in FAILED and execution.status != "failed":
        execution.status = "failed"
        execution.failure_reason = status
        # closed: finance closed it once the refund had succeeded; the refund has not reached
        # the client after all, so the request is open for a retry again.
        if current and request.status in ("refund_pending", "refunded", "closed"):
            request.status = "refund_failed"
        audit_step(
            session,
            request,
            "refund_failed",
            ACTOR,
            stripe_refund_id=stripe_id,
            stripe_status=status,
        )
        await _email(session, request, execution, succeeded=False)
    await session.flush()


async def _email(
    session: AsyncSession, request: RefundRequest, execution: RefundExecution, *, succeeded: bool
) -> None:
    to = await repo.account_email(session, request.account_id)
    if to is None:
        return
    outcome = "completed" if succeeded else "failed"
    amount = format_amount(execution.amount, execution.currency)
    body = (
        f"Your refund of {amount} has been sent to your original "
        "payment method; your bank decides when it appears."
        if succeeded
        else f"Your refund of {amount} could not be completed by "
        "the payment provider. Our finance team will contact you."
    )
    await enqueue_email(
        session,
        dedupe_key=f"refund-{outcome}:{execution.id}",
        to=to,
        subject=f"Your refund has {outcome} [{request.id}]",
        body=f"{body}\nRequest reference: {request.id}",
    )


async def _end_subscription(
    session: AsyncSession,
    execution: RefundExecution,
    payment: Any,
    settings: Settings,
    now: datetime,
) -> None:
    """End the refunded subscription's access now and record it for the cancellation at
    Stripe (app/refunds/cancels.py sends it, keyed by the execution). `execution`: locked;
    `payment`: the refund's `REFUND_FACTS`."""
    subscription = await repo.subscription_of(
        session,
        payment.payment_stripe_subscription_id,
        payment.payment_stripe_invoice_id,
        lock=True,
    )
    if subscription is None:
        log.warning("refund.subscription_unknown", payment_id=str(payment.payment_id))
        return
    execution.cancel_subscription_id = subscription.stripe_id
    if subscription.access_revoked_at is None:
        subscription.access_revoked_at = now
        await session.flush()
        await record_access_change(session, subscription.channel_id, settings, now)
