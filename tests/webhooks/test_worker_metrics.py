"""A `billing process-events` (or `deliver-emails`) process, run beside web processes without
background workers as README's "Background work" suggests, has its own counters: no web
process's `/metrics` holds them. `--metrics-port` serves them, so
`billing_stripe_event_processing_lag_seconds` and the email counters README tells operators to
watch exist in that deployment too."""

from __future__ import annotations

import asyncio
import sys

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from tests.conftest import ROOT, Deliver, process_env
from tests.robustness.test_cli_failures import closed_port
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import add_catalog, open_checkout


async def scrape(port: int, wanted: str, seconds: float = 20.0) -> str:
    """The worker's metrics once they contain `wanted` (within `seconds`)."""
    deadline = asyncio.get_running_loop().time() + seconds
    text = ""
    async with httpx.AsyncClient() as http:
        while asyncio.get_running_loop().time() < deadline:
            try:
                text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            except httpx.TransportError:
                text = ""
            if wanted in text:
                return text
            await asyncio.sleep(0.2)
    raise AssertionError(f"{wanted!r} not served on port {port}: {text[:500]!r}")


@pytest.mark.parametrize(
    ("command", "series"),
    [
        (
            "process-events",
            'billing_stripe_events_processed_total{type="checkout.session.completed"}',
        ),
        ("deliver-emails", "billing_emails_sent_total"),
    ],
)
async def test_a_worker_process_serves_its_own_metrics(
    command: str,
    series: str,
    app: FastAPI,
    settings: Settings,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    port = closed_port()
    env = process_env(settings.database_url, stripe_fake.url)
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app.cli",
        command,
        "--metrics-port",
        str(port),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        if command == "process-events":
            add_catalog(stripe_fake)
            session_id = await open_checkout(
                app, account_id="acc_metrics", purpose="subscription", channel_id="ch_metrics"
            )
            # stored by the web process, applied by the worker (it LISTENs)
            await deliver(stripe_fake.complete_checkout(session_id), process=False)
        exposed = await scrape(port, series)
    finally:
        if worker.returncode is None:
            worker.terminate()
        _, stderr = await worker.communicate()
    assert "Traceback" not in stderr.decode(), stderr.decode()
    if command == "process-events":
        assert "billing_stripe_event_processing_lag_seconds_count" in exposed
