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


def _portal_config(args: argparse.Namespace) -> int:
    import asyncio

    from app.portal.service import apply_portal_configuration
    from app.stripe_gateway import StripeGateway

    settings = get_settings()

    async def run() -> str:
        gateway = StripeGateway.from_settings(settings)
        try:
            configuration = await apply_portal_configuration(
                gateway, settings, configuration_id=args.id, headline=args.headline
            )
        finally:
            await gateway.close()
        return str(configuration["id"])

    configuration_id = asyncio.run(run())
    print(configuration_id)
    if not (args.id or settings.stripe_portal_configuration_id):
        print(f"set STRIPE_PORTAL_CONFIGURATION_ID={configuration_id}", file=sys.stderr)
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

    portal = commands.add_parser(
        "portal-config",
        help="create (or update) the Stripe Customer Portal configuration the policy implies",
    )
    portal.add_argument(
        "--id", help="update this configuration (default: STRIPE_PORTAL_CONFIGURATION_ID)"
    )
    portal.add_argument("--headline", help="business headline shown in the portal")
    portal.set_defaults(handler=_portal_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
