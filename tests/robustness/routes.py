"""Every route of the served OpenAPI document, with who may call it (from the contract's
"Who calls it"), so tests cover routes other branches add without being edited.

Admission rules (service-contract.md):
- `/healthz`, `/readyz`, `/metrics`: public.
- `POST /webhooks/stripe`: Stripe, by `Stripe-Signature`; bearer tokens mean nothing there.
- `GET /v1/plans`: any valid token.
- `/v1/accounts/{account_id}/usage-charges` and `/activity`: scope `usage:write` only.
- `POST` `/v1/accounts/{account_id}/refund-requests`: the account's own user token only
  (finance files requests on `/v1/finance/refund-requests`); `PATCH` of one: that token, or
  scope `finance` (the details a client gave by email or phone).
- other `/v1/accounts/{account_id}/...`: the account's own user token, or a service token with
  `billing:read` (GET) or `billing:write` (anything else).
- `/v1/channels/...`, `/v1/access-changes`: scope `billing:read`.
- `/v1/finance/...`: scope `finance`; `/v1/ops/...`: scope `ops`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI

SCOPES = ("billing:read", "billing:write", "usage:write", "finance", "ops")
OWNER, OTHER = "acc_owner", "acc_other"
PUBLIC_PATHS = {"/healthz", "/readyz", "/metrics"}
SIGNED_PATHS = {"/webhooks/stripe"}
USAGE_PATHS = re.compile(r"^/v1/accounts/\{account_id\}/(usage-charges|activity)(/|$)")
# the client files and amends its own refund requests (finance files on its own route, and
# adds the details a client gave by email or phone)
OWNER_ONLY_WRITES = re.compile(r"^/v1/accounts/\{account_id\}/refund-requests(/|$)")


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    operation: dict[str, Any] = field(hash=False, compare=False)

    @property
    def documented_statuses(self) -> set[str]:
        return set(self.operation.get("responses", {}))

    @property
    def has_body(self) -> bool:
        return "requestBody" in self.operation

    @property
    def account_scoped(self) -> bool:
        return "{account_id}" in self.template

    def path(self, account_id: str = OWNER) -> str:
        def fill(match: re.Match[str]) -> str:
            name = match.group(1)
            if name == "account_id":
                return account_id
            if name.endswith("event_id"):
                return "evt_robustness"
            return "00000000-0000-4000-8000-000000000000" if "request" in name else "x_robust"

        return re.sub(r"\{([^}]+)\}", fill, self.template)

    def __str__(self) -> str:
        return f"{self.method} {self.template}"


def routes(app: FastAPI) -> list[Route]:
    document = app.openapi()
    found = []
    for template, operations in document["paths"].items():
        for method, operation in operations.items():
            if method in {"get", "post", "put", "patch", "delete"}:
                found.append(Route(method.upper(), template, operation))
    return found


def kind(route: Route) -> str:
    """`public`, `signed`, `any_token` or `scoped`."""
    if route.template in PUBLIC_PATHS:
        return "public"
    if route.template in SIGNED_PATHS:
        return "signed"
    if route.template == "/v1/plans":
        return "any_token"
    return "scoped"


def admitted_scopes(route: Route) -> set[str]:
    """The service/staff scopes that may call a `scoped` route (raises for an unknown family, so
    a new family of routes gets a rule here instead of passing silently)."""
    t = route.template
    if USAGE_PATHS.match(t):
        return {"usage:write"}
    if t.startswith("/v1/accounts/{account_id}"):
        if route.method == "GET":
            return {"billing:read"}
        if OWNER_ONLY_WRITES.match(t):
            return {"finance"} if route.method == "PATCH" else set()
        return {"billing:write"}
    if t.startswith("/v1/channels/") or t == "/v1/access-changes":
        return {"billing:read"}
    if t.startswith("/v1/finance/"):
        return {"finance"}
    if t.startswith("/v1/ops/"):
        return {"ops"}
    raise AssertionError(f"no admission rule for {route}: add one from the contract")


def admits_own_user(route: Route) -> bool:
    return kind(route) == "any_token" or (
        route.account_scoped and not USAGE_PATHS.match(route.template)
    )


def admitted_principal(route: Route) -> dict[str, str] | None:
    """Token claims of one principal the route admits (None: no token needed)."""
    if kind(route) in ("public", "signed"):
        return None
    if admits_own_user(route):
        return {"account_id": OWNER}
    return {"scope": sorted(admitted_scopes(route))[0]}
