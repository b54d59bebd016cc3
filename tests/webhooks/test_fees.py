"""Stripe's fees looked up after the charge's events are applied (app/webhooks/fees.py): not
by the transaction that applies them, not lost when Stripe fails, never holding up the events
while Stripe is slow, and once per fee however many replicas look."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from app.config import Settings
from app.models import Payment, StripeEvent
from app.stripe_gateway import StripeGateway
from app.webhooks import fees
from app.webhooks.fees import FeeLookups
from app.webhooks.processor import EventProcessor
from tests.conftest import STRIPE_KEY, Deliver, plain_dsn
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import add_catalog, open_checkout

BALANCE_TRANSACTIONS = "/v1/balance_transactions"


async def _settled_top_ups(
    app: FastAPI, fake: StripeFake, deliver: Deliver, fees_by_account: dict[str, int]
) -> dict[str, str]:
    """A paid top-up per account, its charge settled with the given fee at Stripe and every
    event stored but not applied; returns each account's payment intent."""
    add_catalog(fake)
    payment_intents = {}
    for account_id, fee in fees_by_account.items():
        session_id = await open_checkout(app, account_id=account_id, purpose="top_up", amount=3000)
        await deliver(fake.complete_checkout(session_id), process=False)
        payment_intent = str(fake.get("checkout.session", session_id)["payment_intent"])
        charge = str(fake.get("payment_intent", payment_intent)["latest_charge"])
        await deliver(fake.settle_charge(charge, fee=fee), process=False)
        payment_intents[account_id] = payment_intent
    return payment_intents


async def _fees(app: FastAPI) -> dict[str, int | None]:
    async with app.state.session_factory() as session:
        rows = await session.execute(select(Payment.stripe_id, Payment.fee))
        return {stripe_id: fee for stripe_id, fee in rows}


async def _unapplied(app: FastAPI) -> int:
    async with app.state.session_factory() as session:
        rows = await session.scalars(select(StripeEvent).where(StripeEvent.status == "pending"))
        return len(rows.all())


async def test_a_fee_is_looked_up_after_its_events_are_applied(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver
) -> None:
    intents = await _settled_top_ups(app, stripe_fake, deliver, {"acc_fee_a": 117})
    processor = app.state.event_processor
    while await processor.process_due():
        pass
    assert await _unapplied(app) == 0
    assert await _fees(app) == {intents["acc_fee_a"]: None}  # the events asked Stripe nothing
    assert stripe_fake.requests_to("GET", BALANCE_TRANSACTIONS) == []

    await processor.drain()
    assert await _fees(app) == {intents["acc_fee_a"]: 117}
    assert len(stripe_fake.requests_to("GET", BALANCE_TRANSACTIONS)) == 1
    await processor.drain()  # nothing left to look up
    assert len(stripe_fake.requests_to("GET", BALANCE_TRANSACTIONS)) == 1


async def test_stripe_failing_delays_fees_and_no_event(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver, monkeypatch: pytest.MonkeyPatch
) -> None:
    intents = await _settled_top_ups(app, stripe_fake, deliver, {"acc_fee_b": 143})
    stripe_fake.fail_next(2, 500, path_prefix=BALANCE_TRANSACTIONS)  # one SDK retry
    processor = app.state.event_processor
    await processor.drain()
    assert await _unapplied(app) == 0  # every event applied all the same
    assert await _fees(app) == {intents["acc_fee_b"]: None}
    assert len(stripe_fake.requests_to("GET", BALANCE_TRANSACTIONS)) == 2

    await processor.drain()  # Stripe answers again, but the backoff has not passed
    assert len(stripe_fake.requests_to("GET", BALANCE_TRANSACTIONS)) == 2
    assert await _fees(app) == {intents["acc_fee_b"]: None}

    later = fees.monotonic() + fees.FAILURE_BACKOFF_SECONDS + 1
    monkeypatch.setattr(fees, "monotonic", lambda: later)
    await processor.drain()
    assert await _fees(app) == {intents["acc_fee_b"]: 143}
    assert len(stripe_fake.requests_to("GET", BALANCE_TRANSACTIONS)) == 3


async def test_replicas_looking_up_at_once_ask_stripe_once_per_fee(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver
) -> None:
    accounts = {f"acc_fee_{n}": 100 + n for n in range(6)}
    intents = await _settled_top_ups(app, stripe_fake, deliver, accounts)
    while await app.state.event_processor.process_due():
        pass
    replicas = [FeeLookups(app.state.session_factory, app.state.stripe) for _ in range(3)]
    written = await asyncio.gather(*(replica.run() for replica in replicas))
    assert sum(written) == len(accounts)
    assert await _fees(app) == {intents[account]: fee for account, fee in accounts.items()}
    assert len(stripe_fake.requests_to("GET", BALANCE_TRANSACTIONS)) == len(accounts)


async def test_a_slow_stripe_holds_up_fees_not_events(
    app: FastAPI, settings: Settings, stripe_fake: StripeFake, deliver: Deliver
) -> None:
    first = await _settled_top_ups(app, stripe_fake, deliver, {"acc_fee_slow_a": 99})
    stripe_fake.fail_next(1, kind="timeout", delay=30.0, path_prefix=BALANCE_TRANSACTIONS)
    patient = StripeGateway(  # waits the 30 s out rather than giving up
        api_key=STRIPE_KEY, api_base=stripe_fake.url, max_network_retries=0, timeout_seconds=60
    )
    processor = EventProcessor(app.state.session_factory, settings, patient, poll_seconds=0.05)
    running = asyncio.create_task(processor.run_forever())
    try:
        for _ in range(200):  # the events applied, then the fee round asks Stripe and waits
            if stripe_fake.requests_to("GET", BALANCE_TRANSACTIONS):
                break
            await asyncio.sleep(0.05)
        second = await _settled_top_ups(app, stripe_fake, deliver, {"acc_fee_slow_b": 98})
        for _ in range(200):
            if not await _unapplied(app):
                break
            await asyncio.sleep(0.05)
        assert await _unapplied(app) == 0  # applied while the look-up waits
        [waiting] = stripe_fake.requests_to("GET", BALANCE_TRANSACTIONS)
        assert waiting.status is None  # Stripe has not answered it yet
        assert await _fees(app) == {first["acc_fee_slow_a"]: None, second["acc_fee_slow_b"]: None}
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await patient.close()


@pytest.mark.parametrize("batch_holds", ["first", "second"])
async def test_writing_fees_never_deadlocks_with_an_applying_batch(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver, database_url: str, batch_holds: str
) -> None:
    """A round runs beside the event processor, whose batch updates payments in its own
    order: a fee write holding one payment's row while waiting for another's could close a
    cycle with a batch that holds the second and then writes the first (Postgres breaks it
    after `deadlock_timeout`, ~1 s of stalled events, failing one side). The write skips the
    rows a batch holds; their fees are written by a later round."""
    intents = await _settled_top_ups(
        app, stripe_fake, deliver, {"acc_fee_k1": 111, "acc_fee_k2": 122}
    )
    while await app.state.event_processor.process_due():
        pass
    first, second = intents["acc_fee_k1"], intents["acc_fee_k2"]
    fee_of = {first: 111, second: 122}
    held, other = (first, second) if batch_holds == "first" else (second, first)
    touch = "UPDATE payments SET updated_at = now() WHERE stripe_id = $1"
    batch = await asyncpg.connect(plain_dsn(database_url))
    admin = await asyncpg.connect(plain_dsn(database_url))
    try:
        await batch.execute("BEGIN")
        await batch.execute(touch, held)
        processor = app.state.event_processor
        rounds = asyncio.create_task(processor.drain())  # until a round writes nothing
        for _ in range(500):  # until the rounds end or one waits for the held row
            if rounds.done() or await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            ):
                break
            await asyncio.sleep(0.02)
        await batch.execute(touch, other)
        await batch.execute("COMMIT")
        await rounds
    finally:
        await batch.close()
        await admin.close()
    assert await _fees(app) == {other: fee_of[other], held: None}
    # the held one asked again by the next round, which wrote nothing: the rounds stopped
    assert len(stripe_fake.requests_to("GET", BALANCE_TRANSACTIONS)) == 3
    await processor.drain()
    assert await _fees(app) == fee_of
    assert len(stripe_fake.requests_to("GET", BALANCE_TRANSACTIONS)) == 4
