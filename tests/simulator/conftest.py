"""The service for real (uvicorn in a subprocess, its own database, background workers on) plus
the Stripe simulator delivering signed webhooks to it: what `bin/dev serve` runs offline."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.auth import mint_token
from app.config import DEFAULT_PLANS, Settings
from tests.conftest import (
    JWT_SECRET,
    ROOT,
    STRIPE_KEY,
    WEBHOOK_SECRET,
    alembic,
    create_database,
    drop_database,
    make_settings,
)
from tests.stripe_fake.simulator import SimulatorServer

APP_ORIGIN = "http://localhost:3000"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Stack:
    """A running service + simulator pair."""

    service_url: str
    simulator: SimulatorServer
    settings: Settings
    http: httpx.AsyncClient
    clients: list[httpx.AsyncClient] = field(default_factory=list)

    def headers(self, account_id: str) -> dict[str, str]:
        tok = mint_token(
            self.settings, sub="user-1", account_id=account_id, email=f"{account_id}@example.com"
        )
        return {"Authorization": f"Bearer {tok}"}

    async def eventually(
        self, probe: Callable[[], Awaitable[Any]], *, seconds: float = 20.0
    ) -> Any:
        """Poll ``probe`` until it returns something truthy (webhooks are asynchronous)."""
        deadline = time.monotonic() + seconds
        while True:
            result = await probe()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached; last value: " + repr(result))
            await asyncio.sleep(0.1)


def start_service(port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """uvicorn serving app.main:app, as `bin/dev serve` runs it."""
    with log_path.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host=127.0.0.1", f"--port={port}"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def read_log(path: Path) -> str:
    return path.read_text()


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    name = f"billing_sim_{os.getpid()}_{secrets.token_hex(3)}"
    database_url = await create_database(name)
    migrated = alembic(database_url, "upgrade", "head")
    assert migrated.returncode == 0, migrated.stderr
    port = free_port()
    service_url = f"http://127.0.0.1:{port}"
    simulator = SimulatorServer(
        webhook_url=f"{service_url}/webhooks/stripe", webhook_secret=WEBHOOK_SECRET
    )
    simulator.seed_plans(DEFAULT_PLANS)
    simulator.start()
    log_path: Path = tmp_path_factory.mktemp("service") / "uvicorn.log"
    env = {
        **os.environ,
        "APP_ENV": "test",
        "DATABASE_URL": database_url,
        "DATABASE_POOL_SIZE": "5",
        "STRIPE_SECRET_KEY": STRIPE_KEY,
        "STRIPE_API_BASE": simulator.url,
        "STRIPE_WEBHOOK_SECRETS": WEBHOOK_SECRET,
        "STRIPE_MAX_NETWORK_RETRIES": "0",
        "AUTH_JWT_SECRET": JWT_SECRET,
        "REDIRECT_ALLOWED_ORIGINS": APP_ORIGIN,
        "CORS_ALLOWED_ORIGINS": APP_ORIGIN,
        "RUN_BACKGROUND_WORKERS": "true",
        "LOG_LEVEL": "WARNING",
    }
    service = start_service(port, env, log_path)
    http = httpx.AsyncClient(base_url=service_url, timeout=10)
    stack_clients: list[httpx.AsyncClient] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if (await http.get("/healthz")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if service.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the service did not start:\n" + read_log(log_path))
            await asyncio.sleep(0.1)
        stack = Stack(service_url, simulator, make_settings(database_url, simulator.url), http)
        stack_clients = stack.clients
        yield stack
    finally:
        for client in [http, *stack_clients]:
            await client.aclose()
        service.terminate()
        try:
            service.wait(timeout=10)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
        simulator.stop()
        await drop_database(name)
