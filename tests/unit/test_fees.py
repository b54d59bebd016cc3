"""Stripe's fee converted back from the settlement currency into the payment's, in minor
units: Stripe's `exchange_rate` converts major units, so currencies whose minor unit is not a
hundredth (zero-decimal JPY, three-decimal KWD) need their power of ten."""

from __future__ import annotations

from app.webhooks.fees import fee_in_payment_currency


def transaction(fee: int, currency: str, exchange_rate: float | None) -> dict[str, object]:
    return {"fee": fee, "currency": currency, "exchange_rate": exchange_rate}


def test_a_fee_in_the_payment_currency_is_taken_as_it_is() -> None:
    assert fee_in_payment_currency(transaction(59, "usd", None), "usd") == 59


def test_a_fee_settled_in_another_two_decimal_currency_is_converted_back() -> None:
    # Stripe's own example: 10.00 EUR charged, 12.34 USD settled, exchange_rate 1.234;
    # a fee of 0.66 USD is 0.53 EUR
    assert fee_in_payment_currency(transaction(66, "usd", 1.234), "eur") == 53


def test_a_fee_of_a_zero_decimal_payment_is_in_whole_units_of_its_currency() -> None:
    # 1000 JPY settled as 6.70 USD (exchange_rate 0.0067): a fee of 0.49 USD is 73 JPY
    assert fee_in_payment_currency(transaction(49, "usd", 0.0067), "jpy") == 73


def test_a_fee_settled_in_a_zero_or_three_decimal_currency_is_converted_into_cents() -> None:
    # 10.00 USD settled as 1,493 JPY (exchange_rate 149.3): a fee of 58 JPY is 0.39 USD
    assert fee_in_payment_currency(transaction(58, "jpy", 149.3), "usd") == 39
    # 10.00 USD settled as 3.070 KWD (exchange_rate 0.307): a fee of 0.120 KWD is 0.39 USD
    assert fee_in_payment_currency(transaction(120, "kwd", 0.307), "usd") == 39
