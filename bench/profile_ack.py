"""Profile the service while it acknowledges the benchmark stream (py-spy, collapsed stacks):
`PYTHONPATH=. python -m bench.profile_ack [accounts] [workers]` -> bench/results/profile-*.txt"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time

import asyncpg

from bench import harness
from bench.harness import RESULTS, run_wrk
from bench.scenario import build, deliveries
from tests.stripe_fake import StripeFake


async def main() -> None:
    accounts = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    workers = len(sys.argv) > 2 and sys.argv[2] == "workers"
    RESULTS.mkdir(parents=True, exist_ok=True)
    fake = StripeFake().start()
    name = f"bench_prof_{os.getpid()}"
    try:
        scenario = build(fake, accounts)
        bodies = [harness.event_body(e) for e in deliveries(scenario.events, 0.1, random.Random(7))]
        dsn = await harness.create_database(name)
        harness.migrate(dsn)
        await harness.seed(dsn, scenario)
        file = RESULTS / "deliveries.bin"
        log = RESULTS / "profile-server.log"
        with harness.servers() as running:
            service = harness.start_server(
                "service", "app.main:app", harness.service_env(dsn, fake.url, workers=workers), log
            )
            running.append(service)
            out = RESULTS / f"profile-{'e2e' if workers else 'ack'}.txt"
            spy = harness.start_py_spy(service.process.pid, out)
            harness.write_deliveries(file, bodies)
            started = time.monotonic()
            result = run_wrk(service.url, file, connections=64)
            print(f"{result.rate:,.0f} events/s p50 {result.p50_ms:.1f} p99 {result.p99_ms:.1f}")
            if workers:
                conn = await asyncpg.connect(dsn)
                for _ in range(600):
                    left = await conn.fetchval(
                        "SELECT count(*) FROM stripe_events WHERE status = 'pending'"
                    )
                    if left == 0:
                        break
                    await asyncio.sleep(0.5)
                print(f"applied after {time.monotonic() - started:.1f} s")
                print(
                    await conn.fetch(
                        "SELECT status, attempts, count(*), min(last_error) FROM stripe_events"
                        " GROUP BY 1, 2 ORDER BY 1, 2"
                    )
                )
                await conn.close()
            spy.send_signal(signal.SIGINT)
            spy.wait()
            print(out)
    finally:
        fake.stop()
        await harness.drop_database(name)


asyncio.run(main())
