"""Amounts in emails: minor units written with the currency's own exponent."""

from __future__ import annotations

from app.notifications.outbox import format_amount


def test_amounts_are_written_from_minor_units_with_the_currency_exponent() -> None:
    assert format_amount(2257, "usd") == "22.57 USD"
    assert format_amount(5, "eur") == "0.05 EUR"
    assert format_amount(1234567, "usd") == "12,345.67 USD"
    assert format_amount(1500, "jpy") == "1,500 JPY"  # zero-decimal: whole yen
    assert format_amount(1500, "kwd") == "1.500 KWD"  # three decimals
    assert format_amount(-250, "usd") == "-2.50 USD"
