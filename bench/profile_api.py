"""Profile the service while it answers one read route at 16 connections (py-spy, collapsed
stacks): `BENCH_API_ACCOUNTS=5000 BENCH_API_EVENTS=10000 PYTHONPATH=. python -m
bench.profile_api access|eligibility` -> bench/results/profile-api-<route>.txt, and prints the
share of samples in the frames that matter."""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
import time

from bench import api, harness
from bench.harness import RESULTS
from tests.stripe_fake import StripeFake

ROUTES = {
    "access": "/v1/channels/chan_%d/access",
    "eligibility": "/v1/accounts/acc_%d/refund-eligibility",
}
MARKERS = [
    "asyncpg",
    "sqlalchemy/orm",
    "sqlalchemy/engine",
    "sqlalchemy/sql",
    "sqlalchemy/pool",
    "fastapi",
    "starlette",
    "pydantic",
    "jwt",
    "structlog",
    "uvicorn",
    "app/",
]


async def main() -> None:
    route = sys.argv[1] if len(sys.argv) > 1 else "access"
    RESULTS.mkdir(parents=True, exist_ok=True)
    fake = StripeFake().start()
    name = f"bench_profapi_{os.getpid()}"
    try:
        dsn = await harness.create_database(name)
        harness.migrate(dsn)
        await api.seed_big(dsn)
        env = harness.service_env(dsn, fake.url, workers=False)
        from app.auth import mint_token

        token = mint_token(api.service_settings(env), sub="bench", scope="billing:read")
        out = RESULTS / f"profile-api-{route}.txt"
        with harness.servers() as running:
            server = harness.start_server("service", "app.main:app", env, RESULTS / "p.log")
            running.append(server)
            api.wrk_get(server.url, ROUTES[route], api.ACCOUNTS, token, 3)
            spy = subprocess.Popen(
                [
                    os.path.join(os.path.dirname(sys.executable), "py-spy"),
                    "record",
                    "--pid",
                    str(server.process.pid),
                    "--format",
                    "raw",
                    "-o",
                    str(out),
                    "--rate",
                    "200",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
            result = api.wrk_get(server.url, ROUTES[route], api.ACCOUNTS, token, 15)
            spy.send_signal(2)
            spy.wait(30)
        print(f"{route}: {result.rate:,.0f} req/s, p50 {result.p50_ms:.1f} ms")
        totals: collections.Counter[str] = collections.Counter()
        samples = 0
        for line in out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            n = int(count)
            samples += n
            for marker in MARKERS:
                if marker in stack:
                    totals[marker] += n
        for marker, n in totals.most_common():
            print(f"  {marker:20s} {n / samples:6.1%} of samples (inclusive)")
        print(f"collapsed stacks: {out}")
    finally:
        fake.stop()
        await harness.drop_database(name)


if __name__ == "__main__":
    asyncio.run(main())
