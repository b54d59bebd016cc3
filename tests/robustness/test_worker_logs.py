"""What operators see when the web process's background jobs fail (here: the database is
unreachable): each failure names its job, so the log says which of them to look at."""

from __future__ import annotations

import asyncio
import os
import sys

from tests.conftest import JWT_SECRET, ROOT, STRIPE_KEY, WEBHOOK_SECRET
from tests.robustness.test_cli_failures import closed_port, log_entries
from tests.stripe_fake import StripeFake


async def test_each_failing_background_job_is_named_in_its_log_line(
    stripe_fake: StripeFake,
) -> None:
    env = {
        **os.environ,
        "APP_ENV": "test",
        "DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/billing",
        "STRIPE_API_BASE": stripe_fake.url,
        "STRIPE_SECRET_KEY": STRIPE_KEY,
        "STRIPE_WEBHOOK_SECRETS": WEBHOOK_SECRET,
        "AUTH_JWT_SECRET": JWT_SECRET,
        "RUN_BACKGROUND_WORKERS": "true",
        "LOG_LEVEL": "WARNING",
    }
    web = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uvicorn",
        "app.main:app",
        "--port",
        "0",
        "--no-access-log",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert web.stdout is not None
    output: list[str] = []
    try:
        async with asyncio.timeout(30):
            while sum('"worker.job_failed"' in line for line in output) < 4:
                line = await web.stdout.readline()
                assert line, "".join(output)
                output.append(line.decode())
    finally:
        web.terminate()
        await web.wait()

    failed = [e for e in log_entries("".join(output)) if e["event"] == "worker.job_failed"]
    assert {e.get("job") for e in failed} == {
        "expire-access",
        "maintenance-pushes",
        "prune-events",
        "prune-idempotency-keys",
    }, failed
    assert all(e["error_type"] == "ConnectionRefusedError" for e in failed), failed
