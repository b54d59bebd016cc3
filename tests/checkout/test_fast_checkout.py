"""app/fast_writes.py: a checkout whose input is valid is answered by `FastPost` in front of
FastAPI with what FastAPI answers (status, headers in order, body), errors the endpoint raises
included; invalid input, refused tokens, CORS and anything unusual are left to FastAPI with
the body they sent."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from app.fast_writes import FastPost
from app.models import CheckoutSession, IdempotencyRecord
from tests.asgi import http_scope
from tests.checkout.conftest import APP_URL, subscription_body, top_up_body
from tests.conftest import TokenFactory, bearer
from tests.stripe_fake import StripeFake

PATH = "/v1/accounts/{}/checkout-sessions"
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


def user(token: TokenFactory, account_id: str) -> dict[str, str]:
    return bearer(token(account_id=account_id, email=f"{account_id}@example.com"))


async def fast_path_alone(
    app: FastAPI, path: str, headers: dict[str, str], body: bytes
) -> tuple[list[Any], bytes | None]:
    """The ASGI messages `FastPost` sends for this POST ([] when it leaves it to FastAPI),
    and the body FastAPI would then read (None when the fast path answered)."""
    fast: FastPost = app.fast_checkout  # type: ignore[attr-defined]
    headers = {"x-request-id": "req-fixed", "content-length": str(len(body)), **headers}
    scope = http_scope("POST", path, headers)
    chunks = [body[:7], body[7:]]  # sent in two parts, as a client may

    async def receive() -> dict[str, Any]:
        if chunks:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    raw_params = fast.match(scope)
    if raw_params is None:
        return [], body
    unanswered = await fast(scope, receive, send, raw_params)
    if unanswered is None:
        return sent, None
    assert sent == []
    message = await unanswered()
    assert message == {"type": "http.request", "body": body, "more_body": False}
    return [], message["body"]


async def fastapi_answer(app: FastAPI, path: str, headers: dict[str, str], body: bytes) -> Answer:
    """The same request answered by FastAPI alone (the fast path off)."""
    fast = app.fast_checkout  # type: ignore[attr-defined]
    app.fast_checkout = None  # type: ignore[attr-defined]
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://billing.test") as c:
            response = await c.post(
                path, content=body, headers={"x-request-id": "req-fixed", **headers}
            )
    finally:
        app.fast_checkout = fast  # type: ignore[attr-defined]
    return response.status_code, response.headers.raw, response.content


async def on_two_new_accounts(
    app: FastAPI, token: TokenFactory, prefix: str, before: Callable[[], None] = lambda: None
) -> tuple[Answer, Answer]:
    """A top-up checkout (key `k-1`) of account `<prefix>_1` answered by the fast path, and
    the same of `<prefix>_2` by FastAPI alone: two new accounts, so both meet the same state.
    `before` runs before each."""
    content_type, body = json_body(top_up_body())
    answers = []
    for account, fast in ((f"{prefix}_1", True), (f"{prefix}_2", False)):
        headers = {**user(token, account), **content_type, "Idempotency-Key": "k-1"}
        before()
        if fast:
            sent, unread = await fast_path_alone(app, PATH.format(account), headers, body)
            assert unread is None
            answers.append(as_answer(sent))
        else:
            answers.append(await fastapi_answer(app, PATH.format(account), headers, body))
    return answers[0], answers[1]


def as_answer(sent: list[Any]) -> Answer:
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    return sent[0]["status"], sent[0]["headers"], sent[1]["body"]


def json_body(data: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    return {"content-type": "application/json"}, json.dumps(data).encode()


async def test_errors_the_checkout_raises_are_answered_by_the_fast_path_as_by_fastapi(
    app: FastAPI, token: TokenFactory, stripe_fake: StripeFake
) -> None:
    evil_redirect = {**top_up_body(), "success_url": "https://evil.example/done"}
    cases: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        ("unknown plan", subscription_body(plan="platinum"), {}),
        ("amount out of range", top_up_body(amount=1), {}),
        ("no top-ups in this currency", top_up_body(currency="jpy"), {}),
        ("redirect to another site", evil_redirect, {}),
        ("no debt to repay", {"purpose": "debt_repayment", **_urls()}, {}),
        ("unprintable key", top_up_body(), {"Idempotency-Key": "a\tb"}),
        ("key too long", top_up_body(), {"Idempotency-Key": "k" * 300}),
    ]
    for label, data, extra in cases:
        content_type, body = json_body(data)
        headers = {**user(token, "acc_err"), **content_type, **extra}
        sent, unread = await fast_path_alone(app, PATH.format("acc_err"), headers, body)
        assert unread is None, label
        fast = as_answer(sent)
        framework = await fastapi_answer(app, PATH.format("acc_err"), headers, body)
        assert 400 <= framework[0] < 500, (label, framework)
        assert fast == framework, label

    # Stripe fails (after the retries): 502, the pending row marked failed, the key released
    def stripe_down() -> None:
        stripe_fake.fail_next(10, 500, path_prefix="/v1/customers")

    fast, framework = await on_two_new_accounts(app, token, "acc_down", before=stripe_down)
    stripe_fake.clear_failures()
    assert fast[0] == 502
    assert fast == framework
    assert await count(app, IdempotencyRecord) == 0


async def test_a_created_checkout_and_its_replays_are_answered_as_by_fastapi(
    app: FastAPI, token: TokenFactory
) -> None:
    created = await on_two_new_accounts(app, token, "acc_new")
    (fast_status, fast_headers, fast_body), (status, headers_, framework_body) = created
    assert fast_status == status == 201
    assert [name for name, _ in fast_headers] == [name for name, _ in headers_]
    assert _without_ids(fast_body) == _without_ids(framework_body)

    # the same key again: a replay, and the same key with another body: 409, either way
    body = json.dumps(top_up_body()).encode()
    other_type, other_body = json_body(top_up_body(amount=6000))
    for again in (body, other_body):
        headers = {**user(token, "acc_new_1"), **other_type, "Idempotency-Key": "k-1"}
        sent, unread = await fast_path_alone(app, PATH.format("acc_new_1"), headers, again)
        assert unread is None
        framework = await fastapi_answer(app, PATH.format("acc_new_1"), headers, again)
        assert as_answer(sent) == framework
        assert framework[0] == (201 if again == body else 409)
    assert await count(app, CheckoutSession) == 2


async def test_invalid_input_refused_tokens_and_cors_are_left_to_fastapi_with_their_body(
    app: FastAPI, token: TokenFactory
) -> None:
    valid = json.dumps(top_up_body()).encode()
    deep = b"[" * 100_000 + b"]" * 100_000
    mine = user(token, "acc_in")
    cases: list[tuple[str, str, dict[str, str], bytes]] = [
        ("no token", "acc_in", {"content-type": "application/json"}, valid),
        (
            "another account's token",
            "acc_other",
            {**mine, "content-type": "application/json"},
            valid,
        ),
        (
            "a service token",
            "acc_in",
            {**bearer(token(scope="billing:read")), "content-type": "application/json"},
            valid,
        ),
        (
            "missing field",
            "acc_in",
            {**mine, "content-type": "application/json"},
            b'{"purpose": "top_up"}',
        ),
        (
            "amount not a number",
            "acc_in",
            {**mine, "content-type": "application/json"},
            valid.replace(b"5000", b'"x"'),
        ),
        (
            "unknown purpose",
            "acc_in",
            {**mine, "content-type": "application/json"},
            b'{"purpose": "gift"}',
        ),
        ("malformed JSON", "acc_in", {**mine, "content-type": "application/json"}, b'{"purpose": '),
        ("not JSON", "acc_in", {**mine, "content-type": "text/plain"}, valid),
        ("no content type", "acc_in", mine, valid),
        ("empty body", "acc_in", {**mine, "content-type": "application/json"}, b""),
        ("nested too deep", "acc_in", {**mine, "content-type": "application/json"}, deep),
        ("bad account id", "acc$in", {**mine, "content-type": "application/json"}, valid),
        ("CORS", "acc_in", {**mine, "content-type": "application/json", "Origin": APP_URL}, valid),
    ]
    for label, account, headers, body in cases:
        sent, unread = await fast_path_alone(app, PATH.format(account), headers, body)
        assert sent == [], label
        assert unread == body, label
        framework = await fastapi_answer(app, PATH.format(account), headers, body)
        assert framework[0] != 201 or label == "CORS", (label, framework)
    assert await count(app, CheckoutSession) == 1  # the CORS request, answered by FastAPI


async def test_a_checkout_answered_by_the_fast_path_is_counted_in_the_routes_metrics(
    app: FastAPI, token: TokenFactory
) -> None:
    labels = {
        "method": "POST",
        "route": "/v1/accounts/{account_id}/checkout-sessions",
        "status": "201",
    }
    before = REGISTRY.get_sample_value("billing_http_requests_total", labels) or 0.0
    content_type, body = json_body(top_up_body())
    headers = {**user(token, "acc_m"), **content_type}
    sent, _ = await fast_path_alone(app, PATH.format("acc_m"), headers, body)
    assert as_answer(sent)[0] == 201
    after = REGISTRY.get_sample_value("billing_http_requests_total", labels)
    assert after == before + 1


async def count(app: FastAPI, model: Any) -> int:
    async with app.state.session_factory() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


def _urls() -> dict[str, str]:
    return {"success_url": f"{APP_URL}/balance/done", "cancel_url": f"{APP_URL}/balance"}


def _without_ids(body: bytes) -> dict[str, Any]:
    """The answer with what differs between two checkouts (ids, URL, expiry) blanked."""
    data: dict[str, Any] = json.loads(body)
    for key in ("id", "url", "stripe_checkout_session_id", "expires_at"):
        assert data.get(key), key
        data[key] = "<varies>"
    return data
