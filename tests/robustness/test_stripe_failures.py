"""Stripe failing under the routes that create something at Stripe.

500s, 429 with `Retry-After`, timeouts and refused connections are retried with the same
idempotency key, then answer 502 `stripe_unavailable` within a bounded time.

"Nothing half-made" for the pending-row pattern means:
- the local row committed before the Stripe call may remain, as `failed` (or `pending` if even
  marking it failed was impossible), but it is never shown as a session: it has no Stripe id or
  URL, reading it is 404, and it neither blocks nor is returned to a later request (a retry
  with the same `Idempotency-Key` and body reuses it, with its Stripe key: see
  tests/checkout/test_checkout_retries.py);
- no idempotency record keeps the failure: a retry with the same `Idempotency-Key` runs again;
- a retry after Stripe recovers creates exactly one usable session, and the account still has
  exactly one Stripe customer.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from app.config import Settings
from app.main import create_app
from app.models import Account, CheckoutSession, IdempotencyRecord, PortalSession
from tests.checkout.conftest import APP_URL, PostCheckout, subscription_body, top_up_body
from tests.conftest import TokenFactory, bearer, make_settings
from tests.stripe_fake import StripeFake

CHECKOUT_PATH = "/v1/checkout/sessions"


def failure_bound(settings: Settings) -> float:
    """The most a request may take while Stripe fails: every SDK attempt timing out, plus the
    SDK's backoff and our own bounded waits on 429 (generous, so it proves boundedness)."""
    attempts = settings.stripe_max_network_retries + 1
    return attempts * (settings.stripe_timeout_seconds + 2.0) + 3 * 5.0 + 5.0


async def local_rows(app: FastAPI, account_id: str) -> list[CheckoutSession]:
    async with app.state.session_factory() as session:
        return list(
            (
                await session.scalars(
                    select(CheckoutSession).where(CheckoutSession.account_id == account_id)
                )
            ).all()
        )


async def assert_nothing_half_made(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory, account_id: str
) -> None:
    rows = await local_rows(app, account_id)
    for row in rows:
        assert row.status in ("failed", "pending"), row.status
        assert row.stripe_id is None and row.url is None
        response = await client.get(
            f"/v1/accounts/{account_id}/checkout-sessions/{row.id}",
            headers=bearer(token(account_id=account_id)),
        )
        assert response.status_code == 404, response.text
    async with app.state.session_factory() as session:
        kept = (await session.scalars(select(IdempotencyRecord))).all()
        assert [r for r in kept if r.response_status is not None] == []


def assert_stripe_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 502, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "stripe_unavailable"


def assert_one_key(fake: StripeFake, path: str = CHECKOUT_PATH, at_least: int = 2) -> str:
    attempts = fake.requests_to("POST", path)
    assert len(attempts) >= at_least, [a.status for a in attempts]
    keys = {a.idempotency_key for a in attempts}
    assert len(keys) == 1, keys
    key = keys.pop()
    assert key is not None and key.startswith("billing:")
    return key


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param({"status": 500}, id="500"),
        pytest.param({"status": 503}, id="503"),
        pytest.param({"status": 429, "retry_after": 1}, id="429-retry-after"),
    ],
)
async def test_stripe_errors_are_retried_with_one_key_then_502_with_nothing_half_made(
    failure: dict[str, Any],
    app: FastAPI,
    client: httpx.AsyncClient,
    post_checkout: PostCheckout,
    stripe_fake: StripeFake,
    settings: Settings,
    token: TokenFactory,
) -> None:
    stripe_fake.fail_next(50, path_prefix=CHECKOUT_PATH, method="POST", **failure)
    started = time.monotonic()
    response = await post_checkout("acc_f", subscription_body("ch_f"), key="client-key-1")
    elapsed = time.monotonic() - started
    assert_stripe_unavailable(response)
    assert elapsed < failure_bound(settings)
    key = assert_one_key(stripe_fake)
    [row] = await local_rows(app, "acc_f")
    assert key == f"billing:checkout:{row.id}"
    assert stripe_fake.all("checkout.session") == []
    await assert_nothing_half_made(app, client, token, "acc_f")

    # Stripe recovers: the same client key runs again and gives one usable session.
    stripe_fake.clear_failures()
    retry = await post_checkout("acc_f", subscription_body("ch_f"), key="client-key-1")
    assert retry.status_code == 201, retry.text
    assert len(stripe_fake.all("checkout.session")) == 1
    assert len(stripe_fake.all("customer")) == 1
    live = [r for r in await local_rows(app, "acc_f") if r.status == "open"]
    assert [str(r.id) for r in live] == [retry.json()["id"]]


async def test_stripe_timeouts_are_retried_with_one_key_then_502_within_a_bound(
    app: FastAPI,
    client: httpx.AsyncClient,
    post_checkout: PostCheckout,
    stripe_fake: StripeFake,
    settings: Settings,
    token: TokenFactory,
) -> None:
    attempts = settings.stripe_max_network_retries + 1
    stripe_fake.fail_next(
        attempts,
        kind="timeout",
        delay=settings.stripe_timeout_seconds + 1.5,
        path_prefix=CHECKOUT_PATH,
        method="POST",
    )
    started = time.monotonic()
    response = await post_checkout("acc_t", top_up_body())
    elapsed = time.monotonic() - started
    assert_stripe_unavailable(response)
    assert elapsed < failure_bound(settings)
    assert_one_key(stripe_fake, at_least=attempts)
    # Stripe may have created the session after we gave up; we never show it to anyone.
    await assert_nothing_half_made(app, client, token, "acc_t")


async def test_a_failing_customer_creation_leaves_no_customer_id_and_a_retry_makes_one(
    app: FastAPI,
    client: httpx.AsyncClient,
    post_checkout: PostCheckout,
    stripe_fake: StripeFake,
    token: TokenFactory,
) -> None:
    stripe_fake.fail_next(50, status=500, path_prefix="/v1/customers", method="POST")
    response = await post_checkout("acc_c", top_up_body())
    assert_stripe_unavailable(response)
    assert_one_key(stripe_fake, "/v1/customers")
    assert stripe_fake.requests_to("POST", CHECKOUT_PATH) == []
    async with app.state.session_factory() as session:
        # the customer is made in the checkout's first transaction: its failure rolls that
        # back whole (a new account row with it)
        account = await session.get(Account, "acc_c")
        assert account is None or account.stripe_customer_id is None
        assert (await session.scalars(select(CheckoutSession))).all() == []
    await assert_nothing_half_made(app, client, token, "acc_c")
    stripe_fake.clear_failures()
    retry = await post_checkout("acc_c", top_up_body())
    assert retry.status_code == 201, retry.text
    assert len(stripe_fake.all("customer")) == 1


@pytest.fixture
async def refusing_app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The app with its Stripe base pointed at a port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # the socket is closed: connections to the port are refused
    refused = make_settings(settings.database_url, f"http://127.0.0.1:{port}")
    application = create_app(refused)
    async with application.router.lifespan_context(application):
        yield application


async def test_refused_connections_answer_502_quickly_with_nothing_half_made(
    refusing_app: FastAPI, settings: Settings, token: TokenFactory
) -> None:
    transport = httpx.ASGITransport(app=refusing_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://billing.test") as http:
        started = time.monotonic()
        response = await http.post(
            "/v1/accounts/acc_r/checkout-sessions",
            json=subscription_body("ch_r"),
            headers=bearer(token(account_id="acc_r")),
        )
        elapsed = time.monotonic() - started
        assert_stripe_unavailable(response)
        assert elapsed < failure_bound(settings)
        async with refusing_app.state.session_factory() as session:
            account = await session.get(Account, "acc_r")
            assert account is None or account.stripe_customer_id is None
        await assert_nothing_half_made(refusing_app, http, token, "acc_r")


async def test_portal_session_with_stripe_down_is_502_and_leaves_no_created_row(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    token: TokenFactory,
    settings: Settings,
) -> None:
    customer = stripe_fake.create_customer({"metadata": {"account_id": "acc_p"}})
    async with app.state.session_factory() as session, session.begin():
        session.add(
            Account(id="acc_p", stripe_customer_id=customer["id"], first_paid_at=datetime.now(UTC))
        )
    stripe_fake.fail_next(50, status=500, path_prefix="/v1/billing_portal", method="POST")
    started = time.monotonic()
    response = await client.post(
        "/v1/accounts/acc_p/portal-sessions",
        json={"return_url": f"{APP_URL}/billing"},
        headers=bearer(token(account_id="acc_p")),
    )
    assert_stripe_unavailable(response)
    assert time.monotonic() - started < failure_bound(settings)
    key = assert_one_key(stripe_fake, "/v1/billing_portal/sessions")
    async with app.state.session_factory() as session:
        rows = (await session.scalars(select(PortalSession))).all()
        assert [(r.status, r.stripe_id, r.url) for r in rows] == [("failed", None, None)]
    assert key == f"billing:portal:{rows[0].id}"
