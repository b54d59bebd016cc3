"""What a mirrored chargeback changes (called by the webhook consumer for every
`charge.dispute.*` event after it upserted the `disputes` row; inside the event's transaction).

Decided from the dispute's stored state, not the event type, so any order converges:
- A top-up or debt repayment under dispute: once Stripe has withdrawn the funds
  (`funds_withdrawn > 0`) the disputed amount leaves the balance (ledger `dispute_withdrawal`,
  source the dispute id, once); once Stripe reinstates them (`funds_reinstated > 0`, a won
  dispute) it comes back (`dispute_reinstatement`, once, only after a withdrawal).
- A subscription payment whose dispute is `lost`: when `DISPUTE_LOST_ENDS_ACCESS` (default
  true) the subscription's access ends at once (`access_revoked_at`, `disputes.access_ended`).
- Open refund requests about the disputed payment are `closed`: a disputed payment is never
  also refunded (the approval refuses it too).
Each change is recorded once in `dispute_effects` for `GET /v1/finance/disputes`.
"""

from __future__ import annotations

from datetime import datetime
from typing import cast

import structlog
from sqlalchemy import Table, bindparam, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.models import Dispute, DisputeEffect, Payment, RefundRequest
from app.notifications.outbox import enqueue_email
from app.refunds import repository as repo
from app.refunds.service import OPEN_STATUSES, audit_step
from app.subscriptions.service import record_access_change

log = structlog.get_logger()

# Built once (run for every dispute effect the event processor applies).
RECORD_EFFECT = insert(cast(Table, DisputeEffect.__table__)).on_conflict_do_nothing(
    index_elements=["dispute_id", "kind"]
)
OPEN_REQUESTS = (
    select(RefundRequest)
    .where(
        RefundRequest.payment_id == bindparam("payment_id"),
        RefundRequest.type == "refund",
        RefundRequest.status.in_(OPEN_STATUSES),
    )
    .with_for_update()
)


async def on_dispute_mirrored(
    session: AsyncSession,
    dispute: Dispute,
    event_type: str,
    settings: Settings,
    *,
    occurred_at: datetime,
) -> None:
    """`occurred_at` is the Stripe event's time: effects are dated by what happened at
    Stripe, not by when this service processed it, so any delivery order dates them alike."""
    now = occurred_at
    payment = await repo.payment_by_intent(session, dispute.stripe_payment_intent_id)
    if payment is None:
        payment = await repo.payment_by_charge(session, dispute.stripe_charge_id)
    if payment is None or payment.account_id is None:
        log.warning("dispute.payment_unknown", dispute_id=dispute.stripe_id, event_type=event_type)
        return
    if payment.purpose in repo.BALANCE_PURPOSES:
        await _adjust_balance(session, dispute, payment, now)
    if (
        payment.purpose == "subscription"
        and dispute.status == "lost"
        and settings.dispute_lost_ends_access
    ):
        await _end_access(session, dispute, payment, settings, now)
    await _close_open_requests(session, dispute, payment)
    await session.flush()


async def _effect(
    session: AsyncSession,
    dispute: Dispute,
    kind: str,
    *,
    amount: int | None = None,
    currency: str | None = None,
    subscription_id: object = None,
) -> None:
    await session.execute(
        RECORD_EFFECT,
        {
            "dispute_id": dispute.id,
            "kind": kind,
            "amount": amount,
            "currency": currency,
            "subscription_id": subscription_id,
        },
    )


async def _adjust_balance(
    session: AsyncSession, dispute: Dispute, payment: Payment, now: datetime
) -> None:
    account_id = payment.account_id
    assert account_id is not None
    withdrawn = await repo.ledger_entry_exists(
        session, account_id, "dispute_withdrawal", dispute.stripe_id
    )
    if dispute.funds_withdrawn > 0 and not withdrawn:
        await repo.add_ledger_entry(
            session,
            account_id=account_id,
            kind="dispute_withdrawal",
            source_id=dispute.stripe_id,
            amount=-dispute.amount,
            currency=dispute.currency,
            description=f"Chargeback {dispute.stripe_id}: funds withdrawn by the bank",
            occurred_at=now,
        )
        await _effect(
            session, dispute, "balance_withdrawn", amount=-dispute.amount, currency=dispute.currency
        )
        withdrawn = True
    if dispute.funds_reinstated > 0 and withdrawn:
        added = await repo.add_ledger_entry(
            session,
            account_id=account_id,
            kind="dispute_reinstatement",
            source_id=dispute.stripe_id,
            amount=dispute.amount,
            currency=dispute.currency,
            description=f"Chargeback {dispute.stripe_id} won: funds reinstated",
            occurred_at=now,
        )
        if added:
            await _effect(
                session,
                dispute,
                "balance_reinstated",
                amount=dispute.amount,
                currency=dispute.currency,
            )


async def _end_access(
    session: AsyncSession, dispute: Dispute, payment: Payment, settings: Settings, now: datetime
) -> None:
    subscription = await repo.subscription_of_payment(session, payment, lock=True)
    if subscription is None:
        log.warning("dispute.subscription_unknown", dispute_id=dispute.stripe_id)
        return
    if subscription.access_revoked_at is None:
        subscription.access_revoked_at = now
        await session.flush()
        await record_access_change(session, subscription.channel_id, settings, now)
    dispute.access_ended = True
    await _effect(session, dispute, "access_ended", subscription_id=subscription.id)


async def _close_open_requests(session: AsyncSession, dispute: Dispute, payment: Payment) -> None:
    requests = (await session.execute(OPEN_REQUESTS, {"payment_id": payment.id})).scalars()
    for request in requests:
        request.status = "closed"
        audit_step(session, request, "closed_by_chargeback", "stripe", dispute_id=dispute.stripe_id)
        to = await repo.account_email(session, request.account_id)
        if to is not None:
            await enqueue_email(
                session,
                dedupe_key=f"refund-request-closed:{request.id}",
                to=to,
                subject=f"Your refund request is closed [{request.id}]",
                body="The payment is now disputed with your bank (a chargeback). A disputed "
                "payment cannot also be refunded, so the bank's decision replaces this "
                f"refund request.\nRequest reference: {request.id}",
            )
