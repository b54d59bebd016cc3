"""`/metrics` of a container running several uvicorn workers (`WEB_CONCURRENCY=N`, README
"Replicas"): a scrape reaches one worker at random, so with one registry per worker the
request counter Prometheus read jumped between the workers' counts (read as counter resets:
`rate()` wrong, requests missing). With `PROMETHEUS_MULTIPROC_DIR` every scrape answers the
sum of all the workers."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx

from app.config import Settings
from tests.conftest import process_env, start_web
from tests.robustness.test_cli_failures import closed_port
from tests.stripe_fake import StripeFake

HEALTHZ = re.compile(
    r'^billing_http_requests_total\{method="GET",route="/healthz",status="200"\} (\S+)$', re.M
)


async def test_every_scrape_of_a_multi_worker_container_counts_every_worker_s_requests(
    settings: Settings, stripe_fake: StripeFake, tmp_path: Path
) -> None:
    port = closed_port()
    env = process_env(
        settings.database_url,
        stripe_fake.url,
        RUN_BACKGROUND_WORKERS="false",
        WEB_CONCURRENCY="2",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path),
    )
    web = await start_web(env, port, log=asyncio.subprocess.DEVNULL)
    try:
        # a fresh connection per request: the kernel spreads them over the two workers
        for _ in range(300):
            try:
                async with httpx.AsyncClient() as http:
                    if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
            except httpx.TransportError:
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # both workers up
        before = 0.0
        counts = []
        for _ in range(40):
            async with httpx.AsyncClient() as http:
                assert (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
                found = HEALTHZ.search((await http.get(f"http://127.0.0.1:{port}/metrics")).text)
            counts.append(float(found.group(1)) if found else 0.0)
        # each scrape sees every request made before it, in whichever worker
        for count in counts:
            assert count >= before + 1, counts
            before = count
    finally:
        web.terminate()
        await web.wait()
