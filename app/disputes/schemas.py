"""`GET /v1/finance/disputes`: chargebacks and what they changed."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class DisputeEffectOut(BaseModel):
    kind: Literal["balance_withdrawn", "balance_reinstated", "access_ended"]
    amount: int | None = Field(description="Signed ledger amount (balance effects).")
    currency: str | None
    subscription_id: uuid.UUID | None = Field(description="Subscription whose access ended.")
    at: datetime


class DisputeOut(BaseModel):
    id: uuid.UUID
    stripe_id: str
    account_id: str | None
    payment_id: uuid.UUID | None
    payment_purpose: str | None = Field(description="subscription|top_up|debt_repayment")
    stripe_charge_id: str
    amount: int
    currency: str
    status: str = Field(description="Stripe's dispute status (needs_response, won, lost...).")
    reason: str | None
    funds_withdrawn: int = Field(
        description="Withdrawn by Stripe from our balance, in the dispute's currency."
    )
    funds_reinstated: int = Field(
        description="Reinstated by Stripe (dispute won), in the dispute's currency."
    )
    access_ended: bool
    changes: list[DisputeEffectOut] = Field(description="What the chargeback changed here.")
    created_at: datetime
    updated_at: datetime
