"""What operators see when storing deliveries fails: `webhook.store_failed` is logged by a
flusher that stores many deliveries at once (and `stripe_event.notify_failed` by the NOTIFY
it asks for), so neither may name a request it is not about. The flushers were started
inside the first delivery and kept its request id for the life of the process: every later
failure pointed at that first, unrelated, request."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import orjson

from app.config import Settings
from tests.conftest import plain_dsn, process_env, start_web
from tests.robustness.test_cli_failures import closed_port, log_entries
from tests.stripe_fake import StripeFake
from tests.webhooks.test_ingestion import event, signed


async def test_a_failed_store_is_not_logged_under_the_first_delivery_s_request_id(
    settings: Settings, stripe_fake: StripeFake
) -> None:
    port = closed_port()
    env = process_env(
        settings.database_url,
        stripe_fake.url,
        RUN_BACKGROUND_WORKERS="false",
        DATABASE_POOL_SIZE="2",  # one flusher: the one that stored the first delivery
    )
    web = await start_web(env, port)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as http:
            for _ in range(100):
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)

            async def post(event_id: str, request_id: str) -> None:
                body = orjson.dumps(event(event_id))
                headers = {**signed(body), "x-request-id": request_id}
                answer = await http.post("/webhooks/stripe", content=body, headers=headers)
                assert answer.status_code == 200, answer.text

            await post("evt_logs_1", "first-delivery")
            # the database drops the flushers' connections (a restart, a failover)
            conn = await asyncpg.connect(plain_dsn(settings.database_url))
            try:
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            finally:
                await conn.close()
            await post("evt_logs_2", "second-delivery")  # stored on a new connection
    finally:
        web.terminate()
        output, _ = await web.communicate()

    entries = log_entries(output.decode())
    failed = [e for e in entries if e["event"] == "webhook.store_failed"]
    assert failed, output.decode()
    # the flusher's failure, and the NOTIFY of the second delivery's event that failed on the
    # dropped connection too, are no part of the first delivery
    after = [
        e for e in entries if e["event"] in {"webhook.store_failed", "stripe_event.notify_failed"}
    ]
    assert [e.get("request_id") for e in after] == [None] * len(after), after
