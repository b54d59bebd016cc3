"""Operator commands: `billing <command>` (or `python -m app.cli <command>`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from app.auth import KNOWN_SCOPES, mint_token
from app.config import get_settings


def _mint_token(args: argparse.Namespace) -> int:
    if (args.account_id is None) == (args.scope is None):
        print("give exactly one of --account-id or --scope", file=sys.stderr)
        return 2
    if args.scope:
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


def _deliver_emails(args: argparse.Namespace) -> int:
    import asyncio

    from app.db import create_engine, create_session_factory
    from app.notifications.worker import EmailWorker, deliver_round

    settings = get_settings()

    async def run() -> None:
        engine = create_engine(settings.database_url, settings.database_pool_size)
        factory = create_session_factory(engine)
        try:
            if args.once:
                result = await deliver_round(factory, settings)
                print(
                    f"sent {len(result.sent)}, retrying {len(result.retrying)}, "
                    f"failed {len(result.failed)}, uncertain {len(result.uncertain)}"
                )
            else:
                await EmailWorker(factory, settings).run()
        finally:
            await engine.dispose()

    asyncio.run(run())
    return 0


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

    deliver = commands.add_parser("deliver-emails", help="run the email delivery worker")
    deliver.add_argument("--once", action="store_true", help="one round, then exit")
    deliver.set_defaults(handler=_deliver_emails)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
