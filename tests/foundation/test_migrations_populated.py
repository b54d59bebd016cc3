"""Migrations on a database the service has filled: `downgrade base` and `upgrade head` run on
the rows real use leaves (a refund retried after Stripe reported it failed, a whole Stripe
lifecycle), not only on empty tables. This module runs the app on a database of its own, so
the downgrade leaves the session's database alone."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import Deliver, TokenFactory, alembic, create_database, drop_database, plain_dsn
from tests.refunds.test_retry_and_close import failed_top_up_refund, retry
from tests.stripe_fake import StripeFake
from tests.webhooks.lifecycle import run_lifecycle


@pytest.fixture(scope="module")
async def database_url() -> AsyncIterator[str]:
    name = f"billing_test_populated_{os.getpid()}_{secrets.token_hex(3)}"
    url = await create_database(name)
    upgraded = alembic(url, "upgrade", "head")
    assert upgraded.returncode == 0, upgraded.stderr
    yield url
    await drop_database(name)


async def test_downgrade_base_and_upgrade_head_on_a_database_the_service_filled(
    database_url: str,
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    request_id, _ = await failed_top_up_refund(
        app, client, stripe_fake, deliver, token, "acc_migrate"
    )
    again = await retry(client, token, request_id)
    assert again.status_code == 201, again.text
    lifecycle = await run_lifecycle(app, stripe_fake)
    await deliver(lifecycle.events)

    conn = await asyncpg.connect(plain_dsn(database_url))
    try:
        attempts = await conn.fetchval(
            "SELECT count(*) FROM refund_executions WHERE request_id = $1::uuid", request_id
        )
        events = await conn.fetchval("SELECT count(*) FROM stripe_events")
    finally:
        await conn.close()
    assert attempts == 2 and events > 10

    downgraded = alembic(database_url, "downgrade", "base")
    assert downgraded.returncode == 0, downgraded.stderr
    upgraded = alembic(database_url, "upgrade", "head")
    assert upgraded.returncode == 0, upgraded.stderr
