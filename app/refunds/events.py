"""What a mirrored Stripe refund changes (called by the webhook consumer after it upserted the
`refunds` row, inside the event's transaction: flush only).

- Our refunds are matched by `metadata.refund_execution_id` (set when we created them), or by
  Stripe refund id; a refund event may arrive before our own approval recorded Stripe's
  answer, in which case the execution is completed here and the approval adopts its status.
- The request moves to `refunded` / `refund_failed` once.
- A refund of a top-up or debt repayment debits the ledger once (kind `refund`, source the
  Stripe refund id), whoever made it (our approval or the Dashboard); if Stripe later reports it
  failed or canceled, a `refund_reversal` credit restores the balance once.
- Our approved refund of a subscription payment cancels that subscription at Stripe at once,
  without proration or a final invoice, and ends its access (`access_revoked_at`). Refunds
  made in the Dashboard do not cancel anything here.
Every step is idempotent: the hook runs again for every event about the same refund.

The refund arrives as its row's columns (`RefundRow`, read and written with Core by the
webhook consumer), and one statement (`REFUND_FACTS_BY_EXECUTION` / `REFUND_FACTS_BY_REFUND`)
reads what the effects are decided on: our execution (if any), its request's latest attempt,
and the refunded payment. Only our own refunds load ORM rows (the request and execution they
change, locked).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import (
    ColumnElement,
    Row,
    Select,
    String,
    Uuid,
    bindparam,
    literal_column,
    select,
    true,
)
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.models import Payment, RefundExecution, RefundRequest
from app.notifications.outbox import enqueue_email
from app.refunds import repository as repo
from app.refunds.service import audit_step
from app.stripe_gateway import StripeGateway, idempotency_key
from app.subscriptions.service import record_access_change

log = structlog.get_logger()

SUCCEEDED = ("succeeded",)
FAILED = ("failed", "canceled")
ACTOR = "stripe"

RefundRow = Mapping[str, Any]
"""A `refunds` row as column name -> value (`metadata` is the JSON object)."""
PAYMENT_FACTS = (
    "id",
    "stripe_id",
    "account_id",
    "purpose",
    "stripe_subscription_id",
    "stripe_invoice_id",
)
"""The payment columns refund and dispute effects are decided on."""


def _refund_facts(ours: ColumnElement[bool]) -> Select[Any]:
    """One row: our execution matching `ours` (`execution_id`, `request_id`, and
    `latest_id`, its request's latest attempt; NULL when the refund is not ours), and the
    refunded payment's `PAYMENT_FACTS` (as `payment_<column>`; found by :payment_intent,
    else by :charge, as `payment_by_intent` then `payment_by_charge`; NULL when unknown).
    Plain reads: the execution and its request are locked afterwards, request first."""
    executions = RefundExecution.__table__
    attempts = executions.alias("attempts")
    payments = Payment.__table__
    latest = (
        select(attempts.c.id)
        .where(attempts.c.request_id == executions.c.request_id)
        .order_by(attempts.c.attempt.desc())
        .limit(1)
        .scalar_subquery()
    )
    execution = (
        select(
            executions.c.id.label("execution_id"),
            executions.c.request_id,
            latest.label("latest_id"),
        )
        .where(ours)
        .lateral("ours")
    )
    columns = [payments.c[name] for name in PAYMENT_FACTS]
    payment = (
        select(literal_column("0").label("rank"), *columns)
        .where(payments.c.stripe_id == bindparam("payment_intent", type_=String))
        .union_all(
            select(literal_column("1").label("rank"), *columns).where(
                payments.c.stripe_charge_id == bindparam("charge", type_=String)
            )
        )
        .order_by("rank")
        .limit(1)
        .lateral("payment")
    )
    one = select(literal_column("1").label("one")).subquery("one")
    return select(
        execution.c.execution_id,
        execution.c.request_id,
        execution.c.latest_id,
        *(payment.c[name].label(f"payment_{name}") for name in PAYMENT_FACTS),
    ).select_from(one.outerjoin(execution, true()).outerjoin(payment, true()))


_executions = RefundExecution.__table__
REFUND_FACTS_BY_EXECUTION = _refund_facts(_executions.c.id == bindparam("execution_id", type_=Uuid))
"""`_refund_facts` for a refund naming our execution in its metadata."""
REFUND_FACTS_BY_REFUND = _refund_facts(
    _executions.c.stripe_refund_id == bindparam("stripe_id", type_=String)
)
"""`_refund_facts` for any other refund: our execution that recorded this Stripe refund."""


async def on_refund_mirrored(
    session: AsyncSession,
    refund: RefundRow,
    settings: Settings,
    stripe: StripeGateway,
    *,
    occurred_at: datetime,
) -> None:
    """`occurred_at` is the Stripe event's time: effects are dated by what happened at
    Stripe, not by when this service processed it, so any delivery order dates them alike."""
    now = occurred_at
    facts = await _refund_facts_of(session, refund)
    execution: RefundExecution | None = None
    request: RefundRequest | None = None
    if facts.execution_id is not None:
        # Lock in the same order as the approval: request, then execution. The refund names
        # its own attempt, which need not be the request's latest one.
        request = await repo.get_request(session, facts.request_id, lock=True)
        assert request is not None
        execution = await repo.lock_execution(session, facts.execution_id)
    payment = facts if facts.payment_id is not None else None
    if execution is not None:
        assert request is not None
        current = facts.latest_id == execution.id
        await _complete_execution(session, execution, request, refund, current=current)
    if (
        payment is not None
        and payment.payment_account_id
        and payment.payment_purpose in repo.BALANCE_PURPOSES
    ):
        await _adjust_ledger(session, payment, refund, now)
    if (
        execution is not None
        and payment is not None
        and payment.payment_purpose == "subscription"
        and refund["status"] in repo.LIVE_REFUND_STATUSES
        and execution.subscription_cancelled_at is None
    ):
        assert request is not None
        await _cancel_subscription(session, execution, request, payment, stripe, settings, now)
    await session.flush()


async def _refund_facts_of(session: AsyncSession, refund: RefundRow) -> Row[Any]:
    """What the effects of `refund` are decided on (`_refund_facts`), in one statement."""
    params: dict[str, Any] = {
        "payment_intent": refund["stripe_payment_intent_id"] or None,
        "charge": refund["stripe_charge_id"] or None,
    }
    execution_id = _execution_named(refund["metadata"])
    if execution_id is not None:
        found = await session.execute(
            REFUND_FACTS_BY_EXECUTION, {**params, "execution_id": execution_id}
        )
    else:
        found = await session.execute(
            REFUND_FACTS_BY_REFUND, {**params, "stripe_id": refund["stripe_id"]}
        )
    facts: Row[Any] = found.one()
    return facts


def _execution_named(metadata: Mapping[str, Any] | None) -> uuid.UUID | None:
    """Our execution's id from the refund's metadata (None when absent or not an id)."""
    raw = (metadata or {}).get("refund_execution_id")
    if isinstance(raw, str):
        try:
            return uuid.UUID(raw)
        except ValueError:
            return None
    return None


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
        if current and request.status in ("refund_pending", "refunded"):
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
    body = (
        f"Your refund of {execution.amount} {execution.currency} has been sent to your original "
        "payment method; your bank decides when it appears."
        if succeeded
        else f"Your refund of {execution.amount} {execution.currency} could not be completed by "
        "the payment provider. Our finance team will contact you."
    )
    await enqueue_email(
        session,
        dedupe_key=f"refund-{outcome}:{execution.id}",
        to=to,
        subject=f"Your refund has {outcome} [{request.id}]",
        body=f"{body}\nRequest reference: {request.id}",
    )


async def _adjust_ledger(
    session: AsyncSession, payment: Row[Any], refund: RefundRow, now: datetime
) -> None:
    """`payment`: the refund's `_refund_facts` (the payment's columns as `payment_<name>`)."""
    account_id: str = payment.payment_account_id
    stripe_id, amount, currency = refund["stripe_id"], refund["amount"], refund["currency"]
    if refund["status"] in repo.LIVE_REFUND_STATUSES:
        await repo.add_ledger_entry(
            session,
            account_id=account_id,
            kind="refund",
            source_id=stripe_id,
            amount=-amount,
            currency=currency,
            description=(
                f"Refund of {payment.payment_purpose} payment {payment.payment_stripe_id}"
            ),
            occurred_at=now,
        )
    elif refund["status"] in FAILED and await repo.ledger_entry_exists(
        session, account_id, "refund", stripe_id
    ):
        await repo.add_ledger_entry(
            session,
            account_id=account_id,
            kind="refund_reversal",
            source_id=stripe_id,
            amount=amount,
            currency=currency,
            description=f"Refund {stripe_id} failed at Stripe",
            occurred_at=now,
        )


async def _cancel_subscription(
    session: AsyncSession,
    execution: RefundExecution,
    request: RefundRequest,
    payment: Row[Any],
    stripe: StripeGateway,
    settings: Settings,
    now: datetime,
) -> None:
    """`request`: the execution's (locked); `payment`: the refund's `_refund_facts`."""
    subscription = await repo.subscription_of(
        session,
        payment.payment_stripe_subscription_id,
        payment.payment_stripe_invoice_id,
        lock=True,
    )
    if subscription is None:
        log.warning("refund.subscription_unknown", payment_id=str(payment.payment_id))
        return
    await stripe.cancel_subscription(
        subscription.stripe_id, key=idempotency_key("refund-cancel", execution.id)
    )
    execution.subscription_cancelled_at = now
    if subscription.access_revoked_at is None:
        subscription.access_revoked_at = now
        await session.flush()
        await record_access_change(session, subscription.channel_id, settings, now)
    audit_step(
        session,
        request,
        "subscription_cancelled",
        ACTOR,
        subscription_id=subscription.stripe_id,
        prorate=False,
    )
