"""Reading chargebacks for finance."""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.disputes.schemas import DisputeEffectOut, DisputeOut
from app.models import Dispute, DisputeEffect, Payment


async def list_disputes(
    session: AsyncSession,
    *,
    account_id: str | None,
    status: str | None,
    limit: int,
    offset: int,
) -> list[DisputeOut]:
    statement = select(Dispute, Payment).outerjoin(
        Payment,
        or_(
            Payment.stripe_id == Dispute.stripe_payment_intent_id,
            Payment.stripe_charge_id == Dispute.stripe_charge_id,
        ),
    )
    if account_id is not None:
        statement = statement.where(
            or_(Dispute.account_id == account_id, Payment.account_id == account_id)
        )
    if status is not None:
        statement = statement.where(Dispute.status == status)
    statement = (
        statement.order_by(Dispute.created_at.desc(), Dispute.id).limit(limit).offset(offset)
    )
    rows = (await session.execute(statement)).all()
    ids = [dispute.id for dispute, _ in rows]
    effects: dict[object, list[DisputeEffectOut]] = {i: [] for i in ids}
    if ids:
        found = await session.execute(
            select(DisputeEffect)
            .where(DisputeEffect.dispute_id.in_(ids))
            .order_by(DisputeEffect.id)
        )
        for effect in found.scalars():
            effects[effect.dispute_id].append(
                DisputeEffectOut.model_validate(effect, from_attributes=True)
            )
    return [
        DisputeOut(
            id=dispute.id,
            stripe_id=dispute.stripe_id,
            account_id=dispute.account_id or (payment.account_id if payment else None),
            payment_id=payment.id if payment else None,
            payment_purpose=payment.purpose if payment else None,
            stripe_charge_id=dispute.stripe_charge_id,
            amount=dispute.amount,
            currency=dispute.currency,
            status=dispute.status,
            reason=dispute.reason,
            funds_withdrawn=dispute.funds_withdrawn,
            funds_reinstated=dispute.funds_reinstated,
            access_ended=dispute.access_ended,
            changes=effects[dispute.id],
            created_at=dispute.created_at,
            updated_at=dispute.updated_at,
        )
        for dispute, payment in rows
    ]
