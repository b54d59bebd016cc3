"""Every route × every kind of caller answers what the contract says: 401 without a valid
token, 403 for a valid token that may not act (another account's user, a service without the
scope), and never 401/403 (nor a 5xx) for a caller the route admits. Every answer's status is
documented for its operation in the OpenAPI document."""

from __future__ import annotations

import re
import time

import httpx
import jwt
import pytest
from fastapi import FastAPI

from app.config import Settings
from tests.checkout.conftest import top_up_body
from tests.conftest import JWT_SECRET, TokenFactory, bearer
from tests.robustness.routes import (
    OTHER,
    OWNER,
    SCOPES,
    Route,
    admits_own_user,
    admitted_scopes,
    kind,
    routes,
)


async def call(
    client: httpx.AsyncClient, route: Route, headers: dict[str, str], account_id: str = OWNER
) -> httpx.Response:
    kwargs: dict[str, object] = {"headers": headers}
    if route.has_body:
        kwargs["json"] = {}
    return await client.request(route.method, route.path(account_id), **kwargs)  # type: ignore[arg-type]


def check_documented(route: Route, response: httpx.Response) -> None:
    assert response.status_code < 500, f"{route}: {response.status_code} {response.text}"
    assert str(response.status_code) in route.documented_statuses, (
        f"{route} answered undocumented {response.status_code}: {response.text[:300]}"
    )
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/problem+json"), route
        body = response.json()
        assert body["status"] == response.status_code and body["code"], body


def bad_tokens(settings: Settings) -> dict[str, str]:
    now = int(time.time())
    aud = settings.auth_jwt_audience
    base = {"sub": "attacker", "aud": aud, "exp": now + 600, "account_id": OWNER}

    def sign(claims: dict[str, object], secret: str = JWT_SECRET, alg: str = "HS256") -> str:
        return jwt.encode(claims, secret, algorithm=alg)

    return {
        "garbage": "not-a-jwt",
        "wrong_secret": sign(base, "another-secret-" + "z" * 32),
        "expired": sign({**base, "exp": now - 60}),
        "wrong_audience": sign({**base, "aud": "someone-else"}),
        "no_subject": sign({k: v for k, v in base.items() if k != "sub"}),
        "user_and_scope": sign({**base, "scope": "ops finance"}),
        "neither_user_nor_scope": sign({k: v for k, v in base.items() if k != "account_id"}),
        "alg_none": jwt.encode(base, None, algorithm="none"),
    }


async def test_every_route_has_an_admission_rule(app: FastAPI) -> None:
    all_routes = routes(app)
    assert len(all_routes) >= 15
    for route in all_routes:
        if kind(route) == "scoped":
            assert admitted_scopes(route) <= set(SCOPES), route


async def test_routes_without_a_valid_token_answer_401(
    app: FastAPI, client: httpx.AsyncClient, settings: Settings
) -> None:
    tokens = bad_tokens(settings)
    for route in routes(app):
        if kind(route) in ("public", "signed"):
            continue
        variants = {"none": {}, "basic": {"Authorization": "Basic dXNlcjpwYXNz"}}
        variants |= {name: bearer(value) for name, value in tokens.items()}
        for name, headers in variants.items():
            response = await call(client, route, headers)
            assert response.status_code == 401, f"{route} with {name}: {response.text}"
            assert response.json()["code"] == "unauthorized"
            check_documented(route, response)


async def test_another_accounts_user_token_is_403_on_account_routes(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory
) -> None:
    intruder = bearer(token(account_id=OTHER, sub="intruder"))
    for route in routes(app):
        if kind(route) == "scoped" and route.account_scoped:
            response = await call(client, route, intruder, account_id=OWNER)
            assert response.status_code == 403, f"{route}: {response.text}"
            check_documented(route, response)


async def test_own_user_token_is_admitted_exactly_where_the_contract_says(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory
) -> None:
    own = bearer(token(account_id=OWNER))
    for route in routes(app):
        if kind(route) in ("public", "signed"):
            continue
        response = await call(client, route, own)
        check_documented(route, response)
        if admits_own_user(route):
            assert response.status_code not in (401, 403), f"{route}: {response.text}"
        else:
            assert response.status_code == 403, f"{route}: {response.text}"


@pytest.mark.parametrize("scope", SCOPES)
async def test_each_service_scope_is_admitted_exactly_where_the_contract_says(
    scope: str, app: FastAPI, client: httpx.AsyncClient, token: TokenFactory
) -> None:
    service = bearer(token(scope=scope, sub=f"svc-{scope}"))
    for route in routes(app):
        if kind(route) in ("public", "signed"):
            continue
        response = await call(client, route, service)
        check_documented(route, response)
        if kind(route) == "any_token" or scope in admitted_scopes(route):
            assert response.status_code not in (401, 403), f"{scope} on {route}: {response.text}"
        else:
            assert response.status_code == 403, f"{scope} on {route}: {response.text}"


async def test_public_routes_answer_without_a_token(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    for route in routes(app):
        if kind(route) == "public":
            response = await call(client, route, {})
            assert response.status_code == 200, f"{route}: {response.text}"


async def test_the_webhook_ignores_bearer_tokens_and_demands_a_stripe_signature(
    client: httpx.AsyncClient, token: TokenFactory
) -> None:
    body = b'{"id": "evt_1", "object": "event"}'
    for headers in (
        {},
        bearer(token(scope="ops finance billing:write")),
        {"Stripe-Signature": "t=1,v1=deadbeef"},
        {"Stripe-Signature": ""},
    ):
        response = await client.post(
            "/webhooks/stripe",
            content=body,
            headers={**headers, "Content-Type": "application/json"},
        )
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "invalid_webhook"


async def test_another_account_naming_the_owners_objects_under_its_own_path_gets_404(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory
) -> None:
    """Object-level checks, on every account route that names an object: an account that puts
    the owner's real checkout session or refund request under its own path learns nothing
    (404, as for an id that does not exist) and changes nothing."""
    own = bearer(token(account_id=OWNER, email="owner@example.com"))
    checkout = await client.post(
        f"/v1/accounts/{OWNER}/checkout-sessions", json=top_up_body(), headers=own
    )
    assert checkout.status_code == 201, checkout.text
    request = await client.post(
        f"/v1/accounts/{OWNER}/refund-requests",
        json={"type": "other", "description": "the owner's request"},
        headers=own,
    )
    assert request.status_code == 201, request.text
    objects = {"session_id": checkout.json()["id"], "request_id": request.json()["id"]}

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "account_id":
            return OTHER
        assert name in objects, f"no owner's object for {{{name}}}: add one here"
        return str(objects[name])

    intruder = bearer(token(account_id=OTHER, sub="intruder"))
    named = [r for r in routes(app) if r.account_scoped and r.template.count("{") > 1]
    assert named
    for route in named:
        path = re.sub(r"\{([^}]+)\}", fill, route.template)
        kwargs: dict[str, object] = {"headers": intruder}
        if route.has_body:
            kwargs["json"] = {"description": "hijacked"}
        response = await client.request(route.method, path, **kwargs)  # type: ignore[arg-type]
        assert response.status_code == 404, f"{route}: {response.status_code} {response.text}"
        check_documented(route, response)
    mine = await client.get(
        f"/v1/accounts/{OWNER}/refund-requests/{objects['request_id']}", headers=own
    )
    assert mine.json()["description"] == "the owner's request"
