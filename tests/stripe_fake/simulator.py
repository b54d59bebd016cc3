"""The local Stripe simulator: the tests' Stripe fake grown into a dev server.

``bin/dev serve`` starts it when no ``STRIPE_SECRET_KEY`` is configured in development mode,
so the whole billing flow runs offline. It is the same :class:`StripeFake` the tests use
(Stripe's REST API subset, every request validated against Stripe's OpenAPI description,
idempotency keys, state kept for the whole run) plus:

- webhook delivery (:mod:`.delivery`): each new event POSTed to the service, signed exactly
  as Stripe signs, retried while the service is down, optionally duplicated or shuffled;
- hosted pages (:mod:`.pages`): Checkout, the Customer Portal, invoices, and a controls page
  for renewals, refunds, disputes, expiry and delayed payments;
- open Checkout sessions expire on their own at ``expires_at``; paid charges get their
  balance transaction (Stripe's 2.9 % + 30 fee) right after the payment (``charge.updated``).

Dev-only: it lives under tests/ (never imported by app/, not in the Docker image).

    python -m tests.stripe_fake.simulator --port 12111 \\
        --webhook-url http://127.0.0.1:8000/webhooks/stripe --webhook-secret whsec_... --seed-plans
    python -m tests.stripe_fake.simulator ctl renew_paid subscription=sub_...   # controls, CLI
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from . import pages
from .delivery import WebhookDelivery
from .openapi import Json
from .server import StripeFake
from .state import RequestContext

DEFAULT_PORT = 12111

PORTAL_FEATURES: Json = {
    "customer_update": {"enabled": True, "allowed_updates": ["email", "address"]},
    "invoice_history": {"enabled": True},
    "payment_method_update": {"enabled": True},
    "subscription_cancel": {"enabled": True, "mode": "at_period_end", "proration_behavior": "none"},
}


def stripe_fee(amount: int) -> int:
    """Stripe's standard card fee (2.9 % + 30 minor units)."""
    return round(amount * 0.029) + 30


class SimulatorServer(StripeFake):
    """:class:`StripeFake` + webhook delivery + hosted pages + housekeeping."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        duplicate_rate: float = 0.0,
        shuffle: bool = False,
        seed: int | None = None,
        max_backoff: float = 5.0,
    ) -> None:
        super().__init__(host, port)
        self.delivery: WebhookDelivery | None = None
        if webhook_url:
            if not webhook_secret:
                raise ValueError("a webhook URL needs a webhook secret")
            self.delivery = WebhookDelivery(
                self,
                webhook_url,
                webhook_secret,
                duplicate_rate=duplicate_rate,
                shuffle=shuffle,
                seed=seed,
                max_backoff=max_backoff,
            )
        self._housekeeping_stop = threading.Event()
        self._housekeeping: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> SimulatorServer:
        super().start()
        if self.delivery is not None:
            self.delivery.start()
        if self._housekeeping is None:
            self._housekeeping_stop.clear()
            self._housekeeping = threading.Thread(
                target=self._housekeep, name="stripe-housekeeping", daemon=True
            )
            self._housekeeping.start()
        return self

    def stop(self) -> None:
        self._housekeeping_stop.set()
        if self._housekeeping is not None:
            self._housekeeping.join(timeout=5)
            self._housekeeping = None
        if self.delivery is not None:
            self.delivery.stop()
        super().stop()

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def _housekeep(self) -> None:
        while not self._housekeeping_stop.wait(1.0):
            self.expire_due_sessions()

    def expire_due_sessions(self) -> list[Json]:
        """Open Checkout sessions past ``expires_at`` expire (``checkout.session.expired``)."""
        with self._lock:
            due = [
                s["id"]
                for s in self.objects.get("checkout.session", {}).values()
                if s["status"] == "open" and s["expires_at"] <= self.now()
            ]
            events: list[Json] = []
            for session_id in due:
                events += self.expire_checkout(session_id)
            return events

    # ------------------------------------------------------------------ hooks

    def _emit(
        self, type_: str, obj: Json, previous: Json | None = None, ctx: RequestContext | None = None
    ) -> Json:
        event = super()._emit(type_, obj, previous, ctx)
        if self.delivery is not None:
            self.delivery.wake()
        return event

    def _default_portal_config(self) -> Json:
        for cfg in self.objects.get("billing_portal.configuration", {}).values():
            if cfg["is_default"]:
                return cfg
        return self._portal_config(
            {"features": json.loads(json.dumps(PORTAL_FEATURES))}, is_default=True
        )

    async def _handle(self, request: Request) -> Response:
        if request.url.path.startswith("/v1/"):
            return await super()._handle(request)
        return await pages.handle(self, request)

    # ------------------------------------------------------------------ actions

    def act(self, action: Callable[[], list[Json]]) -> list[Json]:
        """Run one simulation action, then settle the charges it paid; all its events."""
        with self._lock:
            start = len(self.events)
            action()
            for ch in list(self.objects.get("charge", {}).values()):
                if ch["status"] == "succeeded" and ch["balance_transaction"] is None:
                    self.settle_charge(ch["id"], fee=stripe_fee(ch["amount"]))
            return self.events_since(start)

    def refund(self, charge_id: str, amount: str | int | None = None) -> list[Json]:
        """A refund made in the Dashboard: ``refund.created``, ``charge.refunded``."""
        with self._lock:
            start = len(self.events)
            params: Json = {"charge": charge_id}
            if amount not in (None, ""):
                params["amount"] = int(amount)
            self.create_refund(params)
            return self.events_since(start)

    def open_dispute(self, charge_id: str) -> list[Json]:
        """The cardholder disputes: ``charge.dispute.created``, then funds are withdrawn."""
        with self._lock:
            events = self.create_dispute(charge_id)
            dispute_id = events[-1]["data"]["object"]["id"]
            return events + self.withdraw_dispute_funds(dispute_id)

    def redeliver(self, event_id: str) -> list[Json]:
        """Resend one event to the webhook endpoint (no new event)."""
        event = self.get("event", event_id)
        if self.delivery is not None:
            self.delivery.redeliver(json.loads(json.dumps(event)))
        return []

    def seed_plans(self, plans: list[Any]) -> None:
        """Create the catalog's prices (``app.config.Plan``-like objects) with their ids."""
        for plan in plans:
            if plan.stripe_price_id in self.objects.get("price", {}):
                continue
            self.add_price(
                id=plan.stripe_price_id,
                unit_amount=plan.amount,
                currency=plan.currency.lower(),
                interval=plan.interval,
                nickname=plan.name,
                product_name=plan.name,
                lookup_key=plan.code,
            )


# --------------------------------------------------------------------------- CLI


def _serve(args: argparse.Namespace) -> int:
    sim = SimulatorServer(
        args.host,
        args.port,
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
        duplicate_rate=args.duplicate_rate,
        shuffle=args.shuffle,
        seed=args.seed,
    )
    if args.seed_plans:
        from app.config import Settings

        sim.seed_plans(Settings().plans)
    sim.start()
    print(f"Stripe simulator on {sim.url} (controls: {sim.url}/)", flush=True)
    if args.webhook_url:
        print(f"delivering webhooks to {args.webhook_url}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    sim.stop()
    return 0


def _ctl(args: argparse.Namespace) -> int:
    fields = dict(item.split("=", 1) for item in args.fields)
    if args.action == "list":
        print("\n".join(f"{name}  {param}=..." for name, (param, _) in pages.ACTIONS.items()))
        return 0
    request = urllib.request.Request(
        f"{args.url.rstrip('/')}/simulator/actions/{args.action}",
        data=urllib.parse.urlencode(fields).encode(),
        headers={"Accept": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(response.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        print(exc.read().decode(), file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.stripe_fake.simulator")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the simulator (default)")
    for p in (parser, serve):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=DEFAULT_PORT)
        p.add_argument(
            "--webhook-url", help="where events are POSTed (the service's /webhooks/stripe)"
        )
        p.add_argument("--webhook-secret", help="signing secret shared with STRIPE_WEBHOOK_SECRETS")
        p.add_argument(
            "--duplicate-rate", type=float, default=0.0, help="0..1: deliver events twice"
        )
        p.add_argument(
            "--shuffle", action="store_true", help="deliver each action's events out of order"
        )
        p.add_argument("--seed", type=int, default=None, help="random seed for duplicates/shuffle")
        p.add_argument(
            "--seed-plans",
            action="store_true",
            help="create the catalog's prices (app/config.py PLANS)",
        )
    ctl = sub.add_parser("ctl", help="run a control action: ctl ACTION key=value ...; ctl list")
    ctl.add_argument("action")
    ctl.add_argument("fields", nargs="*")
    ctl.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_PORT}")
    args = parser.parse_args(argv)
    if args.command == "ctl":
        return _ctl(args)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
