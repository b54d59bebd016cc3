"""Two replicas benchmark: `bench/run scaleout` (see bench/README.md).

The same shuffled, duplicated stream of Stripe deliveries (bench/scenario.py) is sent twice,
each time to a fresh copy of the seeded database, background workers on:

1. one replica: one uvicorn process, one wrk;
2. two replicas: two uvicorn processes on the same Postgres, the stream split between their
   ports (deliveries alternate, so duplicates of one event can reach both replicas at once), one
   wrk per port running at the same time.

Printed: the combined acknowledgement rate of each run, the time until every event is
`processed`/`ignored`, and whether the mirror tables end identical (a snapshot of every
table's rows without surrogate ids and wall-clock timestamps).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg

from bench import harness
from bench.harness import RESULTS, WrkResult, run_wrk, table
from bench.ingestion import count_status, expected_mirror, mirror_check
from bench.scenario import build, deliveries
from tests.stripe_fake import StripeFake

ACCOUNTS = int(os.environ.get("BENCH_SCALEOUT_ACCOUNTS", "100"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "64"))
DUPLICATES = 0.10
# set by the clock, not by the events: left out of the comparison (or compared as set / unset)
WALL_CLOCK = {
    "created_at",
    "updated_at",
    "fulfilled_at",
    "processed_at",
    "received_at",
    "next_attempt_at",
    "sent_at",
    "claimed_at",
    "at",
}
SKIP_TABLES = {"alembic_version", "idempotency_records"}


async def snapshot(dsn: str) -> dict[str, tuple[int, str]]:
    """Per table: row count and a digest of its sorted rows, surrogate keys (identity and uuid
    columns) dropped and wall-clock timestamps reduced to set / unset."""
    conn = await asyncpg.connect(dsn)
    try:
        columns = await conn.fetch(
            "SELECT table_name, column_name, data_type, is_identity FROM information_schema.columns"
            " WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
        )
        by_table: dict[str, list[str]] = {}
        for c in columns:
            if c["table_name"] in SKIP_TABLES:
                continue
            name = c["column_name"]
            if c["data_type"] == "uuid" or c["is_identity"] == "YES":
                continue
            if c["table_name"] == "stripe_events" and name in {"attempts", "last_error"}:
                continue  # retries (a deadlock retried) may differ; the outcome must not
            if c["table_name"] == "subscriptions" and name == "dispute_cancel_sent_at":
                # whether a lost chargeback's cancellation was sent to Stripe before the
                # subscription's own deletion event arrived depends on timing (it is sent for a
                # subscription live when the follow-ups run); the subscription's state must not
                continue
            expr = f'("{name}" IS NOT NULL)' if name in WALL_CLOCK else f'"{name}"'
            by_table.setdefault(c["table_name"], []).append(f"{expr}::text")
        result = {}
        for name, exprs in sorted(by_table.items()):
            source = f'"{name}"'
            if name == "access_changes":
                # a feed of changes: the intermediate ones depend on the order events are
                # applied in; the final access of every channel must not
                source = (
                    "(SELECT DISTINCT ON (channel_id) * FROM access_changes"
                    " ORDER BY channel_id, id DESC) AS last"
                )
            rows = await conn.fetch(
                f"SELECT concat_ws('|', {', '.join(exprs)}) AS r FROM {source} ORDER BY 1"
            )
            digest = hashlib.sha256("\n".join(r["r"] or "" for r in rows).encode()).hexdigest()
            result[name] = (len(rows), digest[:16])
        return result
    finally:
        await conn.close()


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far (/proc/stat)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def cpu_time(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(
    label: str,
    fake: StripeFake,
    seed_db: str,
    db: str,
    bodies: list[bytes],
    replicas: int,
    unique: int,
    accounts: int,
    log: Path,
) -> dict[str, Any]:
    dsn = await harness.create_database(db, template=seed_db)
    files = [RESULTS / f"scaleout-{i}.bin" for i in range(replicas)]
    for i, file in enumerate(files):
        harness.write_deliveries(file, bodies[i::replicas])
    with harness.servers() as running:
        for i in range(replicas):
            running.append(
                harness.start_server(
                    f"replica-{i}",
                    "app.main:app",
                    harness.service_env(dsn, fake.url, workers=True),
                    log,
                )
            )
        started = time.monotonic()
        busy_before, total_before = machine_ticks()
        own_before = resource.getrusage(resource.RUSAGE_SELF)
        with ThreadPoolExecutor(replicas) as pool:
            futures = [
                pool.submit(run_wrk, server.url, file, connections=CONNECTIONS // replicas)
                for server, file in zip(running, files, strict=True)
            ]
            bursts: list[WrkResult] = [f.result() for f in futures]
        acked = time.monotonic()
        backlog = (await count_status(dsn)).get("pending", 0)

        async def drained() -> bool:
            counts = await count_status(dsn)
            done = sum(counts.get(s, 0) for s in ("processed", "ignored", "failed"))
            return done >= unique

        finished = await harness.wait_for(drained, seconds=600, interval=0.2)
        applied = time.monotonic()

        async def fees_known() -> bool:  # looked up after the events (app/webhooks/fees.py)
            conn = await asyncpg.connect(dsn)
            known = await conn.fetchval("SELECT count(*) FROM payments WHERE fee IS NOT NULL")
            await conn.close()
            return bool(known >= expected_mirror(accounts)["settled fees"])

        # the state is compared once the follow-ups after the events are done too
        await harness.wait_for(fees_known, seconds=600, interval=0.2)
        cpu_seconds = sum(cpu_time(server.process.pid) for server in running)
        busy_after, total_after = machine_ticks()
        own_after = resource.getrusage(resource.RUSAGE_SELF)
    machine_busy = (busy_after - busy_before) / max(1, total_after - total_before)
    fake_cpu = (own_after.ru_utime + own_after.ru_stime) - (
        own_before.ru_utime + own_before.ru_stime
    )
    counts = await count_status(dsn)
    conn = await asyncpg.connect(dsn)
    retried = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE attempts > 1) AS events, max(attempts) AS max_attempts,"
        " sum(attempts) AS attempts FROM stripe_events"
    )
    await conn.close()
    mirror = await mirror_check(dsn, accounts)
    shot = await snapshot(dsn)
    ack_seconds = acked - started
    rate = len(bodies) / ack_seconds
    print(
        f"{label}: {rate:,.0f} deliveries/s acknowledged ({len(bodies)} in {ack_seconds:.1f} s), "
        f"backlog {backlog}, drained {applied - acked:.1f} s later"
        f"{'' if finished else ' (TIMEOUT)'}, {json.dumps(counts)}; "
        f"{retried['events']} events applied after a retry (max attempts "
        f"{retried['max_attempts']}); service CPU {cpu_seconds:.1f} s "
        f"= {cpu_seconds / unique * 1000:.1f} ms per event stored and applied; "
        f"Stripe fake (this process) CPU {fake_cpu:.1f} s; machine CPU busy {machine_busy:.0%}",
        flush=True,
    )
    return {
        "label": label,
        "replicas": replicas,
        "ack_rate": rate,
        "ack_seconds": ack_seconds,
        "p50_ms": max(b.p50_ms for b in bursts),
        "p99_ms": max(b.p99_ms for b in bursts),
        "not_200": sum(b.non200 + b.errors for b in bursts),
        "backlog": backlog,
        "drain_seconds": applied - acked,
        "total_seconds": applied - started,
        "finished": finished,
        "counts": counts,
        "mirror_ok": mirror == expected_mirror(accounts),
        "snapshot": shot,
        "cpu_seconds": cpu_seconds,
        "cpu_ms_per_event": cpu_seconds / unique * 1000,
        "fake_cpu_seconds": fake_cpu,
        "machine_busy": machine_busy,
        "retried_events": retried["events"],
        "max_attempts": retried["max_attempts"],
    }


async def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / "scaleout-servers.log"
    log.write_bytes(b"")
    print(f"machine: {harness.machine()}")
    print(
        f"setup: {ACCOUNTS} lifecycles, +{DUPLICATES:.0%} duplicates, shuffled; "
        f"wrk, {CONNECTIONS} connections in all; background workers on",
        flush=True,
    )
    started = time.monotonic()
    fake = StripeFake().start()
    tag = f"{os.getpid()}"
    seed_db, one_db, two_db = (f"bench_{x}_{tag}" for x in ("soseed", "so1", "so2"))
    try:
        scenario = build(fake, ACCOUNTS)
        stream = deliveries(scenario.events, DUPLICATES, random.Random(11))
        bodies = [harness.event_body(event) for event in stream]
        unique = len(scenario.events)
        seed_dsn = await harness.create_database(seed_db)
        harness.migrate(seed_dsn)
        await harness.seed(seed_dsn, scenario)
        print(
            f"setup: {len(scenario.accounts)} accounts, {unique} events, {len(bodies)} deliveries; {time.monotonic() - started:.0f} s"
        )
        accounts = len(scenario.accounts)
        one = await run("1 replica ", fake, seed_db, one_db, bodies, 1, unique, accounts, log)
        two = await run("2 replicas", fake, seed_db, two_db, bodies, 2, unique, accounts, log)
        same = one["snapshot"] == two["snapshot"]
        differing = [t for t in one["snapshot"] if one["snapshot"][t] != two["snapshot"].get(t)]
        rows = [
            [
                r["label"],
                f"{r['ack_rate']:,.0f}",
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                r["not_200"],
                f"{r['drain_seconds']:.1f}",
                f"{len(bodies) / r['total_seconds']:,.0f}",
                "yes" if r["mirror_ok"] else "NO",
            ]
            for r in (one, two)
        ]
        print()
        print(
            table(
                [
                    "run",
                    "acked/s",
                    "p50 ms",
                    "p99 ms",
                    "not 200",
                    "drain s",
                    "end-to-end/s",
                    "mirror as Stripe",
                ],
                rows,
            )
        )
        print(f"\nack rate, 2 replicas / 1 replica: {two['ack_rate'] / one['ack_rate']:.2f}x")
        print(
            f"end to end, 2 replicas / 1 replica: {one['total_seconds'] / two['total_seconds']:.2f}x"
        )
        rows_compared = sum(n for n, _ in one["snapshot"].values())
        print(
            f"final state identical to one replica's: {'yes' if same else 'NO'} "
            f"({len(one['snapshot'])} tables, {rows_compared} rows compared)"
            + ("" if same else f"; differing: {differing}")
        )
        out = RESULTS / "scaleout.json"
        out.write_text(
            json.dumps(
                {"machine": harness.machine(), "one": one, "two": two, "identical": same},
                indent=2,
                default=str,
            )
        )
        print(f"results: {out}; total {time.monotonic() - started:.0f} s")
    finally:
        fake.stop()
        for name in (one_db, two_db, seed_db):
            await harness.drop_database(name)


if __name__ == "__main__":
    asyncio.run(main())
