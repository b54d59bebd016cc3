"""Test fixtures: a real Postgres database migrated with `alembic upgrade head`, the app driven
over ASGI, and the Stripe fake (a real HTTP server validating requests against Stripe's
OpenAPI description).

Isolation: each test starts from empty tables (TRUNCATE) rather than a rolled-back outer
transaction, because many tests prove behaviour under real concurrency (several connections
racing), which an outer transaction would hide.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from app.auth import mint_token
from app.config import Settings
from app.main import create_app
from app.models import Base
from app.stripe_gateway import StripeGateway
from tests.stripe_fake import StripeFake

ROOT = Path(__file__).resolve().parents[1]
ADMIN_URL = os.environ.get(
    "TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:54329/postgres"
)
JWT_SECRET = "test-jwt-secret-" + "a" * 32
WEBHOOK_SECRET = "whsec_test_" + "b" * 32
STRIPE_KEY = "sk_test_" + "c" * 32


def process_env(database_url: str, stripe_url: str, **overrides: str) -> dict[str, str]:
    """The environment of a web or `billing` process a test starts, its settings read from it
    as in production: this database, this Stripe fake, the tests' secrets, logs at WARNING;
    `overrides` by variable name."""
    return {
        **os.environ,
        "APP_ENV": "test",
        "DATABASE_URL": database_url,
        "STRIPE_API_BASE": stripe_url,
        "STRIPE_SECRET_KEY": STRIPE_KEY,
        "STRIPE_WEBHOOK_SECRETS": WEBHOOK_SECRET,
        "AUTH_JWT_SECRET": JWT_SECRET,
        "LOG_LEVEL": "WARNING",
        **overrides,
    }


async def start_web(
    env: dict[str, str], port: int, *, log: int = asyncio.subprocess.PIPE
) -> asyncio.subprocess.Process:
    """`uvicorn app.main:app` as the image runs it (`--no-access-log`) on `port` (0: any),
    in its own process with `env` (`process_env`); its output, log lines included, on its
    stdout (`log`: PIPE to read them, DEVNULL to drop them)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uvicorn",
        "app.main:app",
        "--port",
        str(port),
        "--no-access-log",
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
    )


def plain_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


def database_url_for(name: str) -> str:
    base, _, _ = ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


async def create_database(name: str) -> str:
    conn = await asyncpg.connect(plain_dsn(ADMIN_URL))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return database_url_for(name)


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(plain_dsn(ADMIN_URL))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def alembic(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url, "APP_ENV": "development"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    name = f"billing_test_{os.getpid()}_{secrets.token_hex(3)}"
    url = await create_database(name)
    result = alembic(url, "upgrade", "head")
    assert result.returncode == 0, result.stderr
    yield url
    await drop_database(name)


@pytest.fixture(scope="session")
def stripe_fake() -> Iterator[StripeFake]:
    fake = StripeFake()
    fake.start()
    yield fake
    fake.stop()


def make_settings(database_url: str, stripe_api_base: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "app_env": "test",
        "database_url": database_url,
        "stripe_secret_key": SecretStr(STRIPE_KEY),
        "stripe_api_base": stripe_api_base,
        "stripe_webhook_secrets": [SecretStr(WEBHOOK_SECRET)],
        "stripe_max_network_retries": 1,
        "stripe_timeout_seconds": 2.0,
        "auth_jwt_secret": SecretStr(JWT_SECRET),
        "cors_allowed_origins": ["https://app.1msg.io"],
        "redirect_allowed_origins": ["https://app.1msg.io"],
        "run_background_workers": False,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def clean_database(database_url: str) -> AsyncIterator[None]:
    tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
    conn = await asyncpg.connect(plain_dsn(database_url))
    try:
        await conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()
    yield


@pytest.fixture
def settings(database_url: str, stripe_fake: StripeFake, clean_database: None) -> Settings:
    stripe_fake.reset()
    return make_settings(database_url, stripe_fake.url)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://billing.test") as http:
        yield http


@pytest.fixture
async def gateway(stripe_fake: StripeFake) -> AsyncIterator[StripeGateway]:
    stripe_gateway = StripeGateway(
        api_key=STRIPE_KEY, api_base=stripe_fake.url, max_network_retries=1, timeout_seconds=2.0
    )
    yield stripe_gateway
    await stripe_gateway.close()


TokenFactory = Callable[..., str]


@pytest.fixture
def token(settings: Settings) -> TokenFactory:
    """`token(account_id="acc_1")` for a user, `token(scope="ops")` for a service/staff caller."""

    def make(
        *, account_id: str | None = None, scope: str | None = None, sub: str = "tester", **kw: Any
    ) -> str:
        return mint_token(settings, sub=sub, account_id=account_id, scope=scope, **kw)

    return make


def bearer(token_value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_value}"}


Deliver = Callable[..., Any]


@pytest.fixture
def deliver(app: FastAPI, client: httpx.AsyncClient, stripe_fake: StripeFake) -> Deliver:
    """`await deliver(events)` POSTs each Stripe event to /webhooks/stripe signed exactly as
    Stripe signs it, asserts each was acknowledged, then applies every stored event (the
    background worker is off in tests, so processing is explicit and deterministic).
    `process=False` only delivers."""

    async def run(events: list[dict[str, Any]], *, process: bool = True) -> None:
        for event in events:
            body, headers = stripe_fake.signed_event(event, WEBHOOK_SECRET)
            response = await client.post("/webhooks/stripe", content=body, headers=headers)
            assert response.status_code == 200, response.text
        if process:
            await app.state.event_processor.drain()

    return run
