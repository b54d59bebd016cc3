"""A realistic lifecycle ends in Stripe's state in order, in any order, with duplicates and
concurrently (a property-based test)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from app.config import Settings
from app.webhooks.processor import EventProcessor
from tests.conftest import WEBHOOK_SECRET, Deliver
from tests.stripe_fake import StripeFake
from tests.webhooks.lifecycle import ACCOUNT, CHANNEL, Baseline, run_lifecycle, snapshot


async def test_lifecycle_in_order_ends_in_stripes_state(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver
) -> None:
    life = await run_lifecycle(app, stripe_fake)
    await deliver(life.events)
    state = await snapshot(app)

    stripe_sub = stripe_fake.get("subscription", life.subscription_id)
    status, cancel_at_period_end = state["subscriptions"][life.subscription_id][3:5]
    assert status == stripe_sub["status"] == "canceled"
    assert cancel_at_period_end is False
    assert state["access"][CHANNEL].has_access is False

    top_up = state["payments"][life.top_up_payment_intent]
    assert top_up[:2] == (ACCOUNT, "top_up")
    assert top_up[5:11] == (5000, "usd", "succeeded", 175, 1000, False)
    subscription_payments = [p for p in state["payments"].values() if p[1] == "subscription"]
    assert len(subscription_payments) == 2  # first invoice and the renewal
    first = next(p for p in subscription_payments if p[4] == life.subscription_charge)
    assert first[0] == ACCOUNT
    assert first[8] == 143  # Stripe's fee, settled late on charge.updated
    assert first[10] is True  # disputed
    assert all(p[3] == life.subscription_id for p in subscription_payments)
    assert {i[2] for i in state["invoices"].values()} == {"paid"}

    assert state["refunds"] == {life.refund_id: (life.top_up_payment_intent, 1000, "succeeded")}
    dispute = state["disputes"][life.dispute_id]
    assert dispute[:2] == (ACCOUNT, "lost")
    assert dispute[3] == stripe_fake.get("dispute", life.dispute_id)["amount"]

    assert state["ledger"] == sorted(
        [
            (ACCOUNT, "top_up", life.top_up_session, 5000, "usd"),
            (ACCOUNT, "refund", life.refund_id, -1000, "usd"),  # the partial top-up refund
        ]
    )
    customer, currency, first_paid_at = state["accounts"][ACCOUNT]
    assert customer == stripe_sub["customer"]
    assert currency == "usd"
    assert first_paid_at is not None
    assert all(fulfilled for _, _, fulfilled, _ in state["checkout"].values())


def shuffled_with_duplicates(
    events: list[dict[str, Any]], seed: int, duplicates: int
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    stream = events + [rng.choice(events) for _ in range(duplicates)]
    rng.shuffle(stream)
    return stream


async def deliver_stream(
    client: httpx.AsyncClient, fake: StripeFake, stream: list[dict[str, Any]], *, concurrent: bool
) -> None:
    async def post(event: dict[str, Any]) -> None:
        body, headers = fake.signed_event(event, WEBHOOK_SECRET)
        response = await client.post("/webhooks/stripe", content=body, headers=headers)
        assert response.status_code == 200, response.text

    if concurrent:
        await asyncio.gather(*(post(e) for e in stream))
    else:
        for event in stream:
            await post(event)


@settings(
    max_examples=30,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    duplicates=st.integers(min_value=0, max_value=15),
    concurrent=st.booleans(),
    apply_every=st.integers(min_value=1, max_value=40),
)
async def test_any_order_with_duplicates_and_concurrency_converges(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    settings: Settings,
    database_url: str,
    seed: int,
    duplicates: int,
    concurrent: bool,
    apply_every: int,
) -> None:
    """Two replicas' processors apply a shuffled, duplicated stream (delivered one by one or
    all at once, applied as it arrives): the result equals the in-order result."""
    baseline = getattr(test_any_order_with_duplicates_and_concurrency_converges, "baseline", None)
    if baseline is None:
        life = await run_lifecycle(app, stripe_fake)
        saved = Baseline(database_url)
        await saved.capture()
        await deliver_stream(client, stripe_fake, life.events, concurrent=False)
        await app.state.event_processor.drain()
        baseline = (life, saved, await snapshot(app))
        test_any_order_with_duplicates_and_concurrency_converges.baseline = baseline  # type: ignore[attr-defined]
    life, saved, expected = baseline
    await saved.restore()
    replicas = [
        EventProcessor(app.state.session_factory, settings, app.state.stripe, batch_size=batch)
        for batch in (3, 7)
    ]
    stream = shuffled_with_duplicates(life.events, seed, duplicates)
    for start in range(0, len(stream), apply_every):
        await deliver_stream(
            client, stripe_fake, stream[start : start + apply_every], concurrent=concurrent
        )
        await asyncio.gather(*(replica.process_due() for replica in replicas))
    await asyncio.gather(*(replica.drain() for replica in replicas))
    actual = await snapshot(app)
    assert actual == expected, differences(actual, expected)


def differences(actual: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    found = []
    for section, rows in expected.items():
        if isinstance(rows, dict):
            for key in set(rows) | set(actual[section]):
                if rows.get(key) != actual[section].get(key):
                    found.append(f"{section}[{key}]: {actual[section].get(key)} != {rows.get(key)}")
        elif rows != actual[section]:
            found.append(f"{section}: {actual[section]} != {rows}")
    return found
