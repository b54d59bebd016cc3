"""Read and checkout API benchmark: `bench/run api` (see bench/README.md).

1. Seeds one database straight with SQL (`INSERT ... SELECT generate_series`): ACCOUNTS accounts
   (100,000), each with a channel and its subscription (90% active, 10% canceled), an invoice,
   two subscription payments (a first one and a renewal) and a top-up payment, ten ledger
   entries (1,000,000: usage debits on half the accounts, credits on the other half), and
   1,000,000 stored, processed Stripe events.
2. One uvicorn worker of the service (the Dockerfile's command, README defaults, background
   workers off so nothing but the measured requests runs), wrk at 16 connections (bench/get.lua,
   a service token with `billing:read`), each request for a random account or channel:
   `GET /v1/channels/{id}/access`, `GET /v1/accounts/{id}/refund-eligibility`, and `GET /healthz`
   on the same server and concurrency as the floor.
3. Checkout creation (`POST /v1/accounts/{id}/checkout-sessions`, top-up, a new account each
   request, so every request is a first one: account row, Stripe customer, Checkout session)
   against the Stripe fake, one request at a time; then the same two Stripe calls made
   directly from this process with the service's own gateway and parameters. The service's
   own time is p50(request) - p50(direct Stripe calls).
4. Peak RSS (VmHWM) of the worker process after ingesting INGEST_EVENTS webhook deliveries.
5. The reads again on a server with WORKERS uvicorn worker processes (`WEB_CONCURRENCY`).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench import harness
from bench.harness import RESULTS, WrkResult, ensure_wrk, run_wrk, table
from bench.lean_http import LeanClient
from bench.scenario import build, deliveries
from tests.stripe_fake import StripeFake

ACCOUNTS = int(os.environ.get("BENCH_API_ACCOUNTS", "100000"))
LEDGER_PER_ACCOUNT = 10
EVENTS = int(os.environ.get("BENCH_API_EVENTS", "1000000"))
CONNECTIONS = int(os.environ.get("BENCH_API_CONNECTIONS", "16"))
SECONDS = int(os.environ.get("BENCH_API_SECONDS", "12"))
CHECKOUTS = int(os.environ.get("BENCH_API_CHECKOUTS", "200"))
INGEST_EVENTS = int(os.environ.get("BENCH_API_INGEST", "100000"))
WORKERS = int(os.environ.get("BENCH_API_WORKERS", "2"))
"""The reads are measured again with this many uvicorn worker processes (`WEB_CONCURRENCY`,
which the Dockerfile's uvicorn command honours); 1 skips that run."""
APP_URL = "https://app.1msg.io"

SEED_SQL = [
    """INSERT INTO accounts (id, currency, email, stripe_customer_id, first_paid_at)
       SELECT 'acc_' || i, 'usd', 'acc_' || i || '@example.com', 'cus_bench' || i,
              now() - interval '70 days'
       FROM generate_series(0, {n} - 1) i""",
    """INSERT INTO channels (id, account_id)
       SELECT 'chan_' || i, 'acc_' || i FROM generate_series(0, {n} - 1) i""",
    """INSERT INTO subscriptions (id, stripe_id, account_id, channel_id, stripe_customer_id,
           plan_code, stripe_price_id, status, cancel_at_period_end, current_period_start,
           current_period_end, canceled_at, ended_at, source_event_created)
       SELECT gen_random_uuid(), 'sub_bench' || i, 'acc_' || i, 'chan_' || i, 'cus_bench' || i,
              'channel_monthly', 'price_channel_monthly_usd',
              CASE WHEN i % 10 = 0 THEN 'canceled' ELSE 'active' END, i % 7 = 0,
              now() - interval '10 days', now() + interval '20 days',
              CASE WHEN i % 10 = 0 THEN now() - interval '1 day' END,
              CASE WHEN i % 10 = 0 THEN now() - interval '1 day' END,
              now() - interval '10 days'
       FROM generate_series(0, {n} - 1) i""",
    """INSERT INTO invoices (id, stripe_id, account_id, stripe_subscription_id, status,
           amount_due, amount_paid, currency, period_start, period_end, paid_at)
       SELECT gen_random_uuid(), 'in_bench' || k || '_' || i, 'acc_' || i, 'sub_bench' || i,
              'paid', 3900, 3900, 'usd', now() - (k * 30 + 10) * interval '1 day',
              now() - (k * 30 + 10) * interval '1 day', now() - (k * 30 + 10) * interval '1 day'
       FROM generate_series(0, {n} - 1) i, generate_series(0, 1) k""",
    """INSERT INTO payments (id, stripe_id, account_id, purpose, stripe_invoice_id,
           stripe_subscription_id, stripe_charge_id, amount, currency, status, fee, paid_at)
       SELECT gen_random_uuid(), 'pi_bench' || k || '_' || i, 'acc_' || i, 'subscription',
              'in_bench' || k || '_' || i, 'sub_bench' || i, 'ch_bench' || k || '_' || i,
              3900, 'usd', 'succeeded', 143, now() - (k * 30 + 10) * interval '1 day'
       FROM generate_series(0, {n} - 1) i, generate_series(0, 1) k""",
    """INSERT INTO payments (id, stripe_id, account_id, purpose, stripe_checkout_session_id,
           stripe_charge_id, amount, currency, status, fee, paid_at)
       SELECT gen_random_uuid(), 'pi_benchtu_' || i, 'acc_' || i, 'top_up', 'cs_bench' || i,
              'ch_benchtu_' || i, 5000, 'usd', 'succeeded', 175, now() - interval '5 days'
       FROM generate_series(0, {n} - 1) i""",
    """INSERT INTO ledger_entries (account_id, kind, source_id, amount, currency, description,
           occurred_at)
       SELECT 'acc_' || (g / {per}),
              CASE WHEN (g / {per}) % 2 = 0 AND g % {per} > 0 THEN 'conversation'
                   WHEN g % {per} = 0 THEN 'top_up' ELSE 'balance_credit' END,
              'src_bench' || g,
              CASE WHEN (g / {per}) % 2 = 0 AND g % {per} > 0 THEN -25 ELSE 500 END,
              'usd', 'bench', now() - (g % 60) * interval '1 day'
       FROM generate_series(0, {n} * {per} - 1) g""",
    """INSERT INTO stripe_events (stripe_id, type, api_version, object_id, stripe_created,
           livemode, payload, received_at, status, attempts, processed_at)
       SELECT 'evt_bench' || g, 'invoice.paid', '2025-09-30.clover', 'in_bench0_' || (g % {n}),
              now() - (g % 5000) * interval '1 minute', false,
              jsonb_build_object('id', 'evt_bench' || g, 'object', 'event',
                  'type', 'invoice.paid', 'livemode', false,
                  'data', jsonb_build_object('object', jsonb_build_object(
                      'id', 'in_bench0_' || (g % {n}), 'object', 'invoice',
                      'customer', 'cus_bench' || (g % {n}), 'amount_paid', 3900,
                      'currency', 'usd', 'status', 'paid'))),
              now() - (g % 5000) * interval '1 minute', 'processed', 1, now()
       FROM generate_series(0, {events} - 1) g""",
]


async def seed_big(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET synchronous_commit = off")
        for sql in SEED_SQL:
            await conn.execute(sql.format(n=ACCOUNTS, per=LEDGER_PER_ACCOUNT, events=EVENTS))
        await conn.execute("VACUUM ANALYZE")
        counts = {}
        for name in ("accounts", "channels", "subscriptions", "payments", "ledger_entries"):
            counts[name] = await conn.fetchval(f"SELECT count(*) FROM {name}")
        counts["stripe_events"] = await conn.fetchval("SELECT count(*) FROM stripe_events")
        return counts
    finally:
        await conn.close()


def wrk_get(
    url: str,
    path: str,
    ids: int,
    token: str,
    seconds: int,
    connections: int = CONNECTIONS,
    rate: float = 0.0,
) -> WrkResult:
    """wrk on one thread: flat out (closed loop), or offering `rate` requests/s in all with
    Poisson arrivals (bench/get.lua)."""
    command = [
        ensure_wrk(),
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(harness.ROOT / "bench" / "get.lua"),
        url,
        "--",
        path,
        str(ids),
        str(rate),
        str(connections),
    ]
    done = subprocess.run(
        command, env={**os.environ, "BENCH_TOKEN": token}, capture_output=True, text=True
    )
    return harness.wrk_result(done.stdout, done.stderr)


TARGETS = {
    "GET /healthz (floor)": ("/healthz", 1),
    "GET /v1/channels/{id}/access": ("/v1/channels/chan_%d/access", ACCOUNTS),
    "GET /v1/accounts/{id}/refund-eligibility": (
        "/v1/accounts/acc_%d/refund-eligibility",
        ACCOUNTS,
    ),
}


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its children (uvicorn's workers) so far."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):  # the process or a child
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@dataclass
class Reads:
    """The read routes on one server: flat out, paced, one connection; CPU per request."""

    peak: dict[str, WrkResult]
    """CONNECTIONS connections, closed loop (each sends again as soon as it is answered)."""
    paced: dict[str, WrkResult]
    """CONNECTIONS connections offering `offered` requests/s with Poisson arrivals."""
    offered: dict[str, float]
    single: dict[str, WrkResult]
    """One connection, closed loop: a request's own time, no queue."""
    cpu_ms: dict[str, float]
    paced_cpu_ms: dict[str, float]


def measure_reads(url: str, token: str, pid: int, offered: dict[str, float] | None = None) -> Reads:
    """Each read route at CONNECTIONS connections for SECONDS flat out, then paced at the
    `offered` rate (default: half the peak just measured), then with one connection; and the
    service's CPU milliseconds per request (the figure the machine's load moves least)."""
    for path, ids in TARGETS.values():  # warm-up
        wrk_get(url, path, ids, token, 3)
    peak: dict[str, WrkResult] = {}
    paced: dict[str, WrkResult] = {}
    rates: dict[str, float] = {}
    cpu_ms: dict[str, float] = {}
    paced_cpu_ms: dict[str, float] = {}

    def run(label: str, path: str, ids: int, rate: float = 0.0) -> tuple[WrkResult, float]:
        """One wrk run, printed, with the service's CPU ms per request."""
        before = cpu_seconds(pid)
        r = wrk_get(url, path, ids, token, SECONDS, rate=rate)
        cpu = (cpu_seconds(pid) - before) * 1000 / max(1, r.requests)
        print(
            f"{label:42s} {r.rate:7,.0f} req/s  p50 {r.p50_ms:6.2f}  p95 {r.p95_ms:6.2f}"
            f"  p99 {r.p99_ms:6.2f} ms  not 200: {r.non200 + r.errors}  CPU {cpu:.2f} ms/req",
            flush=True,
        )
        return r, cpu

    for name, (path, ids) in TARGETS.items():
        peak[name], cpu_ms[name] = run(name, path, ids)
        rates[name] = rate = offered[name] if offered else peak[name].rate / 2
        paced[name], paced_cpu_ms[name] = run(f"  paced, {rate:,.0f}/s offered", path, ids, rate)
    single: dict[str, WrkResult] = {}
    for name, (path, ids) in TARGETS.items():
        single[name] = r = wrk_get(url, path, ids, token, 5, connections=1)
        print(
            f"{name:42s} 1 connection: p50 {r.p50_ms:6.2f}  p99 {r.p99_ms:6.2f} ms",
            flush=True,
        )
    return Reads(peak, paced, rates, single, cpu_ms, paced_cpu_ms)


def reads_table(reads: Reads) -> str:
    rows = []
    for name, target in zip(TARGETS, ["", "p99 <= 5", "p99 <= 20"], strict=True):
        r, p, s = reads.peak[name], reads.paced[name], reads.single[name]
        rows.append(
            [
                name,
                "peak (closed loop)",
                "",
                f"{r.rate:,.0f}",
                f"{r.p50_ms:.2f}",
                f"{r.p95_ms:.2f}",
                f"{r.p99_ms:.2f}",
                r.non200 + r.errors,
                f"{s.p50_ms:.2f} / {s.p99_ms:.2f}",
                f"{reads.cpu_ms[name]:.2f}",
                target,
            ]
        )
        rows.append(
            [
                "",
                "paced (Poisson)",
                f"{reads.offered[name]:,.0f}",
                f"{p.rate:,.0f}",
                f"{p.p50_ms:.2f}",
                f"{p.p95_ms:.2f}",
                f"{p.p99_ms:.2f}",
                p.non200 + p.errors,
                "",
                f"{reads.paced_cpu_ms[name]:.2f}",
                target,
            ]
        )
    return table(
        [
            "request",
            "load",
            "offered/s",
            "req/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "not 200",
            "1 conn p50/p99",
            "CPU ms/req",
            "target ms",
        ],
        rows,
    )


def memory(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS of a process, kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def service_settings(env: dict[str, str]) -> Any:
    from app.config import Settings

    saved = dict(os.environ)
    try:
        os.environ.update(env)
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def checkout_timings(
    url: str, env: dict[str, str], fake_url: str, pid: int
) -> dict[str, Any]:
    """Service request time vs the same Stripe calls made directly (both one at a time)."""
    from app.auth import mint_token

    settings = service_settings(env)
    body = {
        "purpose": "top_up",
        "amount": 5000,
        "currency": "usd",
        "success_url": f"{APP_URL}/balance/done",
        "cancel_url": f"{APP_URL}/balance",
    }
    run_tag = uuid.uuid4().hex[:6]
    service: list[float] = []
    statuses: dict[int, int] = {}
    cpu_before = 0.0
    host, _, port = url.removeprefix("http://").partition(":")
    async with LeanClient(host, int(port)) as client:  # httpx's own work is not the service's
        for i in range(-20, CHECKOUTS):  # 20 warm-up requests, not counted
            if i == 0:
                cpu_before = cpu_seconds(pid)
            account = f"acc_ck_{run_tag}_{i + 20}"
            token = mint_token(
                settings, sub=f"user_{account}", account_id=account, email=f"{account}@example.com"
            )
            headers = {"authorization": f"Bearer {token}", "idempotency-key": uuid.uuid4().hex}
            status, _, elapsed_ms = await client.request(
                "POST", f"/v1/accounts/{account}/checkout-sessions", headers, body
            )
            if i >= 0:
                statuses[status] = statuses.get(status, 0) + 1
                service.append(elapsed_ms)
    service_cpu_ms = (cpu_seconds(pid) - cpu_before) * 1000 / CHECKOUTS
    # The direct calls run in a process of their own, as the service's do (this process hosts
    # the fake's thread).
    result = subprocess.run(
        [sys.executable, "-m", "bench.direct_checkout", fake_url, str(CHECKOUTS)],
        env={**os.environ, **env},
        cwd=harness.ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    direct: list[float] = json.loads(result.stdout)["pair"]
    return {
        "statuses": statuses,
        "service_p50": statistics.median(service),
        "service_p95": percentile(service, 0.95),
        "direct_p50": statistics.median(direct),
        "direct_p95": percentile(direct, 0.95),
        "added_p50": statistics.median(service) - statistics.median(direct),
        "service_cpu_ms": service_cpu_ms,
    }


async def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / "api-servers.log"
    log.write_bytes(b"")
    print(f"machine: {harness.machine()}")
    started = time.monotonic()
    fake = StripeFake().start()
    db = f"bench_api_{os.getpid()}"
    summary: dict[str, Any] = {"machine": harness.machine()}
    try:
        dsn = await harness.create_database(db)
        harness.migrate(dsn)
        counts = await seed_big(dsn)
        seeded = time.monotonic() - started
        print(f"seeded in {seeded:.0f} s: {json.dumps(counts)}", flush=True)
        summary["seed"] = {"seconds": seeded, "counts": counts}
        # events to ingest for the memory figure, built while nothing is measured
        scenario = build(fake, -(-INGEST_EVENTS // 22) + 25)  # 22 events per lifecycle
        stream = deliveries(scenario.events[:INGEST_EVENTS], 0.0, random.Random(5))
        bodies = [harness.event_body(e) for e in stream]
        print(f"built {len(bodies)} webhook deliveries; {time.monotonic() - started:.0f} s")
        env = {
            **harness.service_env(dsn, fake.url, workers=False),
            "REDIRECT_ALLOWED_ORIGINS": APP_URL,
            "STRIPE_SESSIONS_PER_ACCOUNT_PER_MINUTE": "1000",
            "WEB_CONCURRENCY": "1",
        }
        settings = service_settings(env)
        from app.auth import mint_token

        reader = mint_token(settings, sub="bench-reader", scope="billing:read", ttl_seconds=7200)
        with harness.servers() as running:
            server = harness.start_server("service", "app.main:app", env, log)
            running.append(server)
            pid = server.process.pid
            print(f"service pid {pid}, at start {memory(pid)}", flush=True)
            reads = measure_reads(server.url, reader, pid)
            after_reads = memory(pid)
            checkout = await checkout_timings(server.url, env, fake.url, pid)
            print(
                f"checkout: service p50 {checkout['service_p50']:.2f} ms, direct Stripe calls p50 "
                f"{checkout['direct_p50']:.2f} ms, added {checkout['added_p50']:.2f} ms, "
                f"service CPU {checkout['service_cpu_ms']:.2f} ms per request "
                f"(statuses {checkout['statuses']})",
                flush=True,
            )
            before_ingest = memory(pid)
            file = RESULTS / "api-deliveries.bin"
            harness.write_deliveries(file, bodies)
            ingest_started = time.monotonic()
            ingest = run_wrk(server.url, file, connections=64, max_seconds=600)
            ingest_seconds = time.monotonic() - ingest_started
            after_ingest = memory(pid)
            print(
                f"ingested {ingest.requests} deliveries in {ingest_seconds:.0f} s "
                f"({ingest.rate:,.0f}/s, not 200: {ingest.non200 + ingest.errors}); "
                f"memory {after_ingest}",
                flush=True,
            )
            server.stop()
            many: Reads | None = None
            if WORKERS > 1:
                pool = harness.start_server(
                    f"service x{WORKERS}",
                    "app.main:app",
                    {**env, "WEB_CONCURRENCY": str(WORKERS)},
                    log,
                )
                running.append(pool)
                time.sleep(3)  # every worker up (the port answers as soon as the first one is)
                print(f"\nreads with {WORKERS} uvicorn workers:", flush=True)
                # the same offered rates as the one worker's paced runs
                many = measure_reads(pool.url, reader, pool.process.pid, reads.offered)
        print(
            f"\n{CONNECTIONS} connections, {SECONDS} s each: flat out, then offering half that "
            "peak with Poisson arrivals; one uvicorn worker:"
        )
        print(reads_table(reads))
        if many is not None:
            print(
                f"\nthe same with {WORKERS} uvicorn workers (WEB_CONCURRENCY={WORKERS}), paced at "
                "the one worker's offered rates:"
            )
            print(reads_table(many))
        print()
        print(
            table(
                ["measure", "value", "target"],
                [
                    [
                        "checkout request p50 / p95 (one at a time)",
                        f"{checkout['service_p50']:.2f} / {checkout['service_p95']:.2f} ms",
                        "",
                    ],
                    [
                        "same Stripe calls direct p50 / p95",
                        f"{checkout['direct_p50']:.2f} / {checkout['direct_p95']:.2f} ms",
                        "",
                    ],
                    ["service's own time p50", f"{checkout['added_p50']:.2f} ms", "<= 5 ms"],
                    [
                        "service CPU per checkout (incl. its Stripe SDK calls)",
                        f"{checkout['service_cpu_ms']:.2f} ms",
                        "",
                    ],
                    ["worker VmHWM after the reads", f"{after_reads['VmHWM'] / 1024:.0f} MB", ""],
                    [
                        f"worker VmHWM after ingesting {ingest.requests:,} events",
                        f"{after_ingest['VmHWM'] / 1024:.0f} MB "
                        f"(before: {before_ingest['VmHWM'] / 1024:.0f} MB; "
                        f"VmRSS now {after_ingest['VmRSS'] / 1024:.0f} MB)",
                        "<= 200 MB",
                    ],
                ],
            )
        )
        summary |= {
            "reads": asdict(reads),
            "workers": WORKERS,
            "reads_workers": asdict(many) if many else None,
            "checkout": checkout,
            "memory": {
                "after_reads": after_reads,
                "before_ingest": before_ingest,
                "after_ingest": after_ingest,
            },
            "ingest": vars(ingest),
        }
        out = RESULTS / "api.json"
        out.write_text(json.dumps(summary, indent=2, default=str))
        print(f"\nresults: {out}; total {time.monotonic() - started:.0f} s")
    finally:
        fake.stop()
        await harness.drop_database(db)


if __name__ == "__main__":
    asyncio.run(main())
