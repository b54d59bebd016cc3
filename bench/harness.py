"""Shared machinery of the benchmarks: databases, processes, signing, wrk."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench.scenario import Scenario

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _dev_postgres_dsn() -> str:
    """The Postgres of `bin/dev db` through its Unix socket when found, else over TCP.

    Every target of a run (the service and the reference alike) connects the same way. The
    socket is what a service on the database's host uses, and closer than TCP loopback to a
    database on another host in what a round trip costs the client: over loopback the
    sending process also pays the receiving side's TCP work, ~70 us of CPU per query more
    here (a prepared `SELECT $1`: ~130 us over TCP, ~55 us over the socket)."""
    port = os.environ.get("LOCAL_PG_PORT", "54329")
    root_only = "/tmp/onemsg-billing-pg-" + hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]
    for folder in (ROOT / ".local" / "postgres", Path(root_only)):
        if (folder / f".s.PGSQL.{port}").exists():
            return f"postgresql://postgres@/postgres?host={folder}&port={port}"
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


ADMIN_DSN = os.environ.get("BENCH_ADMIN_DSN") or _dev_postgres_dsn()
WEBHOOK_SECRET = "whsec_bench_" + "d" * 32
STRIPE_KEY = "sk_test_bench_" + "e" * 32
JWT_SECRET = "bench-jwt-secret-" + "f" * 32
# exactly the Dockerfile's command line (uvloop + httptools are picked up automatically)
UVICORN = [
    "-m",
    "uvicorn",
    "--host",
    "127.0.0.1",
    "--proxy-headers",
    "--no-server-header",
    "--no-access-log",
]


def dsn_for(name: str) -> str:
    """ADMIN_DSN naming database `name` (its `?host=...&port=...` query kept)."""
    base, _, query = ADMIN_DSN.partition("?")
    return base.rpartition("/")[0] + "/" + name + ("?" + query if query else "")


def sqlalchemy_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+asyncpg://")


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def create_database(name: str, template: str | None = None) -> str:
    await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    return dsn_for(name)


async def drop_database(name: str) -> None:
    await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrate(dsn: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": sqlalchemy_url(dsn), "APP_ENV": "development"},
        check=True,
        capture_output=True,
    )


async def seed(dsn: str, scenario: Scenario) -> None:
    """The rows the checkout API writes before Stripe's events (as tests/webhooks/flows.py)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            "INSERT INTO accounts (id, stripe_customer_id) VALUES ($1, $2)", scenario.accounts
        )
        await conn.executemany(
            "INSERT INTO checkout_sessions (id, account_id, purpose, plan_code, amount, currency,"
            " status, stripe_id, success_url, cancel_url, url) VALUES ($1, $2, $3, $4, $5, 'usd',"
            " 'open', $6::text, 'https://app.1msg.io/ok', 'https://app.1msg.io/cancel', "
            "'https://checkout.stripe.com/c/pay/' || $6::text)",
            scenario.checkouts,
        )
    finally:
        await conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def service_env(dsn: str, stripe_url: str, *, workers: bool) -> dict[str, str]:
    """The README's defaults, with real (non-placeholder) secrets as production requires."""
    return {
        **os.environ,
        "APP_ENV": "production",
        "DATABASE_URL": sqlalchemy_url(dsn),
        "STRIPE_SECRET_KEY": STRIPE_KEY,
        "STRIPE_API_BASE": stripe_url,
        "STRIPE_WEBHOOK_SECRETS": WEBHOOK_SECRET,
        "AUTH_JWT_SECRET": JWT_SECRET,
        "RUN_BACKGROUND_WORKERS": "true" if workers else "false",
    }


def start_server(name: str, target: str, env: dict[str, str], log: Path) -> Server:
    port = free_port()
    out = log.open("ab")
    process = subprocess.Popen(
        [sys.executable, *UVICORN, "--port", str(port), target],
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    server = Server(name, port, process)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited at start; see {log}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.5),
        ):
            return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{name} did not start; see {log}")


def start_worker(name: str, command: list[str], env: dict[str, str], log: Path) -> Server:
    """`billing <command>` (app/cli.py) in a process of its own (port 0: it serves nothing)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", *command],
        cwd=ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    return Server(name, 0, process)


def start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy recording `pid` at 200 Hz into `out` (raw collapsed stacks) until sent SIGINT;
    returns once it is attached."""
    spy = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "py-spy"),
            "record",
            "--pid",
            str(pid),
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
    return spy


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def sign(body: bytes, timestamp: int) -> str:
    mac = hmac.new(WEBHOOK_SECRET.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def event_body(event: dict[str, Any]) -> bytes:
    """As Stripe POSTs it: pretty-printed JSON."""
    return json.dumps(event, indent=2).encode()


def write_deliveries(path: Path, bodies: Sequence[bytes]) -> None:
    """Sign every body now (Stripe's 300 s tolerance) into wrk's input file."""
    now = int(time.time())
    with path.open("wb") as out:
        for body in bodies:
            out.write(sign(body, now).encode() + b"\1" + body + b"\0")


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk not found: installing it with apt-get (Debian's wrk 4.1)", flush=True)
    if os.geteuid() != 0:
        sys.exit("wrk is missing: run `sudo apt-get install -y wrk` first")
    subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, capture_output=True)
    return shutil.which("wrk") or sys.exit("wrk could not be installed")


@dataclass
class WrkResult:
    requests: int
    seconds: float
    non200: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def run_wrk(
    url: str,
    deliveries_file: Path,
    *,
    connections: int,
    threads: int = 1,
    rate: float = 0.0,
    max_seconds: int = 120,
) -> WrkResult:
    env = {**os.environ, "WRK_THREADS": str(threads), "WRK_CONNECTIONS": str(connections)}
    command = [
        ensure_wrk(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max_seconds}s",
        "--timeout",
        "30s",
        "-s",
        str(ROOT / "bench" / "deliver.lua"),
        url,
        "--",
        str(deliveries_file),
        str(rate),
    ]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None and process.stdout is not None
    finished, errors = 0, []
    for line in process.stderr:  # wrk sleeps -d seconds unless interrupted
        if line.strip() == "THREAD_DONE":
            finished += 1
            if finished == threads:
                process.send_signal(signal.SIGINT)
        else:
            errors.append(line)
    stdout = process.stdout.read()
    process.wait()
    return wrk_result(stdout, "".join(errors))


def wrk_result(stdout: str, stderr: str) -> WrkResult:
    """The figures our wrk scripts print as one `RESULT {json}` line."""
    line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {stdout}\n{stderr}")
    raw = json.loads(line[len("RESULT ") :])
    return WrkResult(
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        non200=raw["non200"],
        errors=raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"],
        p50_ms=raw["p50_us"] / 1000,
        p95_ms=raw["p95_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
    )


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def postgres_cpu_seconds() -> float:
    """CPU time (user + system) used so far by every `postgres` process on this machine that
    is still running: read before and after a step, the difference is what Postgres spent on
    it (connections that ended in between are missed, so keep the step's connections open)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
        except OSError:  # the process ended meanwhile
            continue
        if not fields[0].endswith("(postgres"):
            continue
        values = fields[1].split()
        total += int(values[11]) + int(values[12])  # utime, stime
    return total / tick


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} vCPU {cpu}, {mem_gb:.0f} GiB RAM, Python {sys.version.split()[0]}, "
        f"load average at start {load[0]:.1f}"
    )


@contextlib.contextmanager
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    try:
        yield started
    finally:
        for server in started:
            server.stop()


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def wait_for(predicate: Any, seconds: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(interval)
    return False
