"""Time (and optionally profile) the event processor alone, in this process:
`PYTHONPATH=. python -m bench.profile_processor [accounts] [cprofile|handlers]`.

Stores the benchmark stream (bench/scenario.py lifecycles, 10% duplicates, shuffled) straight
into `stripe_events`, then drains it with `EventProcessor` against the Stripe fake and prints
events/s, then checks every account's mirror as `bench/run ingestion` does. It counts the SQL
statements SQLAlchemy sends, and every execution Postgres runs (`count_executions`: the
driver path's statements too, and one per row of an `executemany`). With `cprofile`,
writes bench/results/profile-processor.txt (cumulative and own time); with `handlers`, prints
the event loop's CPU time spent in each group handler (what runs meanwhile, such as a
fee look-up task, counts to it). A drain includes the fee look-ups (app/webhooks/fees.py)."""

from __future__ import annotations

import asyncio
import cProfile
import gc
import io
import os
import pstats
import random
import sys
import time
from typing import Any

from sqlalchemy import event

from bench import harness
from bench.harness import RESULTS
from bench.ingestion import count_status, expected_mirror, mirror_check
from bench.scenario import build, deliveries
from tests.stripe_fake import StripeFake


async def main() -> None:
    accounts = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    mode = sys.argv[2] if len(sys.argv) > 2 else ""
    profile = mode == "cprofile"
    RESULTS.mkdir(parents=True, exist_ok=True)
    fake = StripeFake().start()
    name = f"bench_proc_{os.getpid()}"
    try:
        scenario = build(fake, accounts)
        stream = deliveries(scenario.events, 0.1, random.Random(7))
        dsn = await harness.create_database(name)
        harness.migrate(dsn)
        await harness.seed(dsn, scenario)
        os.environ.update(harness.service_env(dsn, fake.url, workers=False))

        from app.config import get_settings
        from app.db import create_engine, create_session_factory
        from app.observability import configure_logging
        from app.stripe_gateway import StripeGateway
        from app.webhooks import metrics
        from app.webhooks.ingest import incoming_event, insert_events
        from app.webhooks.processor import EventProcessor

        settings = get_settings()
        configure_logging(settings.log_level)  # JSON lines, as `billing process-events` logs
        engine = create_engine(settings.database_url, settings.database_pool_size)
        async with engine.connect() as connection:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            await insert_events(connection, [incoming_event(e, livemode=False) for e in stream])
        statements: dict[str, int] = {}

        def count(conn: object, cursor: object, statement: str, *args: object) -> None:
            key = " ".join(statement.split())[:90]
            statements[key] = statements.get(key, 0) + 1

        event.listen(engine.sync_engine, "before_cursor_execute", count)
        gateway = StripeGateway.from_settings(settings)
        processors = [
            EventProcessor(
                create_session_factory(engine),
                settings,
                gateway,
                batch_size=int(os.environ.get("PROC_BATCH", "0")) or None,  # else the setting
            )
            for _ in range(int(os.environ.get("PROC_WORKERS", "1")))
        ]
        handler_cpu = time_handlers() if mode == "handlers" else {}
        executions = count_executions()
        calls_before = len(fake.requests)
        gc.freeze()  # as `billing process-events` and the web app do once started
        profiler = cProfile.Profile() if profile else None
        print(f"draining (pid {os.getpid()})", flush=True)  # a profiler may attach now
        started = time.perf_counter()
        cpu_started = time.thread_time()
        postgres_started = harness.postgres_cpu_seconds()
        if profiler:
            profiler.enable()
        attempted = sum(await asyncio.gather(*(p.drain() for p in processors)))
        if profiler:
            profiler.disable()
        elapsed = time.perf_counter() - started
        cpu = time.thread_time() - cpu_started
        postgres_cpu = harness.postgres_cpu_seconds() - postgres_started
        counts = await count_status(dsn)
        mirror = await mirror_check(dsn, accounts)
        print(
            f"{len(scenario.events)} events ({attempted} attempted) in {elapsed:.2f} s: "
            f"{len(scenario.events) / elapsed:,.0f} events/s, "
            f"{cpu / len(scenario.events) * 1000:.2f} ms CPU/event (event loop thread; the fake runs in its own), "
            f"Postgres {postgres_cpu / len(scenario.events) * 1000:.2f} ms; "
            f"{counts}; mirror as at Stripe: {mirror == expected_mirror(accounts)}; "
            f"conflict retries: {metrics.CONFLICTS._value.get():.0f}; "
            f"Stripe calls: {len(fake.requests) - calls_before}"
        )
        if mirror != expected_mirror(accounts):
            print(mirror, expected_mirror(accounts))
        total = sum(statements.values())
        print(f"SQL statements: {total} ({total / len(scenario.events):.1f} per event); top:")
        for key, n in sorted(statements.items(), key=lambda kv: -kv[1])[:25]:
            print(f"{n:7d}  {key}")
        total = sum(executions.values())
        print(
            f"Postgres executions (asyncpg; an executemany runs once per row): {total} "
            f"({total / len(scenario.events):.1f} per event); top:"
        )
        for key, n in sorted(executions.items(), key=lambda kv: -kv[1])[:25]:
            print(f"{n:7d}  {key}")
        for name, (calls, seconds) in sorted(handler_cpu.items(), key=lambda kv: -kv[1][1]):
            print(
                f"{seconds * 1000:9.0f} ms CPU  {calls:5d} calls  {name}"
                f"  ({seconds / cpu:.0%} of the event loop's)"
            )
        if profiler:
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("cumulative").print_stats(60)
            stats.sort_stats("tottime").print_stats(40)
            path = RESULTS / "profile-processor.txt"
            path.write_text(out.getvalue())
            print(f"profile: {path}; own time by package:")
            for package, seconds in own_time_by_package(stats):
                print(f"{seconds:8.2f} s  {package}")
        await gateway.close()
        await engine.dispose()
    finally:
        fake.stop()
        await harness.drop_database(name)


def own_time_by_package(stats: pstats.Stats) -> list[tuple[str, float]]:
    """The profile's own (not cumulative) time summed per installed package, per module of
    `app`, and for the standard library and built-ins, largest first."""
    totals: dict[str, float] = {}
    for (filename, _, _), row in stats.stats.items():  # type: ignore[attr-defined]
        if "site-packages/" in filename:
            package = filename.split("site-packages/")[1].split("/")[0]
        elif "/app/" in filename:
            package = "app/" + filename.split("/app/")[1]
        elif filename.startswith("~") or filename.startswith("<"):
            package = "built-ins"
        else:
            package = "standard library"
        totals[package] = totals.get(package, 0.0) + row[2]
    return sorted(totals.items(), key=lambda kv: -kv[1])[:25]


def count_executions() -> dict[str, int]:
    """Count, by statement, every execution asyncpg asks Postgres for from now on (whether
    SQLAlchemy or the driver path of app/db.py sends it): an `executemany` counts once per
    row, as Postgres runs it once per row."""
    from asyncpg.connection import Connection
    from asyncpg.prepared_stmt import PreparedStatement

    counts: dict[str, int] = {}

    def add(query: str, n: int) -> None:
        key = " ".join(query.split())[:90]
        counts[key] = counts.get(key, 0) + n

    def counted(original: Any) -> Any:
        async def wrapper(self: Connection, query: str, *args: Any, **kwargs: Any) -> Any:
            add(query, 1)
            return await original(self, query, *args, **kwargs)

        return wrapper

    async def executemany(self: Connection, query: str, args: Any, **kwargs: Any) -> Any:
        rows = list(args)
        add(query, len(rows))
        return await many(self, query, rows, **kwargs)

    def counted_prepared(original: Any) -> Any:
        async def wrapper(self: PreparedStatement, *args: Any, **kwargs: Any) -> Any:
            add(self.get_query(), 1)
            return await original(self, *args, **kwargs)

        return wrapper

    many = Connection.executemany
    for name in ("execute", "fetch", "fetchrow", "fetchval"):
        setattr(Connection, name, counted(getattr(Connection, name)))
    for name in ("fetch", "fetchrow", "fetchval"):
        setattr(PreparedStatement, name, counted_prepared(getattr(PreparedStatement, name)))
    Connection.executemany = executemany  # type: ignore[method-assign]
    return counts


def time_handlers() -> dict[str, list[float]]:
    """Wrap every group handler to add up the event loop's CPU time in each."""
    from app.webhooks import handlers

    totals: dict[str, list[float]] = {}

    def timed(function: Any) -> Any:
        entry = totals.setdefault(function.__name__, [0, 0.0])

        async def wrapper(arg: Any) -> None:
            started = time.thread_time()
            try:
                await function(arg)
            finally:
                entry[0] += 1
                entry[1] += time.thread_time() - started

        return wrapper

    table = handlers.GROUP_HANDLERS
    wrapped = {function: timed(function) for function in set(table.values())}
    table.update({key: wrapped[function] for key, function in table.items()})
    return totals


if __name__ == "__main__":
    asyncio.run(main())
