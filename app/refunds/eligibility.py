"""The zero-usage refund right (policy section 3), a pure function of stored facts.

One quote per subscription payment:

    refundable_amount = max(0, amount_paid - already_refunded - setup_fee - processing_fee)

and the payment is eligible only when no reason below applies:

- `usage_detected`: any activity was reported or any usage charge was made since the account
  started (the zero-usage condition is about the account, not one period).
- `already_refunded`: the whole payment has been refunded.
- `disputed`: the payment is under a chargeback, open or lost (never also refunded); one the
  bank decided for us (`won`), or an inquiry closed without one, leaves it refundable, as at
  Stripe.
- `payment_not_succeeded`: the payment did not succeed.
- `period_ended`: the paid period has ended, so it is deemed fully rendered (policy section 1).
- `fee_pending`: Stripe has not settled the processing fee yet, so the deduction is unknown.
- `nothing_left_after_deductions`: the deductions consume the whole payment.

The amount is rounded down to one Stripe refunds (`amount_step`: the last digit 0 in the
three-decimal currencies, whole krónur in ISK; a Stripe fee converted back from another
settlement currency is any number of minor units), so finance can approve the quote as it is
and it is never more than the policy's amount.

The setup fee is `WABA_SETUP_FEES[currency]`. A currency with no configured fee is quoted with
the whole payment as its setup fee (nothing is refundable) rather than guessing: configure
every currency you sell in. `already_refunded` counts Stripe's refunds and refunds this service
has asked for but Stripe has not yet confirmed, so a quote never double counts or over-refunds.
Top-ups are `manual_review_only`; Meta conversation fees are `never_refundable`; cancelling
never refunds the rest of a period and a maintenance window never creates a refund right.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from app.webhooks.fees import amount_step

Reason = Literal[
    "usage_detected",
    "already_refunded",
    "disputed",
    "payment_not_succeeded",
    "period_ended",
    "fee_pending",
    "nothing_left_after_deductions",
]


@dataclass(frozen=True)
class PaymentFacts:
    payment_id: uuid.UUID
    amount_paid: int
    currency: str
    status: str
    processing_fee: int | None
    already_refunded: int
    disputed: bool
    period_end: datetime | None


@dataclass(frozen=True)
class Quote:
    payment_id: uuid.UUID
    eligible: bool
    reasons: list[Reason]
    amount_paid: int
    already_refunded: int
    setup_fee: int
    processing_fee: int | None
    refundable_amount: int
    currency: str


def quote(
    facts: PaymentFacts,
    *,
    usage_detected: bool,
    setup_fees: dict[str, int],
    now: datetime,
) -> Quote:
    setup_fee = setup_fees.get(facts.currency.lower(), facts.amount_paid)
    processing_fee = facts.processing_fee
    refundable = max(
        0, facts.amount_paid - facts.already_refunded - setup_fee - (processing_fee or 0)
    )
    refundable -= refundable % amount_step(facts.currency)  # an amount Stripe refunds
    reasons: list[Reason] = []
    if usage_detected:
        reasons.append("usage_detected")
    if facts.already_refunded >= facts.amount_paid and facts.amount_paid > 0:
        reasons.append("already_refunded")
    if facts.disputed:
        reasons.append("disputed")
    if facts.status != "succeeded":
        reasons.append("payment_not_succeeded")
    if facts.period_end is not None and now >= facts.period_end:
        reasons.append("period_ended")
    if processing_fee is None and facts.status == "succeeded":
        reasons.append("fee_pending")
    if refundable == 0:
        reasons.append("nothing_left_after_deductions")
    return Quote(
        payment_id=facts.payment_id,
        eligible=not reasons,
        reasons=reasons,
        amount_paid=facts.amount_paid,
        already_refunded=facts.already_refunded,
        setup_fee=setup_fee,
        processing_fee=processing_fee,
        refundable_amount=refundable,
        currency=facts.currency,
    )
