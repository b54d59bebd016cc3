"""The zero-usage refund quote as a pure function of stored facts (table-driven)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from app.refunds.eligibility import PaymentFacts, quote

NOW = datetime(2026, 11, 26, 12, tzinfo=UTC)
FEES = {"usd": 1500, "eur": 1400, "jpy": 2000, "sgd": 2000}


def facts(
    amount: int = 3900,
    currency: str = "usd",
    *,
    fee: int | None = 143,
    refunded: int = 0,
    status: str = "succeeded",
    disputed: bool = False,
    period_end: datetime | None = NOW + timedelta(days=20),
) -> PaymentFacts:
    return PaymentFacts(
        payment_id=uuid.uuid4(),
        amount_paid=amount,
        currency=currency,
        status=status,
        processing_fee=fee,
        already_refunded=refunded,
        disputed=disputed,
        period_end=period_end,
    )


@pytest.mark.parametrize(
    ("payment", "refundable", "setup_fee", "eligible"),
    [
        # usd 39.00 - 15.00 setup - 1.43 Stripe fee
        (facts(3900, "usd", fee=143), 2257, 1500, True),
        # euros with their own setup fee
        (facts(3600, "eur", fee=79), 2121, 1400, True),
        # zero-decimal currency: yen are whole units
        (facts(5000, "jpy", fee=180), 2820, 2000, True),
        (facts(39000, "sgd", fee=1161), 35839, 2000, True),
        # partial refund already made: only the rest, less the deductions
        (facts(3900, "usd", fee=143, refunded=1000), 1257, 1500, True),
        # deductions exactly consume the payment
        (facts(1643, "usd", fee=143), 0, 1500, False),
        # setup fee larger than the payment
        (facts(1000, "usd", fee=59), 0, 1500, False),
        # Stripe fee larger than what is left after the setup fee
        (facts(1600, "usd", fee=300), 0, 1500, False),
        # partial refund leaves too little to cover the deductions
        (facts(3900, "usd", fee=143, refunded=3000), 0, 1500, False),
        # a currency without a configured setup fee refunds nothing rather than guessing
        (facts(3900, "gbp", fee=143), 0, 3900, False),
    ],
)
def test_refundable_amount_is_paid_less_refunds_setup_fee_and_stripe_fee(
    payment: PaymentFacts, refundable: int, setup_fee: int, eligible: bool
) -> None:
    result = quote(payment, usage_detected=False, setup_fees=FEES, now=NOW)
    assert result.refundable_amount == refundable
    assert result.setup_fee == setup_fee
    assert result.processing_fee == payment.processing_fee
    assert result.eligible is eligible
    assert result.currency == payment.currency
    assert ("nothing_left_after_deductions" in result.reasons) is (refundable == 0)


@pytest.mark.parametrize(
    ("payment", "usage", "reasons"),
    [
        (facts(), True, ["usage_detected"]),
        (facts(refunded=3900), False, ["already_refunded", "nothing_left_after_deductions"]),
        (facts(disputed=True), False, ["disputed"]),
        (facts(status="failed", fee=None), False, ["payment_not_succeeded"]),
        (facts(period_end=NOW), False, ["period_ended"]),
        (facts(period_end=NOW - timedelta(seconds=1)), False, ["period_ended"]),
        (facts(fee=None), False, ["fee_pending"]),
        (
            facts(fee=None, disputed=True, period_end=NOW - timedelta(days=1)),
            True,
            ["usage_detected", "disputed", "period_ended", "fee_pending"],
        ),
    ],
)
def test_each_rule_names_its_reason(payment: PaymentFacts, usage: bool, reasons: list[str]) -> None:
    result = quote(payment, usage_detected=usage, setup_fees=FEES, now=NOW)
    assert result.reasons == reasons
    assert result.eligible is False


def test_a_partial_refund_does_not_count_as_already_refunded() -> None:
    result = quote(facts(refunded=500), usage_detected=False, setup_fees=FEES, now=NOW)
    assert result.reasons == []
    assert result.already_refunded == 500
    assert result.refundable_amount == 3900 - 500 - 1500 - 143
