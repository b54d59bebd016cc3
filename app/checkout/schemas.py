"""Checkout sessions: the HTTP contract."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from app.redirects import RedirectUrl


class _CheckoutIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    success_url: RedirectUrl
    cancel_url: RedirectUrl


class SubscriptionCheckoutIn(_CheckoutIn):
    purpose: Literal["subscription"]
    plan: str = Field(min_length=1, max_length=64, description="A plan `code` from GET /v1/plans.")
    channel_id: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[\x21-\x2e\x30-\x7e]+$",
        description="The 1msg channel the plan is for; the first account to name it owns it. "
        "Printable ASCII without `/`, so GET /v1/channels/{channel_id}/access can address it.",
    )


class TopUpCheckoutIn(_CheckoutIn):
    purpose: Literal["top_up"]
    amount: StrictInt = Field(
        gt=0, le=10**12, description="Minor units, within TOP_UP_LIMITS for the currency."
    )
    currency: str = Field(
        min_length=3, max_length=3, pattern=r"^[A-Za-z]{3}$", description="ISO 4217 code."
    )


class DebtRepaymentCheckoutIn(_CheckoutIn):
    purpose: Literal["debt_repayment"]


CheckoutIn = Annotated[
    SubscriptionCheckoutIn | TopUpCheckoutIn | DebtRepaymentCheckoutIn,
    Field(discriminator="purpose"),
]


class CheckoutOut(BaseModel):
    id: str = Field(description="Our checkout session id.")
    url: str | None = Field(description="Stripe Checkout page to send the browser to.")
    purpose: Literal["subscription", "top_up", "debt_repayment"]
    status: Literal["open", "complete", "expired"] = Field(
        description="Stripe's session status as last seen."
    )
    fulfilled: bool = Field(
        description="True only once a Stripe payment event has been applied (access granted or "
        "balance credited)."
    )
    payment_status: str | None = Field(description="Stripe's `payment_status` as last seen.")
    expires_at: datetime | None
    channel_id: str | None = None
    plan: str | None = None
    amount: int | None = Field(default=None, description="Minor units (payment mode).")
    currency: str
    stripe_checkout_session_id: str | None = None
