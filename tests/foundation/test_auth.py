"""Token rules from the contract: 401 for no or bad tokens, 403 for valid tokens that may not act."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import jwt
import pytest
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, Field, SecretStr
from sqlalchemy import select

from app.auth import AccountReader, FinanceStaff, OpsStaff, mint_token
from app.config import Settings
from app.main import create_app
from app.models import Account
from tests.conftest import JWT_SECRET, bearer

PROBLEM = "application/problem+json"
probe = APIRouter()


@probe.get("/probe/accounts/{account_id}")
async def probe_account(account_id: str, principal: AccountReader) -> dict[str, str]:
    return {"account_id": account_id, "sub": principal.sub}


class Echo(BaseModel):
    amount: int = Field(gt=0)
    currency: str = Field(min_length=3, max_length=3)


@probe.post("/probe/echo")
async def probe_echo(body: Echo, _: OpsStaff) -> Echo:
    return body


@probe.get("/probe/ops")
async def probe_ops(principal: OpsStaff) -> dict[str, str]:
    return {"sub": principal.sub}


@probe.get("/probe/finance")
async def probe_finance(principal: FinanceStaff) -> dict[str, str]:
    return {"sub": principal.sub}


async def probe_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(settings)
    app.include_router(probe)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            yield http


@pytest.fixture
async def http(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async for client in probe_client(settings):
        yield client


def raw_token(secret: str = JWT_SECRET, **claims: object) -> str:
    base: dict[str, object] = {"sub": "u1", "aud": "1msg-billing", "exp": int(time.time()) + 60}
    base.update(claims)
    return jwt.encode({k: v for k, v in base.items() if v is not None}, secret, algorithm="HS256")


def assert_problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["title"] and body["detail"] and body["type"].endswith(code)


async def test_missing_token_is_401(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/plans")
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "bad",
    [
        "not-a-jwt",
        raw_token(secret="some-other-secret-of-enough-length", account_id="a1"),
        raw_token(account_id="a1", exp=int(time.time()) - 10),
        raw_token(account_id="a1", aud="another-audience"),
        raw_token(account_id="a1", sub=None),
        raw_token(account_id="a1", exp=None),
        raw_token(account_id="a1", aud=None),
        raw_token(account_id="a1", scope="billing:read"),
        raw_token(),
        raw_token(account_id=""),
        raw_token(scope=""),
        jwt.encode(
            {"sub": "x", "aud": "1msg-billing", "exp": 9999999999, "account_id": "a"},
            "k" * 40,
            algorithm="HS384",
        ),
    ],
    ids=[
        "garbage",
        "wrong-secret",
        "expired",
        "wrong-audience",
        "no-sub",
        "no-exp",
        "no-aud",
        "both-account-and-scope",
        "neither-account-nor-scope",
        "empty-account",
        "empty-scope",
        "other-algorithm",
    ],
)
async def test_bad_tokens_are_401(http: httpx.AsyncClient, bad: str) -> None:
    assert_problem(await http.get("/v1/plans", headers=bearer(bad)), 401, "unauthorized")


async def test_a_token_issued_by_a_clock_slightly_ahead_is_accepted(
    http: httpx.AsyncClient,
) -> None:
    """`iat` is informational (RFC 7519 4.1.6; the contract requires `sub`, `exp` and `aud`):
    a token minted on a host whose clock runs a little ahead, so its whole-second `iat` is
    later than our clock for a moment, is valid all the same."""
    ahead = raw_token(account_id="acc_1", iat=int(time.time()) + 2)
    assert (await http.get("/v1/plans", headers=bearer(ahead))).status_code == 200


async def test_a_token_longer_than_any_we_mint_is_refused_before_it_is_decoded(
    http: httpx.AsyncClient,
) -> None:
    """A bearer token is at most 8 KiB (ours are a few hundred bytes): a longer one, which
    uvicorn would pass on whatever its size, is 401 before it is base64-decoded, parsed and
    HMAC-checked once per configured secret, even when it is validly signed."""
    padded = raw_token(account_id="acc_1", pad="x" * 9000)
    response = await http.get("/v1/plans", headers=bearer(padded))
    assert_problem(response, 401, "unauthorized")
    assert "too long" in response.json()["detail"]
    fitting = raw_token(account_id="acc_1", pad="x" * 4000)
    assert (await http.get("/v1/plans", headers=bearer(fitting))).status_code == 200


async def test_user_and_service_tokens_read_plans(http: httpx.AsyncClient) -> None:
    for claims in ({"account_id": "acc_1"}, {"scope": "usage:write"}):
        response = await http.get("/v1/plans", headers=bearer(raw_token(**claims)))
        assert response.status_code == 200
        assert response.json()["data"][0]["code"] == "channel_monthly"


async def test_user_token_reads_only_its_own_account(http: httpx.AsyncClient) -> None:
    own = await http.get("/probe/accounts/acc_1", headers=bearer(raw_token(account_id="acc_1")))
    assert own.status_code == 200
    assert own.json() == {"account_id": "acc_1", "sub": "u1"}
    other = await http.get("/probe/accounts/acc_2", headers=bearer(raw_token(account_id="acc_1")))
    assert_problem(other, 403, "forbidden")


async def test_service_token_needs_the_scope(http: httpx.AsyncClient) -> None:
    reader = raw_token(scope="billing:read", sub="svc-inbox")
    assert (await http.get("/probe/accounts/acc_9", headers=bearer(reader))).status_code == 200
    writer_only = raw_token(scope="usage:write")
    assert_problem(
        await http.get("/probe/accounts/acc_9", headers=bearer(writer_only)), 403, "forbidden"
    )
    assert_problem(await http.get("/probe/ops", headers=bearer(reader)), 403, "forbidden")
    user = raw_token(account_id="acc_9")
    assert_problem(await http.get("/probe/finance", headers=bearer(user)), 403, "forbidden")


async def test_previous_secret_is_accepted_for_rotation(settings: Settings) -> None:
    rotated = settings.model_copy(
        update={
            "auth_jwt_secret": SecretStr("new-secret-" + "n" * 32),
            "auth_jwt_previous_secret": SecretStr(JWT_SECRET),
        }
    )
    async for http in probe_client(rotated):
        old = raw_token(account_id="acc_1")
        new = raw_token(secret="new-secret-" + "n" * 32, account_id="acc_1")
        retired = raw_token(secret="retired-" + "r" * 32, account_id="acc_1")
        assert (await http.get("/v1/plans", headers=bearer(old))).status_code == 200
        assert (await http.get("/v1/plans", headers=bearer(new))).status_code == 200
        assert_problem(await http.get("/v1/plans", headers=bearer(retired)), 401, "unauthorized")


async def test_staff_scopes_need_the_staff_secret_when_set(settings: Settings) -> None:
    staff_secret = "staff-secret-" + "s" * 32
    staffed = settings.model_copy(update={"auth_staff_jwt_secret": SecretStr(staff_secret)})
    async for http in probe_client(staffed):
        forged = raw_token(scope="ops", sub="svc-that-signs-ordinary-tokens")
        assert_problem(await http.get("/probe/ops", headers=bearer(forged)), 401, "unauthorized")
        genuine = raw_token(secret=staff_secret, scope="ops", sub="alice@1msg.io")
        response = await http.get("/probe/ops", headers=bearer(genuine))
        assert response.status_code == 200
        assert response.json() == {"sub": "alice@1msg.io"}
        minted = mint_token(staffed, sub="bob@1msg.io", scope="finance")
        assert (await http.get("/probe/finance", headers=bearer(minted))).status_code == 200
        ordinary = raw_token(scope="billing:read")
        assert (await http.get("/probe/accounts/a", headers=bearer(ordinary))).status_code == 200


@pytest.mark.parametrize(
    "body",
    [b"{", b'{"amount": -1, "currency": "usd"}', b'{"amount": "x"}', b"[]", b"\xff\xfe"],
    ids=["broken-json", "negative", "wrong-type", "array", "invalid-utf8"],
)
async def test_malformed_bodies_are_problem_422(http: httpx.AsyncClient, body: bytes) -> None:
    headers = {**bearer(raw_token(scope="ops")), "content-type": "application/json"}
    response = await http.post("/probe/echo", content=body, headers=headers)
    assert_problem(response, 422, "validation_error")
    assert isinstance(response.json()["errors"], list)


@pytest.mark.parametrize(
    "email",
    [
        "client@example.com\r\nBcc: everyone@example.com",  # a header injection
        "two words@example.com",
        "no-at-sign",
        "@example.com",
        "a" * 320 + "@example.com",  # longer than any address a mailbox has
        "jos\u00e9@example.com",  # non-ASCII: the relay cannot be given it without SMTPUTF8
        42,
    ],
)
async def test_a_token_email_no_email_can_carry_never_becomes_the_billing_contact(
    client: httpx.AsyncClient, app: FastAPI, email: object
) -> None:
    settings: Settings = app.state.settings
    path = "/v1/accounts/acc_mail/refund-requests"
    body = {"type": "appeal", "description": "My access was suspended"}

    def as_user(claimed: object) -> dict[str, str]:
        token = jwt.encode(
            {
                "sub": "u",
                "account_id": "acc_mail",
                "email": claimed,
                "aud": settings.auth_jwt_audience,
                "exp": int(time.time()) + 60,
            },
            JWT_SECRET,
            algorithm="HS256",
        )
        return bearer(token)

    first = await client.post(path, json=body, headers=as_user("billing@client.example"))
    odd = await client.post(path, json=body, headers=as_user(email))

    assert (first.status_code, odd.status_code) == (201, 201)  # the request itself is fine
    async with app.state.session_factory() as session:
        contact = await session.scalar(select(Account.email).where(Account.id == "acc_mail"))
    assert contact == "billing@client.example"


@pytest.mark.parametrize("body", [b"{", b"\xff\xfe"], ids=["broken-json", "invalid-utf8"])
async def test_a_body_that_is_not_json_is_refused_for_the_token_first(
    client: httpx.AsyncClient, body: bytes
) -> None:
    """No token is 401 and a token that may not act is 403 whatever the body: a body that is
    not even JSON is no reason to answer 422 to a caller who may not call the route."""
    json_type = {"content-type": "application/json"}
    checkout = "/v1/accounts/acc_1/checkout-sessions"
    response = await client.post(checkout, content=body, headers=json_type)
    assert_problem(response, 401, "unauthorized")
    other_account = bearer(raw_token(account_id="acc_2"))
    response = await client.post(checkout, content=body, headers=json_type | other_account)
    assert_problem(response, 403, "forbidden")
    user = bearer(raw_token(account_id="acc_1"))
    response = await client.post(
        "/v1/accounts/acc_1/usage-charges", content=body, headers=json_type | user
    )
    assert_problem(response, 403, "forbidden")
    ops = bearer(raw_token(scope="ops"))
    response = await client.post(
        "/v1/finance/refund-requests", content=body, headers=json_type | ops
    )
    assert_problem(response, 403, "forbidden")
    # the caller who may act still learns the body is malformed
    response = await client.post(checkout, content=body, headers=json_type | user)
    assert_problem(response, 422, "validation_error")
