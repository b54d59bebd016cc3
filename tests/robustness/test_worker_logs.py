"""What operators see of the web process when things fail (here: the database is
unreachable): each failing background job is named, each 503 answer logged with its reason."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import process_env, start_web
from tests.robustness.test_cli_failures import closed_port, log_entries
from tests.stripe_fake import StripeFake


async def test_each_failing_background_job_is_named_in_its_log_line(
    stripe_fake: StripeFake,
) -> None:
    env = process_env(
        f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/billing",
        stripe_fake.url,
        RUN_BACKGROUND_WORKERS="true",
    )
    web = await start_web(env, 0)
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


async def test_a_503_answer_is_logged_with_its_reason(stripe_fake: StripeFake) -> None:
    """README: 5xx answers are logged by the error handlers. `/readyz` answering 503 (database
    unreachable, or behind the code's migrations) said why only in its body, which a load
    balancer's or Kubernetes' probe does not show: the replica stayed out of rotation with
    nothing in the logs saying why."""
    port = closed_port()
    env = process_env(
        f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/billing",
        stripe_fake.url,
        LOG_LEVEL="INFO",
        RUN_BACKGROUND_WORKERS="false",
    )
    web = await start_web(env, port)
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(100):
                try:
                    ready = await http.get(
                        f"http://127.0.0.1:{port}/readyz", headers={"x-request-id": "probe-1"}
                    )
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
        assert ready.status_code == 503
    finally:
        web.terminate()
        output, _ = await web.communicate()

    logged = [e for e in log_entries(output.decode()) if e.get("request_id") == "probe-1"]
    assert [(e["level"], e.get("status"), e.get("code")) for e in logged] == [
        ("warning", 503, "service_unavailable")
    ], output.decode()
    assert "database unreachable" in logged[0]["detail"]
