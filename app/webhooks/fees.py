"""Stripe's processing fee of each payment, looked up after the charge's events are applied.

A charge event names the charge's balance transaction by id (webhooks do not expand it); its
`fee` is the processing fee a refund quote deducts. Applying the event stores the id
(`payments.stripe_balance_transaction_id`); `FeeLookups.run` then looks up the fees still
unknown (index `ix_payments_fee_unsettled`), up to `ROUND_SIZE` at a time, `CONCURRENCY` at
once, and writes them in one statement. Until then a refund quote says `fee_pending`, as it
does before Stripe settles the charge. An event that carries the balance transaction expanded
gives its fee at once (app/webhooks/handlers.py `charge_change`).

Why not inside the transaction that applies the events: a look-up is a Stripe round trip and
about a millisecond of our CPU in the SDK, about a third of the processor's CPU
(bench/README.md, item 36), spent while that transaction held its locks; and a Stripe outage
failed whole batches of events that did not need Stripe. Now an outage delays fees only: after
a round with a failed look-up, the next waits `FAILURE_BACKOFF_SECONDS`.

The event processor starts rounds in a task beside its events' loop when no event is due, and
at least every `MAX_WAIT_SECONDS` while events keep coming (app/webhooks/processor.py): applying
events, which access and balances depend on, comes first and never waits for Stripe. On
several replicas, a round holds a transaction-level advisory lock, so one replica looks fees
up at a time and each fee is looked up once; that transaction holds no row lock while Stripe
answers, and the write keeps a fee once known (`fee IS NULL`). The write never waits for a row
(`WRITE_FEES` skips the payments an event batch holds, whose fees a later round looks up
again): a round holding some payments while waiting for another could deadlock with a batch.
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import Any, cast

import structlog
from sqlalchemy import Table, bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import ArrayUpdate, DriverStatement, session_driver
from app.models import Payment
from app.stripe_gateway import StripeGateway

log = structlog.get_logger()

ROUND_SIZE = 100
CONCURRENCY = 8
FAILURE_BACKOFF_SECONDS = 60.0
MAX_WAIT_SECONDS = 5.0

ONE_ROUND_AT_A_TIME = "SELECT pg_try_advisory_xact_lock(hashtextextended('billing:fees', 0))"
UNSETTLED = DriverStatement(
    select(Payment.id, Payment.stripe_balance_transaction_id, Payment.currency)
    .where(Payment.fee.is_(None), Payment.stripe_balance_transaction_id.is_not(None))
    .order_by(Payment.id)
    .limit(bindparam("limit")),
    named=True,
)
WRITE_FEES = ArrayUpdate(
    cast(Table, Payment.__table__),
    ["fee"],
    where='"payments".fee IS NULL AND "payments".id IN'
    " (SELECT held.id FROM payments AS held WHERE held.id = v.id FOR UPDATE SKIP LOCKED)",
)
"""Skips the payments another transaction holds (an event batch applying): waiting for one
while holding others could deadlock with that batch; their fees are written by a later round."""


ZERO_DECIMAL_CURRENCIES = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga"}
    | {"pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"}
)
THREE_DECIMAL_CURRENCIES = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})
"""Stripe's currencies whose minor unit is not a hundredth (docs.stripe.com/currencies)."""


def minor_unit_digits(currency: str) -> int:
    """How many decimals Stripe's integer amounts of `currency` carry (2 for most)."""
    currency = currency.lower()
    if currency in ZERO_DECIMAL_CURRENCIES:
        return 0
    return 3 if currency in THREE_DECIMAL_CURRENCIES else 2


def amount_step(currency: str) -> int:
    """What every amount Stripe charges or refunds in `currency` is a multiple of, in its minor
    units: 10 in the three-decimal currencies (the last digit must be 0, for Stripe's payment
    partners) and 100 in ISK (whole krónur, though its API amounts carry two decimals); 1
    elsewhere (docs.stripe.com/currencies, three-decimal currencies and special cases)."""
    currency = currency.lower()
    if currency in THREE_DECIMAL_CURRENCIES:
        return 10
    return 100 if currency == "isk" else 1


def fee_in_payment_currency(balance_transaction: dict[str, Any], payment_currency: str) -> int:
    """Stripe's fee is in the settlement currency, in its minor units; convert it back when
    that differs (`in_currency`)."""
    return in_currency(
        int(balance_transaction.get("fee") or 0), balance_transaction, payment_currency
    )


def in_currency(amount: int, balance_transaction: dict[str, Any], currency: str) -> int:
    """`amount` of `balance_transaction` (in its settlement currency's minor units) in
    `currency`'s minor units, the currency it was converted from. Stripe's `exchange_rate`
    converts major units (10.00 EUR x 1.234 = 12.34 USD), so between currencies of different
    minor units (JPY's are whole yen) the powers of ten differ too."""
    rate = balance_transaction.get("exchange_rate")
    settlement = str(balance_transaction.get("currency") or currency)
    if settlement != currency and rate:
        digits = minor_unit_digits(currency) - minor_unit_digits(settlement)
        return round(amount / float(rate) * 10.0**digits)
    return amount


class FeeLookups:
    def __init__(
        self, session_factory: async_sessionmaker[AsyncSession], stripe: StripeGateway
    ) -> None:
        self._session_factory = session_factory
        self._stripe = stripe
        self._next_round_at = 0.0  # monotonic(); later after a failed look-up

    async def run(self) -> int:
        """One round; returns how many fees it wrote (0: none unknown, another replica's round
        is running, the backoff after a failure has not passed, or every payment looked up is
        held by an event batch: the caller's next round waits, rather than asking Stripe
        again at once)."""
        if monotonic() < self._next_round_at:
            return 0
        async with self._session_factory() as session, session.begin():
            driver = await session_driver(session)
            if not await driver.fetchval(ONE_ROUND_AT_A_TIME):
                return 0
            unsettled = await UNSETTLED.fetch(driver, limit=ROUND_SIZE)
            fees, failures = await self._look_up(unsettled)
            written = await WRITE_FEES.execute(driver, fees)
        if failures:
            self._next_round_at = monotonic() + FAILURE_BACKOFF_SECONDS
            log.warning(
                "payment_fee.lookup_failed",
                failed=len(failures),
                written=written,
                error_type=type(failures[0]).__name__,
                retry_in_seconds=FAILURE_BACKOFF_SECONDS,
            )
        return written

    async def _look_up(self, payments: list[Any]) -> tuple[list[dict[str, Any]], list[Exception]]:
        """The fees of `payments` (`UNSETTLED` rows) Stripe gave, and the look-ups' failures."""
        slots = asyncio.Semaphore(CONCURRENCY)

        async def fee_of(payment: Any) -> dict[str, Any]:
            async with slots:
                transaction = await self._stripe.retrieve_balance_transaction(
                    payment.stripe_balance_transaction_id
                )
            return {"id": payment.id, "fee": fee_in_payment_currency(transaction, payment.currency)}

        outcomes = await asyncio.gather(*map(fee_of, payments), return_exceptions=True)
        fees, failures = [], []
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                failures.append(outcome)
            elif isinstance(outcome, BaseException):
                raise outcome  # cancelled: the round ends with nothing written
            else:
                fees.append(outcome)
        return fees, failures
