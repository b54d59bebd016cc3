"""The processor's writes of many rows are one statement each (`ArrayInsert`, `ArrayUpdate`,
`FULFIL_SUBSCRIPTION_CHECKOUTS`): rows named twice in one batch end as one statement per row,
in order, left them."""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI

from app.db import session_driver
from app.webhooks.handlers import fulfil_subscription_checkouts
from tests.conftest import Deliver
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import open_checkout

FULFIL_ROW_BY_ROW = (  # the statement run once per (subscription, checkout) pair before
    "UPDATE checkout_sessions SET stripe_subscription_id = $1::VARCHAR,"
    " fulfilled_at = $2::TIMESTAMP WITH TIME ZONE, updated_at = now()"
    " WHERE (checkout_sessions.stripe_subscription_id = $1::VARCHAR"
    " OR checkout_sessions.id = $3::UUID) AND checkout_sessions.fulfilled_at IS NULL"
)


async def test_checkouts_are_fulfilled_as_one_update_per_pair_in_order_would(
    app: FastAPI,
) -> None:
    """A checkout matched by several pairs takes the first pair's subscription; a fulfilled
    or unnamed checkout is left alone."""
    now = datetime(2026, 3, 1, tzinfo=UTC)
    earlier = datetime(2026, 2, 1, tzinfo=UTC)
    ids = {name: uuid.uuid4() for name in "ABCDEF"}
    stored = {  # checkout -> (its subscription, fulfilled at)
        "A": ("sub_1", None),
        "B": (None, None),
        "C": ("sub_3", None),
        "D": ("sub_1", earlier),
        "E": ("sub_9", None),
        "F": ("sub_5", None),
    }
    pairs: list[tuple[str, uuid.UUID | None]] = [
        ("sub_1", None),
        ("sub_2", ids["B"]),
        ("sub_4", ids["C"]),  # C by its id, then by its subscription: sub_4 first
        ("sub_3", None),
        ("sub_5", None),
        ("sub_6", ids["F"]),  # F by its subscription first: keeps sub_5
    ]
    names = {checkout_id: name for name, checkout_id in ids.items()}
    async with app.state.session_factory() as session, session.begin():
        driver = await session_driver(session)
        await driver.execute("INSERT INTO accounts (id) VALUES ('acc_fulfil')")
        await driver.executemany(
            "INSERT INTO checkout_sessions (id, account_id, purpose, currency, status,"
            " success_url, cancel_url, stripe_subscription_id, fulfilled_at)"
            " VALUES ($1, 'acc_fulfil', 'subscription', 'usd', 'complete', 'u', 'u', $2, $3)",
            [(ids[name], sub, at) for name, (sub, at) in stored.items()],
        )

        async def checkouts() -> dict[str, tuple[Any, ...]]:
            found = await driver.fetch(
                "SELECT id, stripe_subscription_id, fulfilled_at FROM checkout_sessions"
            )
            return {names[row["id"]]: (row[1], row[2]) for row in found}

        await driver.execute("SAVEPOINT before")
        await driver.executemany(
            FULFIL_ROW_BY_ROW, [(sub, now, checkout) for sub, checkout in pairs]
        )
        row_by_row = await checkouts()
        await driver.execute("ROLLBACK TO SAVEPOINT before")
        await fulfil_subscription_checkouts(session, now, pairs)
        assert await checkouts() == row_by_row
        assert row_by_row == {
            "A": ("sub_1", now),
            "B": ("sub_2", now),
            "C": ("sub_4", now),
            "D": ("sub_1", earlier),
            "E": ("sub_9", None),
            "F": ("sub_5", now),
        }
        await session.rollback()


async def test_a_batch_crediting_one_top_up_twice_credits_it_once(
    app: FastAPI, stripe_fake: StripeFake, deliver: Deliver
) -> None:
    """Two events paying one top-up in one batch name its ledger entry twice: one entry."""
    session_id = await open_checkout(app, account_id="acc_twice", purpose="top_up", amount=7500)
    events = stripe_fake.complete_checkout(session_id)
    [completed] = [event for event in events if event["type"] == "checkout.session.completed"]
    again = copy.deepcopy(completed)
    again["id"] = f"{completed['id']}_async"
    again["type"] = "checkout.session.async_payment_succeeded"
    await deliver([*events, again], process=False)
    await app.state.event_processor.drain()  # one batch
    async with app.state.session_factory() as session:
        driver = await session_driver(session)
        entries = await driver.fetch(
            "SELECT kind, source_id, amount FROM ledger_entries WHERE account_id = 'acc_twice'"
        )
        statuses = await driver.fetch("SELECT DISTINCT status FROM stripe_events")
    assert [tuple(entry) for entry in entries] == [("top_up", session_id, 7500)]
    assert [row["status"] for row in statuses] == ["processed"]
