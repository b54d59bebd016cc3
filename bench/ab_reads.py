"""The read routes of two code trees side by side (before/after) on one seeded database:
CPU per request flat out at 16 connections, and latency at one offered rate with Poisson
arrivals, alternating A B / B A rounds so the machine's load falls on both alike.

    git archive c9df835 | tar -x -C /tmp/before; git archive HEAD | tar -x -C /tmp/after
    AB_RATE=300 PYTHONPATH=. python -m bench.ab_reads /tmp/before /tmp/after 3 6 access eligibility

Seeds as `bench/run api` does (`BENCH_API_ACCOUNTS`, `BENCH_API_EVENTS`); each tree runs in its
own uvicorn worker (the Dockerfile's command); AB_RATE=0 skips the paced runs. Routes:
access, eligibility, healthz. Server output: bench/results/ab-reads.log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import IO, Any

from bench import api, harness
from tests.stripe_fake import StripeFake


def start(cwd: str, env: dict[str, str], log: IO[bytes]) -> harness.Server:
    port = harness.free_port()
    p = subprocess.Popen(
        [sys.executable, *harness.UVICORN, "--port", str(port), "app.main:app"],
        cwd=cwd,
        env={**env, "PYTHONPATH": cwd},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.5),
        ):
            return harness.Server(cwd, port, p)
        time.sleep(0.2)
    raise SystemExit(f"{cwd}: the server did not start")


RATE = float(os.environ.get("AB_RATE", "0"))


async def main() -> None:
    a, b = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    seconds = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    routes = sys.argv[5:] or ["access", "eligibility"]
    paths = {
        "access": ("/v1/channels/chan_%d/access", api.ACCOUNTS),
        "eligibility": ("/v1/accounts/acc_%d/refund-eligibility", api.ACCOUNTS),
        "healthz": ("/healthz", 1),
    }
    fake = StripeFake().start()
    name = f"bench_ab_{os.getpid()}"
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    log = (harness.RESULTS / "ab-reads.log").open("ab")
    try:
        dsn = await harness.create_database(name)
        harness.migrate(dsn)
        await api.seed_big(dsn)
        env = {
            **harness.service_env(dsn, fake.url, workers=False),
            "REDIRECT_ALLOWED_ORIGINS": api.APP_URL,
        }
        from app.auth import mint_token

        token = mint_token(
            api.service_settings(env), sub="bench", scope="billing:read", ttl_seconds=7200
        )
        servers = {"A": start(a, env, log), "B": start(b, env, log)}
        try:
            for s in servers.values():
                for r in routes:
                    api.wrk_get(s.url, *paths[r], token, 2)
            res: dict[tuple[str, ...], list[Any]] = {}
            for i in range(rounds):
                order = ["A", "B"] if i % 2 == 0 else ["B", "A"]
                for r in routes:
                    for k in order:
                        s = servers[k]
                        before = api.cpu_seconds(s.process.pid)
                        w = api.wrk_get(s.url, *paths[r], token, seconds)
                        cpu = (api.cpu_seconds(s.process.pid) - before) * 1000 / max(1, w.requests)
                        res.setdefault((r, k), []).append(cpu)
                        print(
                            f"round {i} {r:12s} {k}: {w.rate:6.0f} req/s p99 {w.p99_ms:6.1f} CPU {cpu:.3f} ms/req non200 {w.non200 + w.errors}",
                            flush=True,
                        )
                        if RATE:
                            w = api.wrk_get(s.url, *paths[r], token, seconds, rate=RATE)
                            res.setdefault((r, k, "paced"), []).append(w)
                            print(
                                f"round {i} {r:12s} {k} paced {RATE}/s: {w.rate:6.0f} req/s p50 {w.p50_ms:5.2f} p95 {w.p95_ms:5.2f} p99 {w.p99_ms:6.2f} non200 {w.non200 + w.errors}",
                                flush=True,
                            )
            for r in routes:
                ca, cb = sorted(res[(r, "A")]), sorted(res[(r, "B")])
                ma, mb = ca[len(ca) // 2], cb[len(cb) // 2]
                print(f"{r:12s} median CPU ms/req A {ma:.3f}  B {mb:.3f}  B/A {mb / ma:.2f}")
                if RATE:
                    for k in "AB":
                        ws = res[(r, k, "paced")]
                        p99 = sorted(w.p99_ms for w in ws)
                        p50 = sorted(w.p50_ms for w in ws)
                        rate = sum(w.requests for w in ws) / sum(w.seconds for w in ws)
                        print(
                            f"{r:12s} {k} paced {RATE}/s offered: achieved {rate:.0f}/s, p50 median {p50[len(p50) // 2]:.2f}, p99 per round {[round(x, 1) for x in p99]}"
                        )
        finally:
            for s in servers.values():
                s.stop()
    finally:
        fake.stop()
        await harness.drop_database(name)


if __name__ == "__main__":
    asyncio.run(main())
