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
"""

from __future__ import annotations

import uuid
from datetime import datetime

import structlog
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.models import Payment, Refund, RefundExecution, RefundRequest
from app.notifications.outbox import enqueue_email
from app.refunds import repository as repo
from app.refunds.service import audit_step
from app.stripe_gateway import StripeGateway, idempotency_key
from app.subscriptions.service import record_access_change

log = structlog.get_logger()

SUCCEEDED = ("succeeded",)
FAILED = ("failed", "canceled")
ACTOR = "stripe"
EXECUTION_BY_ID = select(RefundExecution).where(RefundExecution.id == bindparam("execution_id"))
EXECUTION_OF_REFUND = select(RefundExecution).where(
    RefundExecution.stripe_refund_id == bindparam("stripe_id")
)
"""Built once (run for every refund event)."""


async def on_refund_mirrored(
    session: AsyncSession,
    refund: Refund,
    settings: Settings,
    stripe: StripeGateway,
    *,
    occurred_at: datetime,
) -> None:
    """`occurred_at` is the Stripe event's time: effects are dated by what happened at
    Stripe, not by when this service processed it, so any delivery order dates them alike."""
    now = occurred_at
    execution = await _our_execution(session, refund)
    payment = await repo.payment_by_intent(session, refund.stripe_payment_intent_id)
    if payment is None:
        payment = await repo.payment_by_charge(session, refund.stripe_charge_id)
    if execution is not None:
        await _complete_execution(session, execution, refund)
    if payment is not None and payment.account_id and payment.purpose in repo.BALANCE_PURPOSES:
        await _adjust_ledger(session, payment, refund, now)
    if (
        execution is not None
        and payment is not None
        and payment.purpose == "subscription"
        and refund.status in repo.LIVE_REFUND_STATUSES
        and execution.subscription_cancelled_at is None
    ):
        await _cancel_subscription(session, execution, payment, stripe, settings, now)
    await session.flush()


async def _our_execution(session: AsyncSession, refund: Refund) -> RefundExecution | None:
    raw = (refund.metadata_ or {}).get("refund_execution_id")
    execution_id: uuid.UUID | None = None
    if isinstance(raw, str):
        try:
            execution_id = uuid.UUID(raw)
        except ValueError:
            execution_id = None
    if execution_id is not None:
        found = await session.execute(EXECUTION_BY_ID, {"execution_id": execution_id})
    else:
        found = await session.execute(EXECUTION_OF_REFUND, {"stripe_id": refund.stripe_id})
    execution = found.scalar_one_or_none()
    if execution is None:
        return None
    # Lock in the same order as the approval: request, then execution. The refund names its
    # own attempt, which need not be the request's latest one.
    request = await repo.get_request(session, execution.request_id, lock=True)
    assert request is not None
    return await repo.lock_execution(session, execution.id)


async def _complete_execution(
    session: AsyncSession, execution: RefundExecution, refund: Refund
) -> None:
    if execution.stripe_refund_id is None:
        execution.stripe_refund_id = refund.stripe_id
    elif execution.stripe_refund_id != refund.stripe_id:
        log.warning(
            "refund.execution_mismatch",
            refund_id=str(execution.id),
            stripe_refund_id=refund.stripe_id,
        )
        return
    request = await repo.get_request(session, execution.request_id, lock=True)
    assert request is not None
    # Only the latest attempt moves the request (an earlier attempt's late event must not).
    latest = await repo.execution_for_request(session, execution.request_id)
    current = latest is not None and latest.id == execution.id
    if refund.status in SUCCEEDED and execution.status in ("pending", "submitted"):
        execution.status = "succeeded"
        # refund_failed: a retry whose answer we never recorded (the retry adopts it too).
        if current and request.status in ("refund_pending", "refund_failed"):
            request.status = "refunded"
        audit_step(session, request, "refund_succeeded", ACTOR, stripe_refund_id=refund.stripe_id)
        await _email(session, request, execution, succeeded=True)
    elif refund.status in FAILED and execution.status != "failed":
        execution.status = "failed"
        execution.failure_reason = refund.status
        if current and request.status in ("refund_pending", "refunded"):
            request.status = "refund_failed"
        audit_step(
            session,
            request,
            "refund_failed",
            ACTOR,
            stripe_refund_id=refund.stripe_id,
            stripe_status=refund.status,
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
    session: AsyncSession, payment: Payment, refund: Refund, now: datetime
) -> None:
    assert payment.account_id is not None
    if refund.status in repo.LIVE_REFUND_STATUSES:
        await repo.add_ledger_entry(
            session,
            account_id=payment.account_id,
            kind="refund",
            source_id=refund.stripe_id,
            amount=-refund.amount,
            currency=refund.currency,
            description=f"Refund of {payment.purpose} payment {payment.stripe_id}",
            occurred_at=now,
        )
    elif refund.status in FAILED and await repo.ledger_entry_exists(
        session, payment.account_id, "refund", refund.stripe_id
    ):
        await repo.add_ledger_entry(
            session,
            account_id=payment.account_id,
            kind="refund_reversal",
            source_id=refund.stripe_id,
            amount=refund.amount,
            currency=refund.currency,
            description=f"Refund {refund.stripe_id} failed at Stripe",
            occurred_at=now,
        )


async def _cancel_subscription(
    session: AsyncSession,
    execution: RefundExecution,
    payment: Payment,
    stripe: StripeGateway,
    settings: Settings,
    now: datetime,
) -> None:
    subscription = await repo.subscription_of_payment(session, payment, lock=True)
    if subscription is None:
        log.warning("refund.subscription_unknown", payment_id=str(payment.id))
        return
    await stripe.cancel_subscription(
        subscription.stripe_id, key=idempotency_key("refund-cancel", execution.id)
    )
    execution.subscription_cancelled_at = now
    if subscription.access_revoked_at is None:
        subscription.access_revoked_at = now
        await session.flush()
        await record_access_change(session, subscription.channel_id, settings, now)
    request = await repo.get_request(session, execution.request_id)
    assert request is not None
    audit_step(
        session,
        request,
        "subscription_cancelled",
        ACTOR,
        subscription_id=subscription.stripe_id,
        prorate=False,
    )
