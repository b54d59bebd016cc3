"""The `billing` commands an operator or cron runs, when what they need is not there: they
exit non-zero with one clear line on stderr, never a Python traceback (cron mails it, and the
cause is buried under frames of asyncpg or the Stripe SDK)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app import cli
from app.config import Settings
from tests.conftest import ROOT, process_env
from tests.stripe_fake import StripeFake


def closed_port() -> int:
    """A local port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def billing(
    *args: str, database_url: str, stripe_url: str, log_level: str = "WARNING"
) -> subprocess.CompletedProcess[str]:
    """`billing <args>` as cron runs it: its own process, the settings from the environment."""
    env = process_env(
        database_url,
        stripe_url,
        LOG_LEVEL=log_level,
        STRIPE_MAX_NETWORK_RETRIES="0",
        REDIRECT_ALLOWED_ORIGINS="https://app.1msg.io",
    )
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def log_entries(output: str) -> list[dict[str, Any]]:
    """The structured log lines (JSON objects) among a command's output."""
    entries = []
    for line in output.splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and "event" in entry:
                entries.append(entry)
    return entries


@pytest.mark.parametrize(
    "command",
    [
        ["prune-events"],
        ["expire-access"],
        ["push-extensions"],
        ["reconcile-events"],
        ["deliver-emails", "--once"],
    ],
)
def test_a_command_run_while_the_database_is_unreachable_says_so_and_exits_non_zero(
    command: list[str], stripe_fake: StripeFake
) -> None:
    unreachable = f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/billing"
    result = billing(*command, database_url=unreachable, stripe_url=stripe_fake.url)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "database" in result.stderr.lower(), result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["reconcile-events", "--since", "2026-01-01"],
        ["portal-config"],
        ["register-webhook", "--url", "https://billing.1msg.io/webhooks/stripe"],
    ],
)
def test_a_command_run_while_stripe_fails_says_so_and_exits_non_zero(
    command: list[str], settings: Settings, stripe_fake: StripeFake
) -> None:
    stripe_fake.fail_next(10, 500)
    result = billing(*command, database_url=settings.database_url, stripe_url=stripe_fake.url)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "Stripe" in result.stderr, result.stderr


def test_a_command_run_while_stripe_is_unreachable_says_so_and_exits_non_zero(
    settings: Settings,
) -> None:
    result = billing(
        "reconcile-events",
        database_url=settings.database_url,
        stripe_url=f"http://127.0.0.1:{closed_port()}",
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "Stripe" in result.stderr, result.stderr


def test_openapi_to_a_folder_that_does_not_exist_says_so_and_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["openapi", "--output", str(tmp_path / "missing" / "openapi.json")]) == 1
    error = capsys.readouterr().err
    assert "billing openapi:" in error and "missing" in error


@pytest.mark.parametrize(
    ("command", "failure", "event"),
    [
        (["portal-config", "--id", "bpc_nonexistent"], None, "stripe.request_rejected"),
        (["reconcile-events", "--since", "2026-01-01"], 500, "stripe.unavailable"),
    ],
)
def test_a_stripe_failure_is_logged_with_stripes_request_id(
    command: list[str],
    failure: int | None,
    event: str,
    settings: Settings,
    stripe_fake: StripeFake,
) -> None:
    """The id Stripe gave the failed request (`Request-Id`, `req_...`) is what finds it in
    Stripe's request logs and what Stripe's support asks for: it is on the log line."""
    if failure is not None:
        stripe_fake.fail_next(10, failure)
    result = billing(*command, database_url=settings.database_url, stripe_url=stripe_fake.url)
    assert result.returncode == 1, result.stderr
    [logged] = [e for e in log_entries(result.stdout + result.stderr) if e["event"] == event]
    assert str(logged.get("stripe_request_id", "")).startswith("req_"), logged


def test_a_command_run_with_a_refused_configuration_names_what_is_wrong_without_a_traceback(
    stripe_fake: StripeFake,
) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("STRIPE_", "AUTH_", "DATABASE_"))
    }
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "prune-events"],
        cwd=ROOT,
        env={**env, "APP_ENV": "production", "SMTP_PASSWORD": "smtp-secret-value"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "AUTH_JWT_SECRET" in result.stderr and "STRIPE_SECRET_KEY" in result.stderr
    assert "smtp-secret-value" not in result.stdout + result.stderr
