"""Operator commands: `billing <command>` (or `python -m app.cli <command>`)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import uvloop
from prometheus_client import start_http_server
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.auth import KNOWN_SCOPES, mint_token
from app.config import Settings, get_settings
from app.db import create_engine, create_session_factory
from app.errors import BillingError, database_unavailable, sqlstate_of
from app.idempotency import prune_expired_keys
from app.observability import configure_logging
from app.stripe_gateway import StripeGateway
from app.subscriptions.service import record_expired_access
from app.webhooks.processor import EventProcessor, prune_payloads
from app.webhooks.reconcile import reconcile, register_webhook_endpoint
from app.webhooks.wakeup import listen_for_stored_events


def _mint_token(args: argparse.Namespace) -> int:
    """Refuses (2) to mint a token the service would refuse (401): see `_principal_from_claims`
    in app/auth.py."""
    if (args.account_id is None) == (args.scope is None):
        print("give exactly one of --account-id or --scope", file=sys.stderr)
        return 2
    if not args.sub:
        print("--sub is empty", file=sys.stderr)
        return 2
    if args.account_id == "":
        print("--account-id is empty", file=sys.stderr)
        return 2
    if args.ttl <= 0:
        print("--ttl must be a positive number of seconds", file=sys.stderr)
        return 2
    if args.scope is not None:
        if not args.scope.split():  # the service refuses such a token (401)
            print("--scope names no scope", file=sys.stderr)
            return 2
        unknown = set(args.scope.split()) - KNOWN_SCOPES
        if unknown:
            print(f"unknown scopes: {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
    print(
        mint_token(
            get_settings(),
            sub=args.sub,
            account_id=args.account_id,
            scope=args.scope,
            email=args.email,
            ttl_seconds=args.ttl,
        )
    )
    return 0


def _export_openapi(args: argparse.Namespace) -> int:
    from app.main import create_app

    document = json.dumps(create_app().openapi(), indent=2, sort_keys=True) + "\n"
    Path(args.output).write_text(document)
    print(f"wrote {args.output}")
    return 0


@asynccontextmanager
async def _runtime() -> AsyncIterator[tuple[Settings, AsyncEngine, StripeGateway]]:
    settings = get_settings()
    configure_logging(settings.log_level)
    engine = create_engine(settings.database_url, settings.database_pool_size)
    gateway = StripeGateway.from_settings(settings)
    try:
        yield settings, engine, gateway
    finally:
        await gateway.close()
        await engine.dispose()


def _iso_time(value: str) -> datetime:
    """An ISO date or time as an operator types it; without an offset it is UTC."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or time: {value!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def _reconcile(args: argparse.Namespace) -> int:
    since: datetime | None = args.since
    async with _runtime() as (settings, engine, gateway):
        report = await reconcile(engine, gateway, settings, since=since)
        if args.apply:
            processor = EventProcessor(create_session_factory(engine), settings, gateway)
            await processor.drain()
    print("\n".join(report.lines()))
    return 0


async def _register_webhook(args: argparse.Namespace) -> int:
    async with _runtime() as (_, _engine, gateway):
        endpoint = await register_webhook_endpoint(gateway, args.url)
    print(f"webhook endpoint {endpoint['id']} -> {endpoint.get('url')}")
    events = endpoint.get("enabled_events") or []
    print(f"api_version {endpoint.get('api_version')}, {len(events)} events")
    if endpoint.get("secret"):
        print(f"signing secret (add it to STRIPE_WEBHOOK_SECRETS): {endpoint['secret']}")
    return 0


async def _prune_events(_: argparse.Namespace) -> int:
    async with _runtime() as (settings, engine, _gateway):
        factory = create_session_factory(engine)
        pruned = await prune_payloads(factory, settings.event_retention_days)
        keys = await prune_expired_keys(factory)
    print(f"pruned the payloads of {pruned} events")
    print(f"deleted {keys} idempotency keys past their 24 hours")
    return 0


async def _portal_config(args: argparse.Namespace) -> int:
    from app.portal.service import apply_portal_configuration

    async with _runtime() as (settings, _engine, gateway):
        configuration = await apply_portal_configuration(
            gateway, settings, configuration_id=args.id, headline=args.headline
        )
    print(configuration["id"])
    if not (args.id or settings.stripe_portal_configuration_id):
        print(f"set STRIPE_PORTAL_CONFIGURATION_ID={configuration['id']}", file=sys.stderr)
    return 0


def _serve_metrics(port: int | None) -> None:
    """This process's Prometheus metrics on `:port/metrics` (a thread of prometheus_client):
    a worker process's counters (events applied, their lag, emails sent) are in no web
    process's `/metrics`."""
    if port is not None:
        start_http_server(port)


async def _deliver_emails(args: argparse.Namespace) -> int:
    from app.notifications.worker import EmailWorker, deliver_round

    _serve_metrics(args.metrics_port)
    async with _runtime() as (settings, engine, _gateway):
        factory = create_session_factory(engine)
        # SIGTERM/SIGINT finish the message in flight, then exit (a kill mid-conversation
        # would leave it `sending`, parked as delivery_uncertain and never resent): in the
        # loop and in a single round alike
        loop = asyncio.get_running_loop()
        if args.once:
            stop = asyncio.Event()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            result = await deliver_round(factory, settings, stop=stop)
            print(
                f"sent {len(result.sent)}, retrying {len(result.retrying)}, "
                f"failed {len(result.failed)}, uncertain {len(result.uncertain)}"
            )
        else:
            worker = EmailWorker(factory, settings)
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, worker.request_stop)
            await worker.run()
    return 0


async def _expire_access(_: argparse.Namespace) -> int:
    async with _runtime() as (settings, engine, _gateway):
        ended = await record_expired_access(create_session_factory(engine), settings)
    print(f"recorded {ended} access ends in the access feed")
    return 0


async def _push_extensions(_: argparse.Namespace) -> int:
    from app.maintenance.service import retry_pending_extensions

    async with _runtime() as (_settings, engine, gateway):
        settled = await retry_pending_extensions(
            create_session_factory(engine), gateway, raise_if_stripe_failed=True
        )
    print(f"settled {settled} pending maintenance extension pushes")
    return 0


async def _process_events(args: argparse.Namespace) -> int:
    _serve_metrics(args.metrics_port)
    async with _runtime() as (settings, engine, gateway):
        processor = EventProcessor(create_session_factory(engine), settings, gateway)
        listener = asyncio.create_task(listen_for_stored_events(engine, processor.notify))
        # what is built so far lives as long as the process: out of the collector's full
        # passes, as in the web app (they took ~8% of the processor's CPU in
        # bench/profile_processor.py, whose heap also holds the Stripe fake)
        gc.freeze()
        try:
            await processor.run_forever()
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
    return 0


METRICS_PORT_HELP = "serve this process's Prometheus metrics on http://0.0.0.0:PORT/metrics"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="billing", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    mint = commands.add_parser("mint-token", help="sign a user or service/staff token")
    mint.add_argument("--sub", required=True, help="who: user id, service name or staff member")
    mint.add_argument("--account-id", help="user token for this account")
    mint.add_argument("--scope", help='service/staff token, e.g. "billing:read usage:write"')
    mint.add_argument("--email", help="billing contact carried by a user token")
    mint.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    mint.set_defaults(handler=_mint_token)

    openapi = commands.add_parser("openapi", help="write the OpenAPI document")
    openapi.add_argument("--output", default="openapi/openapi.json")
    openapi.set_defaults(handler=_export_openapi)

    portal = commands.add_parser(
        "portal-config",
        help="create (or update) the Stripe Customer Portal configuration the policy implies",
    )
    portal.add_argument(
        "--id", help="update this configuration (default: STRIPE_PORTAL_CONFIGURATION_ID)"
    )
    portal.add_argument("--headline", help="business headline shown in the portal")
    portal.set_defaults(handler=_portal_config, run_async=True)

    rec = commands.add_parser(
        "reconcile-events", help="store Stripe events that were never delivered and report drift"
    )
    rec.add_argument(
        "--since",
        type=_iso_time,
        help="ISO date or time to list from, UTC unless it has an offset (default: the earlier"
        " of 3 days ago, Stripe's delivery retry window, and 10 minutes before the newest stored"
        " event; at most 30 days)",
    )
    rec.add_argument("--apply", action="store_true", help="also apply them now")
    rec.set_defaults(handler=_reconcile, run_async=True)

    reg = commands.add_parser("register-webhook", help="create/update the Stripe webhook endpoint")
    reg.add_argument("--url", required=True, help="public URL of POST /webhooks/stripe")
    reg.set_defaults(handler=_register_webhook, run_async=True)

    prune = commands.add_parser(
        "prune-events",
        help="drop old raw event payloads (ids stay) and idempotency keys past their 24 hours",
    )
    prune.set_defaults(handler=_prune_events, run_async=True)

    expire = commands.add_parser(
        "expire-access", help="append access that ended by time alone to the access feed"
    )
    expire.set_defaults(handler=_expire_access, run_async=True)

    push = commands.add_parser(
        "push-extensions",
        help="retry maintenance extensions still pending at Stripe (same idempotency keys)",
    )
    push.set_defaults(handler=_push_extensions, run_async=True)

    work = commands.add_parser("process-events", help="run the event processor in the foreground")
    work.add_argument("--metrics-port", type=int, help=METRICS_PORT_HELP)
    work.set_defaults(handler=_process_events, run_async=True)

    deliver = commands.add_parser("deliver-emails", help="run the email delivery worker")
    deliver.add_argument("--once", action="store_true", help="one round, then exit")
    deliver.add_argument("--metrics-port", type=int, help=METRICS_PORT_HELP)
    deliver.set_defaults(handler=_deliver_emails, run_async=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. What an operator (or cron) can act on ends it with one line on stderr
    and exit status 1, not a traceback: the database unreachable or refusing, Stripe down or
    refusing, a file that cannot be written. Bad arguments are argparse's usage error (2)."""
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "run_async", False):
            # uvloop, as uvicorn runs the web processes (uvicorn[standard])
            code: int = uvloop.run(args.handler(args))
        else:
            code = args.handler(args)
    except Exception as exc:
        problem = _operator_problem(exc, uses_database=getattr(args, "run_async", False))
        if problem is None:
            raise
        print(f"billing {args.command}: {problem}", file=sys.stderr)
        return 1
    return code


_NOT_MIGRATED_SQLSTATES = frozenset({"42P01", "42703", "42883"})
"""Undefined table, column or function: a database behind the code's migrations."""
_CONFLICT_SQLSTATES = frozenset({"40001", "40P01"})
"""Serialization failure, deadlock: the transaction was rolled back whole."""


def _operator_problem(exc: Exception, *, uses_database: bool) -> str | None:
    """What to tell the operator about `exc`, or None for a bug (its traceback is shown). The
    database's own messages are not printed: they can carry statements and their values."""
    if isinstance(exc, BillingError):  # Stripe unavailable or refusing the request
        return exc.detail
    if isinstance(exc, ValidationError):  # the settings (without the values: secrets)
        reasons = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
            for error in exc.errors()
        )
        return f"the configuration is refused: {reasons}"
    if uses_database and database_unavailable(exc):
        return (
            f"the database is unreachable ({type(exc).__name__}); check DATABASE_URL and that"
            " Postgres is up, then run the command again"
        )
    if isinstance(exc, SQLAlchemyError | asyncpg.PostgresError):
        sqlstate = sqlstate_of(exc)
        problem = f"the database refused the command ({type(exc).__name__}, SQLSTATE {sqlstate})"
        if sqlstate in _NOT_MIGRATED_SQLSTATES:
            problem += "; is it migrated to this release (alembic upgrade head)?"
        elif sqlstate in _CONFLICT_SQLSTATES:
            problem += (
                "; a concurrent change conflicted with it and it was rolled back: run it again"
            )
        return problem
    if isinstance(exc, OSError):
        return f"{exc.strerror or type(exc).__name__}: {exc.filename or ''}".rstrip(": ")
    return None


if __name__ == "__main__":
    sys.exit(main())
