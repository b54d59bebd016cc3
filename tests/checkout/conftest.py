"""Fixtures for checkout, portal and access tests: catalog prices at the Stripe fake and helpers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.conftest import bearer
from tests.stripe_fake import StripeFake

APP_URL = "https://app.1msg.io"


@pytest.fixture(autouse=True)
def catalog(stripe_fake: StripeFake, settings: Any) -> None:
    """The default catalog's prices exist at the fake (settings resets the fake first)."""
    stripe_fake.add_price(
        id="price_channel_monthly_usd", unit_amount=3900, currency="usd", interval="month"
    )
    stripe_fake.add_price(
        id="price_channel_yearly_usd", unit_amount=39000, currency="usd", interval="year"
    )


@pytest.fixture
def db(app: FastAPI) -> async_sessionmaker[AsyncSession]:
    factory: async_sessionmaker[AsyncSession] = app.state.session_factory
    return factory


def subscription_body(channel_id: str = "ch_1", plan: str = "channel_monthly") -> dict[str, Any]:
    return {
        "purpose": "subscription",
        "plan": plan,
        "channel_id": channel_id,
        "success_url": f"{APP_URL}/billing/done",
        "cancel_url": f"{APP_URL}/billing",
    }


def top_up_body(amount: int = 5000, currency: str = "usd") -> dict[str, Any]:
    return {
        "purpose": "top_up",
        "amount": amount,
        "currency": currency,
        "success_url": f"{APP_URL}/balance/done",
        "cancel_url": f"{APP_URL}/balance",
    }


PostCheckout = Callable[..., Awaitable[httpx.Response]]


@pytest.fixture
def post_checkout(client: httpx.AsyncClient, token: Any) -> PostCheckout:
    async def post(
        account_id: str, body: dict[str, Any], *, key: str | None = None, tok: str | None = None
    ) -> httpx.Response:
        headers = bearer(tok or token(account_id=account_id, email=f"{account_id}@example.com"))
        if key is not None:
            headers["Idempotency-Key"] = key
        return await client.post(
            f"/v1/accounts/{account_id}/checkout-sessions", json=body, headers=headers
        )

    return post


async def charge_usage(
    client: httpx.AsyncClient,
    token: Any,
    account: str,
    amount: int,
    currency: str,
    *,
    usage_id: str | None = None,
) -> None:
    """A conversation charged to `account`'s balance (a debt once it is spent), as the usage
    service posts it; `usage_id` (default: by currency and amount) keeps two charges apart."""
    response = await client.post(
        f"/v1/accounts/{account}/usage-charges",
        json={
            "id": usage_id or f"usage-{currency}-{amount}",
            "amount": amount,
            "currency": currency,
            "kind": "conversation",
            "occurred_at": "2026-11-01T10:00:00Z",
        },
        headers=bearer(token(scope="usage:write")),
    )
    assert response.status_code == 201, response.text
