"""Checkout's own time against a Stripe that answers at once: `bench/run checkout`.

The service (one uvicorn worker, the Dockerfile's command line, real Postgres) talks to
bench/instant_stripe.py (its own uvicorn process: no validation, a canned object per call), so a
request's latency is almost all the service's own. Per round and source tree, one at a time:

- **first**: `POST /v1/accounts/{id}/checkout-sessions` (top-up, 5,000 usd) for a new account
  with a new `Idempotency-Key` (account row, Stripe customer, pending row, Checkout session,
  recorded result and stored response);
- **returning**: the same for one account that already has its customer (the common case);
- **direct**: the same Stripe calls (customer + session, and session alone) made with the
  service's `StripeGateway` from a process of its own against the same stand-in.

Own time = p50(request) - p50(the direct calls it makes), per round (the direct calls are
made after each round, so both see the machine as it was), and the median of the rounds. Requests are timed by
bench/lean_http.py on one keep-alive connection (httpx's own client-side work, ~2 ms a request
here, is the load generator's time, not the service's; it was counted before issue #7's third
pass). Also printed: the service's CPU per
request (`/proc/<pid>/stat`, the figure the machine's load moves least), the database's commits
per request (`pg_stat_database.xact_commit`), `GET /healthz` one at a time (the HTTP floor).

`BENCH_CHECKOUT_BASE=<dir>` also runs the service from another source tree (e.g. `git archive
<commit> app | tar -x -C <dir>`), alternating rounds with this one in the same run, for a
before/after comparison. Knobs: `BENCH_CHECKOUT_ROUNDS` (3), `BENCH_CHECKOUT_N` (100 per kind
and round).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench import harness
from bench.api import cpu_seconds, percentile, service_settings
from bench.harness import RESULTS, ROOT
from bench.lean_http import LeanClient

APP_URL = "https://app.1msg.io"
ROUNDS = int(os.environ.get("BENCH_CHECKOUT_ROUNDS", "3"))
N = int(os.environ.get("BENCH_CHECKOUT_N", "100"))
BODY = {
    "purpose": "top_up",
    "amount": 5000,
    "currency": "usd",
    "success_url": f"{APP_URL}/balance/done",
    "cancel_url": f"{APP_URL}/balance",
}


def start(name: str, target: str, env: dict[str, str], cwd: Path, log: Path) -> harness.Server:
    """harness.start_server, from source tree `cwd`."""
    port = harness.free_port()
    process = subprocess.Popen(
        [sys.executable, *harness.UVICORN, "--port", str(port), target],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(cwd)},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    server = harness.Server(name, port, process)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited at start; see {log}")
        try:
            httpx.get(f"{server.url}/healthz", timeout=0.5)
            return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{name} did not start; see {log}")


async def commits(dsn: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        value = await connection.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
        return int(value)
    finally:
        await connection.close()


async def timed_posts(
    client: LeanClient, settings: Any, accounts: list[str]
) -> tuple[list[float], dict[int, int]]:
    durations: list[float] = []
    statuses: dict[int, int] = {}
    for account in accounts:
        token = f"Bearer {TOKENS.setdefault(account, mint(settings, account))}"
        headers = {"authorization": token, "idempotency-key": uuid.uuid4().hex}
        status, _, elapsed = await client.request(
            "POST", f"/v1/accounts/{account}/checkout-sessions", headers, BODY
        )
        durations.append(elapsed)
        statuses[status] = statuses.get(status, 0) + 1
    return durations, statuses


def direct_calls(stripe_url: str, env: dict[str, str]) -> dict[str, list[float]]:
    """The Stripe calls of a checkout made directly (bench/direct_checkout.py), N of each."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.direct_checkout", stripe_url, str(N)],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    durations: dict[str, list[float]] = json.loads(result.stdout)
    return durations


def own_per_round(samples: list[float], direct_p50s: list[float]) -> list[float]:
    """Each round's p50 request time minus that round's p50 of the direct calls."""
    return [
        statistics.median(samples[r * N : (r + 1) * N]) - direct
        for r, direct in enumerate(direct_p50s)
    ]


TOKENS: dict[str, str] = {}


def mint(settings: Any, account: str) -> str:
    from app.auth import mint_token

    return mint_token(
        settings, sub=f"user_{account}", account_id=account, email=f"{account}@example.com"
    )


class Variant:
    def __init__(self, label: str, tree: Path) -> None:
        self.label = label
        self.tree = tree
        self.samples: dict[str, list[float]] = {"first": [], "returning": [], "healthz": []}
        self.cpu_ms: dict[str, list[float]] = {"first": [], "returning": []}
        self.commits: dict[str, list[float]] = {"first": [], "returning": []}
        self.statuses: dict[int, int] = {}


async def measure_round(
    variant: Variant, server: harness.Server, dsn: str, settings: Any, tag: str
) -> None:
    pid = server.process.pid
    async with LeanClient("127.0.0.1", server.port) as client:
        for _ in range(20):
            _, _, elapsed = await client.request("GET", "/healthz")
            variant.samples["healthz"].append(elapsed)
        returning = f"acc_ret_{tag}"
        await timed_posts(client, settings, [f"acc_warm_{tag}_{i}" for i in range(10)])
        await timed_posts(client, settings, [returning] * 5)
        for kind, accounts in (
            ("first", [f"acc_first_{tag}_{i}" for i in range(N)]),
            ("returning", [returning] * N),
        ):
            await asyncio.sleep(2.5)  # let the backends report their statistics
            commits_before = await commits(dsn)
            cpu_before = cpu_seconds(pid)
            durations, statuses = await timed_posts(client, settings, accounts)
            cpu_after = cpu_seconds(pid)
            await asyncio.sleep(2.5)
            commits_after = await commits(dsn)
            variant.samples[kind] += durations
            variant.cpu_ms[kind].append((cpu_after - cpu_before) * 1000 / N)
            # minus the one commit of our own statistics query
            variant.commits[kind].append((commits_after - commits_before - 1) / N)
            for status, count in statuses.items():
                variant.statuses[status] = variant.statuses.get(status, 0) + count


async def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / "checkout-servers.log"
    log.write_bytes(b"")
    print(f"machine: {harness.machine()}", flush=True)
    variants = [Variant("this tree", ROOT)]
    base = os.environ.get("BENCH_CHECKOUT_BASE")
    if base:
        variants.insert(0, Variant(f"base ({base})", Path(base).resolve()))
    databases: list[str] = []
    summary: dict[str, Any] = {"machine": harness.machine(), "rounds": ROUNDS, "n": N}
    try:
        with harness.servers() as running:
            stripe = harness.start_server(
                "instant-stripe", "bench.instant_stripe:app", dict(os.environ), log
            )
            running.append(stripe)
            servers: list[tuple[Variant, harness.Server, str, Any]] = []
            env: dict[str, str] = {}
            for index, variant in enumerate(variants):
                name = f"bench_checkout_{os.getpid()}_{index}"
                databases.append(name)
                dsn = await harness.create_database(name)
                harness.migrate(dsn)
                env = {
                    **harness.service_env(dsn, stripe.url, workers=False),
                    "REDIRECT_ALLOWED_ORIGINS": APP_URL,
                    "STRIPE_SESSIONS_PER_ACCOUNT_PER_MINUTE": "1000000",
                    "WEB_CONCURRENCY": "1",
                }
                server = start(f"service-{index}", "app.main:app", env, variant.tree, log)
                running.append(server)
                servers.append((variant, server, dsn, service_settings(env)))
            direct_rounds: list[dict[str, list[float]]] = []
            for round_ in range(ROUNDS):
                for variant, server, dsn, settings in servers:
                    await measure_round(
                        variant, server, dsn, settings, f"{uuid.uuid4().hex[:6]}_{round_}"
                    )
                    first = statistics.median(variant.samples["first"][-N:])
                    again = statistics.median(variant.samples["returning"][-N:])
                    print(
                        f"round {round_ + 1} {variant.label}: request p50 first {first:.2f} ms, "
                        f"returning {again:.2f} ms",
                        flush=True,
                    )
                # the direct calls in every round: the machine's speed moves between rounds
                direct_rounds.append(direct_calls(stripe.url, env))
    finally:
        for name in databases:
            await harness.drop_database(name)
    pairs = [statistics.median(d["pair"]) for d in direct_rounds]
    singles = [statistics.median(d["session"]) for d in direct_rounds]
    rows = []
    own: dict[str, tuple[list[float], list[float]]] = {}
    for variant in variants:
        own[variant.label] = (
            own_per_round(variant.samples["first"], pairs),
            own_per_round(variant.samples["returning"], singles),
        )
        first = statistics.median(variant.samples["first"])
        again = statistics.median(variant.samples["returning"])
        rows.append(
            [
                variant.label,
                f"{first:.2f} / {percentile(variant.samples['first'], 0.95):.2f}",
                f"{statistics.median(own[variant.label][0]):.2f}",
                f"{statistics.median(variant.cpu_ms['first']):.2f}",
                f"{statistics.median(variant.commits['first']):.2f}",
                f"{again:.2f} / {percentile(variant.samples['returning'], 0.95):.2f}",
                f"{statistics.median(own[variant.label][1]):.2f}",
                f"{statistics.median(variant.cpu_ms['returning']):.2f}",
                f"{statistics.median(variant.commits['returning']):.2f}",
                f"{statistics.median(variant.samples['healthz']):.2f}",
                json.dumps(variant.statuses),
            ]
        )
        summary[variant.label] = {
            "samples": variant.samples,
            "cpu_ms": variant.cpu_ms,
            "commits": variant.commits,
            "statuses": variant.statuses,
        }
    summary["direct"] = direct_rounds
    for label, (firsts, returning) in own.items():
        per_round = ", ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(firsts, returning, strict=True))
        print(f"own time p50 per round, first / returning, {label}: {per_round} ms")
    print(
        "\ndirect Stripe calls to the instant stand-in, p50 per round: customer + session "
        f"{', '.join(f'{p:.2f}' for p in pairs)} ms, session alone "
        f"{', '.join(f'{p:.2f}' for p in singles)} ms; {ROUNDS} rounds x {N} requests per kind"
    )
    print(
        harness.table(
            [
                "service",
                "first p50/p95 ms",
                "own p50",
                "CPU ms",
                "commits",
                "returning p50/p95 ms",
                "own p50",
                "CPU ms",
                "commits",
                "/healthz p50",
                "statuses",
            ],
            rows,
        )
    )
    (RESULTS / "checkout.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    asyncio.run(main())
