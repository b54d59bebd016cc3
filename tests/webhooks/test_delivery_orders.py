"""Realistic lifecycles, delivered in any order, with duplicates, redeliveries after
processing and operator replays, applied by several replicas, end where in-order delivery
ends (a property-based test).

The lifecycles (`run_lifecycles`, three accounts) cover what changes subscription state,
access and the balance: subscription checkouts (one paid by a delayed method), renewals paid,
declined then paid, and declined; portal changes (cancel at period end, resume, plan change);
a channel subscribed again after its subscription ended; a Dashboard refund of a subscription
payment; a top-up with a partial refund and a refund that failed at the bank; a chargeback won
on a top-up and one lost on a subscription payment; a debt repayment; top-ups paid late,
failed late, declined then paid, abandoned. Steps are ten minutes apart, as at Stripe; the
events of one step share their second, so the same-second re-fetch is exercised too.

Each example also loses some events whose object has later events (those say it all: an
event for an object whose earlier events never arrive), delivers each chunk while the replicas
apply the ones before (events arriving while their object's earlier ones are being applied),
marks some events as recovered from the Events API in another API version
(re-fetched from Stripe), and makes Stripe fail some of those re-fetches (the events fail
their batch, are applied alone and retried later). The comparison (`full_snapshot`) covers the
mirror, the ledger with its dates, dispute effects, revocations, contacts, the queued emails
and each channel's last access-feed entry. `ORDERS_EXAMPLES` (default 5, ~30 s) and
`ORDERS_GAP` (seconds between steps, default 600; 0 puts every event in one second) let a
longer run search further: `ORDERS_EXAMPLES=100 pytest tests/webhooks/test_delivery_orders.py`.
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import asyncpg
import httpx
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from app.config import Settings
from app.models import (
    AccessChange,
    Account,
    Dispute,
    DisputeEffect,
    LedgerEntry,
    OutboxEmail,
    Refund,
    Subscription,
)
from app.webhooks.processor import EventProcessor
from tests.conftest import bearer, plain_dsn
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import add_catalog, open_checkout
from tests.webhooks.lifecycle import MIRROR_TABLES, snapshot
from tests.webhooks.test_lifecycle import deliver_stream
from tests.webhooks.test_processing import make_due

OLD_API_VERSION = "2024-06-20"
YEARLY_PRICE_ID = "price_channel_yearly_usd"
ACC_A, CHAN_A = "acc_orders_a", "chan_orders_a"
ACC_B, CHAN_B = "acc_orders_b", "chan_orders_b"
ACC_C, CHAN_C = "acc_orders_c", "chan_orders_c"


def _tick(fake: StripeFake) -> None:
    fake.set_time(fake.now() + int(os.environ.get("ORDERS_GAP", "600")))


def _charge_of(fake: StripeFake, payment_intent: str) -> str:
    return str(fake.get("payment_intent", payment_intent)["latest_charge"])


def _invoice_charge(fake: StripeFake, invoice_id: str) -> str:
    payment = next(p for p in fake.all("invoice_payment") if p["invoice"] == invoice_id)
    return _charge_of(fake, str(payment["payment"]["payment_intent"]))


async def run_lifecycles(
    app: FastAPI, client: httpx.AsyncClient, fake: StripeFake, usage_token: str
) -> list[dict[str, Any]]:
    """Two accounts' lives at Stripe; returns their events in Stripe's order."""
    add_catalog(fake)
    fake.add_price(id=YEARLY_PRICE_ID, unit_amount=39000, currency="usd", interval="year")
    fake.set_time(fake.now())
    # account B used conversations before paying: a debt it repays
    usage = await client.post(
        f"/v1/accounts/{ACC_B}/usage-charges",
        json={
            "id": "conv-debt",
            "amount": 2500,
            "currency": "usd",
            "kind": "conversation",
            "occurred_at": "2026-11-01T10:00:00Z",
        },
        headers=bearer(usage_token),
    )
    assert usage.status_code == 201, usage.text
    sub_a = await open_checkout(app, account_id=ACC_A, purpose="subscription", channel_id=CHAN_A)
    top_up_a = await open_checkout(app, account_id=ACC_A, purpose="top_up", amount=5000)
    repay_b = await open_checkout(app, account_id=ACC_B, purpose="debt_repayment", amount=2500)
    sub_b = await open_checkout(app, account_id=ACC_B, purpose="subscription", channel_id=CHAN_B)
    again_a = await open_checkout(app, account_id=ACC_A, purpose="subscription", channel_id=CHAN_A)
    sub_c = await open_checkout(app, account_id=ACC_C, purpose="subscription", channel_id=CHAN_C)
    delayed_c = await open_checkout(app, account_id=ACC_C, purpose="top_up", amount=3000)
    failing_c = await open_checkout(app, account_id=ACC_C, purpose="top_up", amount=4000)
    declined_c = await open_checkout(app, account_id=ACC_C, purpose="top_up", amount=6000)
    abandoned_c = await open_checkout(app, account_id=ACC_C, purpose="top_up", amount=7000)
    start = len(fake.events)

    # A: subscribes, its fee settles, cancels and resumes in the portal, changes plan
    fake.complete_checkout(sub_a)
    subscription_a = str(fake.get("checkout.session", sub_a)["subscription"])
    first_invoice_a = str(fake.get("subscription", subscription_a)["latest_invoice"])
    first_charge_a = _invoice_charge(fake, first_invoice_a)
    _tick(fake)
    fake.settle_charge(first_charge_a, fee=143)
    _tick(fake)
    fake.update_subscription(subscription_a, cancel_at_period_end=True)
    _tick(fake)
    fake.update_subscription(subscription_a, cancel_at_period_end=False)
    _tick(fake)
    item_a = fake.get("subscription", subscription_a)["items"]["data"][0]["id"]
    fake.update_subscription(subscription_a, items=[{"id": item_a, "price": YEARLY_PRICE_ID}])
    _tick(fake)
    # A: a top-up, a partial refund, a refund that fails at the bank, a chargeback won
    fake.complete_checkout(top_up_a)
    top_up_pi = str(fake.get("checkout.session", top_up_a)["payment_intent"])
    top_up_charge = _charge_of(fake, top_up_pi)
    _tick(fake)
    fake.settle_charge(top_up_charge, fee=175)
    _tick(fake)
    fake.create_refund({"payment_intent": top_up_pi, "amount": 1000})
    _tick(fake)
    failing = fake.create_refund({"payment_intent": top_up_pi, "amount": 500})
    _tick(fake)
    fake.fail_refund(str(failing["id"]))
    _tick(fake)
    won = fake.create_dispute(top_up_charge, amount=2000)[0]["data"]["object"]["id"]
    fake.withdraw_dispute_funds(won)
    _tick(fake)
    fake.close_dispute(won, won=True)
    _tick(fake)
    # A: a renewal paid, one declined and paid later, a chargeback lost, the end
    fake.renew_subscription(subscription_a, paid=True)
    _tick(fake)
    fake.renew_subscription(subscription_a, paid=False)
    _tick(fake)
    open_invoice = str(fake.get("subscription", subscription_a)["latest_invoice"])
    fake.pay_invoice(open_invoice)
    _tick(fake)
    lost = fake.create_dispute(first_charge_a)[0]["data"]["object"]["id"]
    fake.withdraw_dispute_funds(lost)
    _tick(fake)
    fake.close_dispute(lost, won=False)
    _tick(fake)
    fake.delete_subscription(subscription_a)  # as our dispute cancellation asks
    _tick(fake)
    fake.complete_checkout(again_a)  # A subscribes its channel again
    _tick(fake)

    # B: repays its debt, subscribes, is refunded from the Dashboard, cancels at period end
    fake.complete_checkout(repay_b)
    _tick(fake)
    fake.complete_checkout(sub_b)
    subscription_b = str(fake.get("checkout.session", sub_b)["subscription"])
    invoice_b = str(fake.get("subscription", subscription_b)["latest_invoice"])
    charge_b = _invoice_charge(fake, invoice_b)
    _tick(fake)
    fake.settle_charge(charge_b, fee=143)
    _tick(fake)
    fake.create_refund({"charge": charge_b})
    _tick(fake)
    fake.update_subscription(subscription_b, cancel_at_period_end=True)
    _tick(fake)

    # C: pays by a delayed method, later renewal declined (still past_due); top-ups paid late,
    # failed late, declined then paid, abandoned
    fake.complete_checkout(sub_c, payment_status="unpaid")
    _tick(fake)
    fake.async_payment_succeeded(sub_c)
    subscription_c = str(fake.get("checkout.session", sub_c)["subscription"])
    _tick(fake)
    fake.complete_checkout(delayed_c, payment_status="unpaid")
    _tick(fake)
    fake.async_payment_succeeded(delayed_c)
    _tick(fake)
    fake.complete_checkout(failing_c, payment_status="unpaid")
    _tick(fake)
    fake.async_payment_failed(failing_c)
    _tick(fake)
    fake.decline_checkout(declined_c)
    _tick(fake)
    fake.complete_checkout(declined_c)
    _tick(fake)
    fake.expire_checkout(abandoned_c)
    _tick(fake)
    fake.renew_subscription(subscription_c, paid=False)
    _tick(fake)
    return [dict(e) for e in fake.events[start:]]


async def full_snapshot(app: FastAPI) -> dict[str, Any]:
    """`snapshot` plus what it does not show: the ledger's dates, revocations, dispute rows
    and effects, refunds' Stripe facts, contacts, the emails queued, and each channel's last
    access-feed entry (the check's answer a follower ends with)."""
    state = await snapshot(app)
    state["ledger"] = _without_undone_refunds(state["ledger"])
    async with app.state.session_factory() as session:
        subscriptions = (await session.scalars(select(Subscription))).all()
        state["revoked"] = {
            s.stripe_id: (s.access_revoked_at, s.trial_end, s.extension_days_in_period)
            for s in subscriptions
        }
        state["contacts"] = {a.id: a.email for a in (await session.scalars(select(Account))).all()}
        state["dated"] = sorted(
            (e.kind, e.source_id, e.amount, e.occurred_at)
            for e in (await session.scalars(select(LedgerEntry))).all()
            if (e.kind, e.source_id, e.amount)
            in {(k, src, amt) for _, k, src, amt, _ in state["ledger"]}
        )
        state["closed"] = {
            d.stripe_id: (d.closed_at, d.stripe_created, d.access_ended)
            for d in (await session.scalars(select(Dispute))).all()
        }
        state["refund_rows"] = {
            r.stripe_id: (r.stripe_created, r.stripe_charge_id, r.reason)
            for r in (await session.scalars(select(Refund))).all()
        }
        state["dispute_effects"] = sorted(
            (str(e.kind), e.amount, e.currency)
            for e in (await session.scalars(select(DisputeEffect))).all()
        )
        state["emails"] = sorted(
            e.dedupe_key.split(":")[0] for e in (await session.scalars(select(OutboxEmail))).all()
        )
        feed = (await session.scalars(select(AccessChange).order_by(AccessChange.id))).all()
        last: dict[str, tuple[Any, ...]] = {}
        for entry in feed:
            last[entry.channel_id] = (entry.has_access, entry.access_until, entry.reason)
        state["feed"] = last
    return state


def _without_undone_refunds(ledger: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The ledger less each refund debit its reversal undid: a refund Stripe reports failed
    before the event saying it succeeded never debits (the two entries cancel out in order)."""
    reversed_ = {
        (a, source, -amount) for a, kind, source, amount, _ in ledger if kind == "refund_reversal"
    }
    return [
        entry
        for entry in ledger
        if not (entry[1] == "refund" and (entry[0], entry[2], entry[3]) in reversed_)
        and not (
            entry[1] == "refund_reversal"
            and (entry[0], entry[2], -entry[3])
            in {(a, source, amount) for a, kind, source, amount, _ in ledger if kind == "refund"}
        )
    ]


class Baseline:
    """The rows before any event (accounts, our checkouts, the usage charge), restorable."""

    TABLES = ("accounts", "channels", "checkout_sessions", "ledger_entries")

    def __init__(self, database_url: str) -> None:
        self.dsn = plain_dsn(database_url)
        self.rows: dict[str, list[asyncpg.Record]] = {}

    async def capture(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            for table in self.TABLES:
                self.rows[table] = await conn.fetch(f"SELECT * FROM {table}")
        finally:
            await conn.close()

    async def restore(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            async with conn.transaction():
                tables = ", ".join(
                    [*MIRROR_TABLES, "dispute_effects", "outbox_emails", *self.TABLES]
                )
                await conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
                for table in self.TABLES:
                    rows = self.rows[table]
                    if rows:
                        await conn.copy_records_to_table(
                            table, records=[tuple(r) for r in rows], columns=list(rows[0].keys())
                        )
                # identities go on after the restored rows
                await conn.execute(
                    "SELECT setval(pg_get_serial_sequence('ledger_entries', 'id'),"
                    " coalesce((SELECT max(id) FROM ledger_entries), 0) + 1, false)"
                )
        finally:
            await conn.close()


async def replay(client: httpx.AsyncClient, ops: dict[str, str], stripe_ids: list[str]) -> None:
    """An operator replays these (already processed) events."""
    for stripe_id in stripe_ids:
        response = await client.post(f"/v1/ops/stripe-events/{stripe_id}/replay", headers=ops)
        assert response.status_code == 200, response.text


@settings(
    max_examples=int(os.environ.get("ORDERS_EXAMPLES", "5")),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    duplicates=st.integers(min_value=0, max_value=20),
    redelivered=st.integers(min_value=0, max_value=10),
    replayed=st.integers(min_value=0, max_value=6),
    concurrent=st.booleans(),
    apply_every=st.integers(min_value=1, max_value=60),
    batches=st.lists(
        st.one_of(st.integers(min_value=1, max_value=12), st.just(1000)), min_size=1, max_size=4
    ),
    stripe_failures=st.integers(min_value=0, max_value=3),
    recovered=st.floats(min_value=0, max_value=1),
    lost=st.floats(min_value=0, max_value=1),
)
async def test_lifecycles_in_any_order_with_redeliveries_and_replays_converge(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    settings: Settings,
    database_url: str,
    token: Any,
    seed: int,
    duplicates: int,
    redelivered: int,
    replayed: int,
    concurrent: bool,
    apply_every: int,
    batches: list[int],
    stripe_failures: int,
    recovered: float,
    lost: float,
) -> None:
    """Shuffled, duplicated, applied as it arrives by one to four replicas; then some events
    delivered again after they were applied, and some replayed by an operator: the state
    equals the in-order one."""
    test = test_lifecycles_in_any_order_with_redeliveries_and_replays_converge
    baseline = getattr(test, "baseline", None)
    ops = bearer(token(scope="ops"))
    if baseline is None:
        events = await run_lifecycles(
            app, client, stripe_fake, token(scope="usage:write", sub="conversations")
        )
        saved = Baseline(database_url)
        await saved.capture()
        await deliver_stream(client, stripe_fake, events, concurrent=False)
        # in order, one event per transaction
        await EventProcessor(
            app.state.session_factory, settings, app.state.stripe, batch_size=1
        ).drain()
        baseline = (events, saved, await full_snapshot(app))
        test.baseline = baseline  # type: ignore[attr-defined]
    events, saved, expected = baseline
    await saved.restore()
    rng = random.Random(seed)
    replicas = [
        EventProcessor(app.state.session_factory, settings, app.state.stripe, batch_size=batch)
        for batch in batches
    ]
    # an event whose object has later events may never arrive: the later ones say it all
    last_of = {str(e["data"]["object"]["id"]): e["id"] for e in events}
    arriving = [
        e for e in events if e["id"] == last_of[e["data"]["object"]["id"]] or rng.random() >= lost
    ]
    stream = arriving + [rng.choice(arriving) for _ in range(duplicates)]
    rng.shuffle(stream)
    # some were missed and recovered from the Events API, in the account's default version
    stream = [
        {**event, "api_version": OLD_API_VERSION} if rng.random() < recovered else event
        for event in stream
    ]
    # Stripe fails the re-fetches of subscriptions and invoices now and then: those events
    # fail their batch, are applied alone, and retried later (after everything else)
    stripe_fake.fail_next(stripe_failures, status=500, path_prefix="/v1/subscriptions")
    stripe_fake.fail_next(stripe_failures, status=500, path_prefix="/v1/invoices")
    for start in range(0, len(stream), apply_every):
        # the replicas apply what came before while these arrive
        await asyncio.gather(
            deliver_stream(
                client, stripe_fake, stream[start : start + apply_every], concurrent=concurrent
            ),
            *(replica.process_due() for replica in replicas),
        )
    await asyncio.gather(*(replica.drain() for replica in replicas))
    stripe_fake.clear_failures()
    await make_due(database_url)
    await asyncio.gather(*(replica.drain() for replica in replicas))
    again = rng.sample(arriving, min(redelivered, len(arriving)))
    await deliver_stream(client, stripe_fake, again, concurrent=concurrent)
    await replay(
        client, ops, [str(e["id"]) for e in rng.sample(arriving, min(replayed, len(arriving)))]
    )
    await asyncio.gather(*(replica.drain() for replica in replicas))
    actual = await full_snapshot(app)
    assert actual == expected, differences(actual, expected)


def differences(actual: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What differs, row by row (a list section: the rows missing and the rows extra)."""
    found = []
    for section, rows in expected.items():
        if isinstance(rows, dict):
            for key in set(rows) | set(actual[section]):
                if rows.get(key) != actual[section].get(key):
                    found.append(f"{section}[{key}]: {actual[section].get(key)} != {rows.get(key)}")
        elif rows != actual[section]:
            missing = [row for row in rows if row not in actual[section]]
            extra = [row for row in actual[section] if row not in rows]
            found.append(f"{section}: missing {missing}, extra {extra}")
    return found
