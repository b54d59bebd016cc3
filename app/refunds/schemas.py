"""Refund eligibility and refund/appeal request contract (service-contract.md)."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.calendar import Moment
from app.refunds.eligibility import Reason

RequestType = Literal["refund", "appeal", "compensation", "other"]
RequestStatus = Literal[
    "needs_information",
    "received",
    "acknowledged",
    "in_review",
    "approved",
    "rejected",
    "refund_pending",
    "refunded",
    "refund_failed",
    "closed",
]
ResponseKind = Literal["initial", "interim", "decision"]
# Replies shown to the client: finance's replies, plus the message that closed the request.
ReplyKind = Literal["initial", "interim", "decision", "closing"]
CloseReason = Literal["withdrawn", "resolved", "duplicate", "unresponsive"]
Outcome = Literal["approved", "rejected"]
Remedy = Literal["refund", "balance_credit", "access_extension"]
Currency = Field(pattern=r"^[a-z]{3}$", description="3-letter lowercase ISO currency.")


class RefundQuote(BaseModel):
    payment_id: uuid.UUID = Field(description="The subscription payment this quote is about.")
    eligible: bool = Field(description="True only when no reason applies.")
    reasons: list[Reason] = Field(description="Why the payment is not eligible (empty if it is).")
    amount_paid: int = Field(description="Minor units.")
    already_refunded: int = Field(description="Refunded or being refunded, minor units.")
    setup_fee: int = Field(description="WABA number setup fee deducted (WABA_SETUP_FEES).")
    processing_fee: int | None = Field(
        description="Stripe's processing fee for this payment; null until Stripe settles it."
    )
    refundable_amount: int = Field(
        description="max(0, paid - already refunded - setup fee - processing fee)."
    )
    currency: str


class RefundEligibility(BaseModel):
    quotes: list[RefundQuote] = Field(description="One quote per subscription payment.")
    top_ups: Literal["manual_review_only"] = Field(
        default="manual_review_only", description="Top-ups are reviewed individually."
    )
    meta_fees: Literal["never_refundable"] = Field(
        default="never_refundable", description="Meta conversation fees are never refunded."
    )


class _PaymentDetails(BaseModel):
    model_config = ConfigDict(extra="forbid")

    payment_reference: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="Identifies the payment: our payment id, a Stripe payment intent, charge, "
        "invoice or checkout session id.",
    )
    payment_date: date | None = Field(default=None, description="Date of the payment.")
    amount: int | None = Field(
        default=None, gt=0, le=10**12, description="Amount of the payment, minor units."
    )
    currency: str | None = Field(default=None, pattern=r"^[a-z]{3}$")


class RefundRequestCreate(_PaymentDetails):
    type: RequestType = Field(description="What the client asks for.")
    description: str = Field(min_length=1, max_length=10000, description="The situation.")


class FinanceRefundRequestCreate(RefundRequestCreate):
    account_id: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="The client's 1msg account id (as the account routes accept it).",
    )
    received_at: Moment = Field(description="When the email or call actually arrived.")
    channel: Literal["email", "phone"] = Field(description="How the request arrived.")


class RefundRequestUpdate(_PaymentDetails):
    description: str | None = Field(default=None, min_length=1, max_length=10000)


class ResponseCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: ResponseKind
    message: str = Field(min_length=1, max_length=10000, description="Emailed to the client.")
    next_step_due: Moment | None = Field(
        default=None, description="Interim replies: when the next step will come."
    )
    outcome: Outcome | None = Field(default=None, description="Decisions only.")
    remedy: Remedy | None = Field(default=None, description="Approved decisions only.")
    amount: int | None = Field(
        default=None, gt=0, le=10**12, description="Refund or balance credit, minor units."
    )
    days: int | None = Field(default=None, gt=0, le=366, description="Access extension days.")

    @model_validator(mode="after")
    def _consistent(self) -> ResponseCreate:
        if self.kind == "interim" and self.next_step_due is None:
            raise ValueError("interim replies need next_step_due")
        if self.kind != "interim" and self.next_step_due is not None:
            raise ValueError("next_step_due belongs to interim replies")
        if self.kind != "decision":
            if self.outcome or self.remedy or self.amount or self.days:
                raise ValueError("outcome, remedy, amount and days belong to decisions")
            return self
        if self.outcome is None:
            raise ValueError("decisions need an outcome")
        if self.outcome == "rejected":
            if self.remedy or self.amount or self.days:
                raise ValueError("a rejection has no remedy")
            return self
        if self.remedy is None:
            raise ValueError("an approval needs a remedy")
        if self.remedy in ("refund", "balance_credit"):
            if self.amount is None or self.days is not None:
                raise ValueError(f"remedy {self.remedy} needs amount (and no days)")
        elif self.days is None or self.amount is not None:
            raise ValueError("remedy access_extension needs days (and no amount)")
        return self


class RefundRetryCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str | None = Field(
        default=None,
        min_length=1,
        max_length=2000,
        description="Why the refund is retried (kept in the audit trail, not emailed).",
    )


class RequestClose(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: CloseReason = Field(
        description="`withdrawn` (the client withdrew it), `resolved` (nothing is left to do "
        "after the final reply or by other means), `duplicate` (another request covers it), "
        "`unresponsive` (the missing details never came)."
    )
    message: str = Field(
        min_length=1,
        max_length=10000,
        description="The closing reply, emailed to the client and shown with the replies.",
    )


class ResponseOut(BaseModel):
    id: uuid.UUID
    kind: ReplyKind = Field(description="`closing` is the reply that closed the request.")
    message: str
    next_step_due: datetime | None
    outcome: Outcome | None
    remedy: Remedy | None
    amount: int | None
    days: int | None
    created_at: datetime


class RefundOut(BaseModel):
    id: uuid.UUID = Field(description="Our refund id (Stripe idempotency key and metadata).")
    attempt: int = Field(
        description="1 for the approval's refund, +1 for each retry after Stripe failed one."
    )
    amount: int
    currency: str
    status: Literal["pending", "submitted", "succeeded", "failed"]
    stripe_refund_id: str | None
    failure_reason: str | None


class RefundRequestOut(BaseModel):
    id: uuid.UUID
    account_id: str
    type: RequestType
    status: RequestStatus
    description: str
    payment_reference: str | None
    payment_date: date | None
    amount: int | None
    currency: str | None
    payment_id: uuid.UUID | None = Field(description="The matched payment, once identified.")
    missing_information: list[str] = Field(
        description="What is still needed to identify the payment (needs_information)."
    )
    channel: Literal["api", "email", "phone"]
    received_at: datetime = Field(description="True time of receipt.")
    clock_started_at: datetime | None = Field(
        description="When the response clock started (the request became identifiable)."
    )
    first_response_due: datetime | None = Field(description="3 business days after the start.")
    decision_due: datetime | None = Field(description="14 business days after the start.")
    next_step_due: datetime | None = Field(description="Promised in the latest interim reply.")
    outcome: Outcome | None
    remedy: Remedy | None
    remedy_amount: int | None
    remedy_days: int | None
    responses: list[ResponseOut] = Field(description="Every reply, oldest first.")
    refund: RefundOut | None = Field(
        description="The refund executed through Stripe, if any (its latest attempt)."
    )


class AuditOut(BaseModel):
    id: int
    action: str
    actor: str = Field(description="The token `sub` (or `stripe` for Stripe's events).")
    status_after: RequestStatus
    details: dict[str, object]
    at: datetime


class FinanceRefundRequestOut(RefundRequestOut):
    overdue: bool = Field(description="A due date passed without the reply it asks for.")
    audit: list[AuditOut] = Field(description="Every step, append-only.")
