"""Mirror rows the read tests seed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from app.models import Payment

NOW = datetime.now(UTC)


def succeeded_payment(
    stripe_id: str, account_id: str, *, days_ago: int, purpose: str = "subscription", **values: Any
) -> Payment:
    """A succeeded payment `days_ago` days old: a 39.00 usd subscription payment with a 1.43
    fee unless `values` say otherwise."""
    return Payment(
        stripe_id=stripe_id,
        account_id=account_id,
        purpose=purpose,
        amount=values.pop("amount", 3900),
        currency="usd",
        status="succeeded",
        fee=values.pop("fee", 143),
        paid_at=NOW - timedelta(days=days_ago),
        **values,
    )
