"""Profile the service while it answers one read route at 16 connections (py-spy, collapsed
stacks): `BENCH_API_ACCOUNTS=5000 BENCH_API_EVENTS=10000 PYTHONPATH=. python -m
bench.profile_api access|eligibility|checkout` -> bench/results/profile-api-<route>.txt, and
prints the share of samples in the frames that matter and the service's CPU per request.
`checkout`: 150 top-up checkouts one at a time, each a first request of a new account, as in
bench/api.py (the CPU figure includes the service's Stripe SDK calls)."""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import uuid

import httpx

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


async def checkouts(url: str, env: dict[str, str], n: int) -> int:
    """`n` top-up checkouts, one at a time, each the first request of a new account."""
    from app.auth import mint_token

    settings = api.service_settings(env)
    body = {
        "purpose": "top_up",
        "amount": 5000,
        "currency": "usd",
        "success_url": f"{api.APP_URL}/balance/done",
        "cancel_url": f"{api.APP_URL}/balance",
    }
    tag = uuid.uuid4().hex[:6]
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for i in range(n):
            account = f"acc_prof_{tag}_{i}"
            token = mint_token(settings, sub="u", account_id=account, email=f"{account}@x.io")
            headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": uuid.uuid4().hex}
            response = await client.post(
                f"/v1/accounts/{account}/checkout-sessions", json=body, headers=headers
            )
            assert response.status_code == 201, response.text
    return n


async def main() -> None:
    route = sys.argv[1] if len(sys.argv) > 1 else "access"
    RESULTS.mkdir(parents=True, exist_ok=True)
    fake = StripeFake().start()
    name = f"bench_profapi_{os.getpid()}"
    try:
        dsn = await harness.create_database(name)
        harness.migrate(dsn)
        await api.seed_big(dsn)
        env = {
            **harness.service_env(dsn, fake.url, workers=False),
            "REDIRECT_ALLOWED_ORIGINS": api.APP_URL,
            "STRIPE_SESSIONS_PER_ACCOUNT_PER_MINUTE": "1000",
        }
        from app.auth import mint_token

        token = mint_token(api.service_settings(env), sub="bench", scope="billing:read")
        out = RESULTS / f"profile-api-{route}.txt"
        with harness.servers() as running:
            server = harness.start_server("service", "app.main:app", env, RESULTS / "p.log")
            running.append(server)
            if route == "checkout":
                await checkouts(server.url, env, 20)
            else:
                api.wrk_get(server.url, ROUTES[route], api.ACCOUNTS, token, 3)
            cpu_before = api.cpu_seconds(server.process.pid)
            spy = harness.start_py_spy(server.process.pid, out)
            if route == "checkout":
                requests = await checkouts(server.url, env, 150)
                summary = f"{requests} checkouts"
            else:
                result = api.wrk_get(server.url, ROUTES[route], api.ACCOUNTS, token, 15)
                requests = result.requests
                summary = f"{result.rate:,.0f} req/s, p50 {result.p50_ms:.1f} ms"
            cpu_ms = (api.cpu_seconds(server.process.pid) - cpu_before) * 1000 / requests
            spy.send_signal(2)
            spy.wait(30)
        print(f"{route}: {summary}, service CPU {cpu_ms:.2f} ms per request (under py-spy)")
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
