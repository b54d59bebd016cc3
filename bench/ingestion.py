"""Webhook ingestion benchmark: `bench/run ingestion` (see bench/README.md).

1. Builds ACCOUNTS realistic Stripe lifecycles with the Stripe fake (22 events each), adds 10%
   duplicate deliveries and shuffles them; seeds the rows the checkout API would have written.
2. Acknowledgement: the service (one uvicorn worker, README defaults, background workers off)
   and the reference endpoint (bench/reference.py) take the same signed stream from wrk at the
   same concurrency, in alternating rounds; each round starts from an empty events table.
3. Latency at half the service's peak rate (Poisson arrivals).
4. End to end: a fresh copy of the seeded database, the service with its background workers,
   the whole stream as one burst; measured until every event is `processed`/`ignored`, then
   checked: nothing lost, nothing failed, every account's mirror in Stripe's final state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg

from bench import harness
from bench.harness import RESULTS, WrkResult, median, run_wrk, table
from bench.reference import TABLE_DDL
from bench.scenario import build, deliveries
from tests.stripe_fake import StripeFake

ACCOUNTS = int(os.environ.get("BENCH_ACCOUNTS", "600"))
# the end-to-end burst uses the first E2E_ACCOUNTS lifecycles (applying is the slow part),
# after a warm-up with the next E2E_WARM_UP ones
E2E_ACCOUNTS = int(os.environ.get("BENCH_E2E_ACCOUNTS", "100"))
E2E_WARM_UP = 10
# end-to-end runs per layout (in the web process, a processor of its own), alternating; the
# median is the figure (one ~1 s burst moves ±30% between runs of the same hour)
E2E_RUNS = int(os.environ.get("BENCH_E2E_RUNS", "3"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "64"))
DUPLICATES = 0.10


def fmt(result: WrkResult) -> list[Any]:
    return [
        f"{result.rate:,.0f}",
        f"{result.p50_ms:.1f}",
        f"{result.p95_ms:.1f}",
        f"{result.p99_ms:.1f}",
        result.requests,
        result.non200 + result.errors,
    ]


async def count_status(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT status, count(*) FROM stripe_events GROUP BY status")
        return {r["status"]: r["count"] for r in rows}
    finally:
        await conn.close()


async def mirror_check(dsn: str, accounts: int) -> dict[str, Any]:
    """Every account ends where its lifecycle ends at Stripe (see bench/scenario.py)."""
    conn = await asyncpg.connect(dsn)
    try:
        q = conn.fetchval
        return {
            "subscriptions canceled": await q(
                "SELECT count(*) FROM subscriptions WHERE status = 'canceled'"
            ),
            "paid invoices": await q("SELECT count(*) FROM invoices WHERE status = 'paid'"),
            "payments": await q("SELECT count(*) FROM payments"),
            "settled fees": await q("SELECT count(*) FROM payments WHERE fee IS NOT NULL"),
            "refunds succeeded": await q("SELECT count(*) FROM refunds WHERE status='succeeded'"),
            "disputes lost": await q("SELECT count(*) FROM disputes WHERE status = 'lost'"),
            "top-up ledger entries": await q(
                "SELECT count(*) FROM ledger_entries WHERE kind = 'top_up' AND amount = 5000"
            ),
            "checkouts fulfilled": await q(
                "SELECT count(*) FROM checkout_sessions WHERE fulfilled_at IS NOT NULL"
            ),
        }
    finally:
        await conn.close()


def expected_mirror(accounts: int) -> dict[str, int]:
    return {
        "subscriptions canceled": accounts,
        "paid invoices": 2 * accounts,
        "payments": 3 * accounts,
        "settled fees": 2 * accounts,
        "refunds succeeded": accounts,
        "disputes lost": accounts,
        "top-up ledger entries": accounts,
        "checkouts fulfilled": 2 * accounts,
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / "ingestion-servers.log"
    log.write_bytes(b"")
    print(f"machine: {harness.machine()}")
    print(
        f"setup: {ACCOUNTS} accounts' lifecycles, +{DUPLICATES:.0%} duplicates, shuffled; "
        f"{ROUNDS} alternating rounds; wrk, {CONNECTIONS} connections",
        flush=True,
    )
    started = time.monotonic()
    fake = StripeFake().start()
    tag = f"{os.getpid()}"
    seed_db, ack_db = f"bench_seed_{tag}", f"bench_ack_{tag}"
    e2e_db = f"bench_e2e_{tag}"
    try:
        scenario = build(fake, ACCOUNTS)
        stream = deliveries(scenario.events, DUPLICATES, random.Random(7))
        bodies = [harness.event_body(event) for event in stream]
        unique = len(scenario.events)
        seed_dsn = await harness.create_database(seed_db)
        harness.migrate(seed_dsn)
        await harness.seed(seed_dsn, scenario)
        ack_dsn = await harness.create_database(ack_db, template=seed_db)
        conn = await asyncpg.connect(ack_dsn)
        await conn.execute(TABLE_DDL)
        await conn.close()
        print(
            f"setup: {unique} events, {len(bodies)} deliveries, "
            f"{sum(map(len, bodies)) / len(bodies):,.0f} bytes each; "
            f"{time.monotonic() - started:.0f} s",
            flush=True,
        )
        file = RESULTS / "deliveries.bin"
        results: dict[str, list[WrkResult]] = {"service": [], "reference": []}
        tables = {"service": "stripe_events", "reference": "bench_reference_events"}
        with harness.servers() as running:
            service = harness.start_server(
                "service",
                "app.main:app",
                harness.service_env(ack_dsn, fake.url, workers=False),
                log,
            )
            running.append(service)
            reference = harness.start_server(
                "reference",
                "bench.reference:app",
                {**os.environ, "DATABASE_URL": ack_dsn, "DATABASE_POOL_SIZE": "10"},
                log,
            )
            running.append(reference)
            targets = {"service": service, "reference": reference}
            # warm-up: both stacks, a short stream, not counted
            for server in targets.values():
                harness.write_deliveries(file, bodies[:2000])
                run_wrk(server.url, file, connections=CONNECTIONS)
            for round_no in range(ROUNDS):
                order = ["service", "reference"] if round_no % 2 == 0 else ["reference", "service"]
                for name in order:
                    conn = await asyncpg.connect(ack_dsn)
                    await conn.execute(f"TRUNCATE {tables[name]}")
                    await conn.execute("CHECKPOINT")
                    await conn.close()
                    harness.write_deliveries(file, bodies)
                    result = run_wrk(targets[name].url, file, connections=CONNECTIONS)
                    results[name].append(result)
                    print(
                        f"round {round_no + 1} {name:9s}: {result.rate:8,.0f} events/s  "
                        f"p50 {result.p50_ms:6.1f}  p95 {result.p95_ms:6.1f}  "
                        f"p99 {result.p99_ms:6.1f} ms  not 200: {result.non200 + result.errors}",
                        flush=True,
                    )
            conn = await asyncpg.connect(ack_dsn)
            stored = await conn.fetchval("SELECT count(*) FROM stripe_events")
            await conn.close()
            assert stored == unique, f"service stored {stored} of {unique} events"

            peak = median([r.rate for r in results["service"]])
            half: dict[str, WrkResult] = {}
            for name in ("service", "reference"):
                conn = await asyncpg.connect(ack_dsn)
                await conn.execute(f"TRUNCATE {tables[name]}")
                await conn.close()
                part = bodies[: int(peak / 2 * 8)]  # about 8 s at the target rate
                harness.write_deliveries(file, part)
                half[name] = run_wrk(
                    targets[name].url, file, connections=CONNECTIONS, rate=peak / 2
                )
        ref_rate = median([r.rate for r in results["reference"]])
        summary: dict[str, Any] = {"machine": harness.machine(), "accounts": ACCOUNTS}
        rows = []
        for name in ("service", "reference"):
            rs = results[name]
            rows.append(
                [
                    name,
                    f"{median([r.rate for r in rs]):,.0f}",
                    f"{median([r.p50_ms for r in rs]):.1f}",
                    f"{median([r.p95_ms for r in rs]):.1f}",
                    f"{median([r.p99_ms for r in rs]):.1f}",
                    f"{median([r.rate for r in rs]) / ref_rate:.2f}x",
                    " ".join(
                        f"{r.rate / rr.rate:.2f}"
                        for r, rr in zip(rs, results["reference"], strict=True)
                    ),
                ]
            )
        print("\nAcknowledgement at full load (median of rounds; ratio to the reference):")
        print(
            table(["target", "events/s", "p50 ms", "p95 ms", "p99 ms", "ratio", "per round"], rows)
        )
        print(f"\nAt half the service's peak ({peak / 2:,.0f} events/s offered, Poisson):")
        print(
            table(
                ["target", "events/s", "p50 ms", "p95 ms", "p99 ms", "sent", "not 200"],
                [[name, *fmt(r)] for name, r in half.items()],
            )
        )
        summary["ack"] = {k: [vars(r) for r in v] for k, v in results.items()}
        summary["half_peak"] = {k: vars(v) for k, v in half.items()}
        summary["reference_rate"] = ref_rate
        if not args.skip_e2e:
            n = min(E2E_ACCOUNTS, ACCOUNTS - E2E_WARM_UP)
            # copies are in account order (scenario.py), each lifecycle the same length
            per_account = len(scenario.events) // len(scenario.accounts)
            subset = scenario.events[: n * per_account]
            warm_up = scenario.events[n * per_account : (n + E2E_WARM_UP) * per_account]
            streams = [
                [harness.event_body(e) for e in deliveries(events, DUPLICATES, random.Random(8))]
                for events in (warm_up, subset)
            ]
            runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
            for run_no in range(E2E_RUNS):
                for separate in (False, True) if run_no % 2 == 0 else (True, False):
                    runs[separate].append(
                        await end_to_end(
                            fake,
                            seed_db,
                            e2e_db,
                            streams,
                            len(warm_up),
                            len(subset),
                            n,
                            ref_rate,
                            log,
                            separate,
                        )
                    )
            print(f"\nEnd to end, median of {E2E_RUNS} runs each (ratio to the reference's ack):")
            rows = []
            for separate, label in ((False, "in the web process"), (True, "processor of its own")):
                rates = [run["e2e_rate"] for run in runs[separate]]
                summary["e2e_separate_processor" if separate else "e2e"] = {
                    "runs": runs[separate],
                    "median_rate": median(rates),
                    "ratio": median(rates) / ref_rate,
                }
                rows.append(
                    [
                        label,
                        f"{median(rates):,.0f}",
                        f"{median(rates) / ref_rate:.2f}x",
                        " ".join(f"{rate / ref_rate:.2f}" for rate in rates),
                    ]
                )
            print(table(["processor", "deliveries/s", "ratio", "per run"], rows))
        out = RESULTS / "ingestion.json"
        out.write_text(json.dumps(summary, indent=2, default=str))
        print(f"\nresults: {out}; total {time.monotonic() - started:.0f} s")
    finally:
        fake.stop()
        for name in (ack_db, e2e_db, seed_db):
            await harness.drop_database(name)


async def end_to_end(
    fake: StripeFake,
    seed_db: str,
    e2e_db: str,
    streams: list[list[bytes]],
    warm_unique: int,
    unique: int,
    accounts: int,
    ref_rate: float,
    log: Path,
    separate_processor: bool,
) -> dict[str, Any]:
    """The warm-up stream (other accounts, `E2E_WARM_UP`) delivered and applied, not counted,
    as the acknowledgement rounds warm up too; then the burst, timed until it is applied.
    The processor runs inside the web process (the default, `RUN_BACKGROUND_WORKERS=true`),
    or with `separate_processor` as a `billing process-events` process of its own beside a
    web process without background workers (README, "Running in production")."""
    warm_up, bodies = streams
    dsn = await harness.create_database(e2e_db, template=seed_db)
    file = RESULTS / "deliveries.bin"
    with harness.servers() as running:
        env = harness.service_env(dsn, fake.url, workers=not separate_processor)
        service = harness.start_server("service", "app.main:app", env, log)
        running.append(service)
        if separate_processor:
            running.append(harness.start_worker("processor", ["process-events"], env, log))

        watch = await asyncpg.connect(dsn)  # one connection, polled every 10 ms at the end

        async def applied_at_least(events: int) -> bool:
            done = await watch.fetchval(
                "SELECT count(*) FROM stripe_events WHERE status <> 'pending'"
            )
            return bool(done >= events)  # processed, ignored or parked as failed

        harness.write_deliveries(file, warm_up)
        run_wrk(service.url, file, connections=CONNECTIONS)
        assert await harness.wait_for(partial(applied_at_least, warm_unique), seconds=600)
        harness.write_deliveries(file, bodies)
        await watch.execute("CHECKPOINT")  # as before each acknowledgement round
        started = time.monotonic()
        burst = run_wrk(service.url, file, connections=CONNECTIONS)
        acked = time.monotonic()
        backlog = (await count_status(dsn)).get("pending", 0)
        finished = await harness.wait_for(
            partial(applied_at_least, warm_unique + unique), seconds=600, interval=0.01
        )
        applied = time.monotonic()

        async def fees_known() -> bool:  # looked up after the events (app/webhooks/fees.py)
            known = await watch.fetchval("SELECT count(*) FROM payments WHERE fee IS NOT NULL")
            return bool(known >= expected_mirror(accounts + E2E_WARM_UP)["settled fees"])

        fees_finished = await harness.wait_for(fees_known, seconds=600, interval=0.01)
        fees_at = time.monotonic()
        await watch.close()
    counts = await count_status(dsn)
    mirror = await mirror_check(dsn, accounts + E2E_WARM_UP)
    expected = expected_mirror(accounts + E2E_WARM_UP)
    e2e_rate = len(bodies) / (applied - started)
    with_fees_rate = len(bodies) / (fees_at - started)
    where = "a processor process of its own" if separate_processor else "background workers on"
    print(
        f"\nEnd to end ({accounts} accounts' lifecycles, {len(bodies)} deliveries as one burst,"
        f" {where}):"
    )
    print(
        table(
            ["measure", "value"],
            [
                ["acknowledged", f"{burst.rate:,.0f} events/s ({burst.rate / ref_rate:.2f}x ref)"],
                [
                    "ack p50/p95/p99 ms",
                    f"{burst.p50_ms:.1f} / {burst.p95_ms:.1f} / {burst.p99_ms:.1f}",
                ],
                ["backlog when the burst ended", f"{backlog} events pending"],
                [
                    "drained after the burst",
                    f"{applied - acked:.1f} s" if finished else "NO (timeout)",
                ],
                [
                    "stored and applied",
                    f"{e2e_rate:,.0f} deliveries/s ({e2e_rate / ref_rate:.2f}x ref)",
                ],
                [
                    "fees looked up after the events",
                    f"{fees_at - applied:.1f} s later: {with_fees_rate:,.0f} deliveries/s"
                    f" ({with_fees_rate / ref_rate:.2f}x ref)"
                    if fees_finished
                    else "NO (timeout)",
                ],
                ["events by status", json.dumps(counts)],
                ["not acknowledged 200", burst.non200 + burst.errors],
                ["mirror as Stripe ends", "yes" if mirror == expected else f"NO: {mirror}"],
            ],
        )
    )
    await harness.drop_database(e2e_db)
    return {
        "burst": vars(burst),
        "backlog": backlog,
        "drain_seconds": applied - acked,
        "e2e_rate": e2e_rate,
        "ratio": e2e_rate / ref_rate,
        "with_fees_rate": with_fees_rate,
        "counts": counts,
        "mirror_ok": mirror == expected,
        "mirror": mirror,
    }


if __name__ == "__main__":
    asyncio.run(main())
