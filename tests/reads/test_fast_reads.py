"""app/fast_reads.py: the read routes' successful answers come from `FastReads` in front of
FastAPI, byte for byte what FastAPI answers (status, headers in order, body); everything else
(errors, other methods, CORS, bad parameters, bad tokens) is left to FastAPI untouched."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client import REGISTRY

from app.fast_reads import FastReads
from app.models import Account, Channel, Subscription
from tests.asgi import http_scope
from tests.conftest import TokenFactory, bearer
from tests.reads.rows import NOW, succeeded_payment

ACCESS = "/v1/channels/{}/access"
ELIGIBILITY = "/v1/accounts/{}/refund-eligibility"


async def seed(app: FastAPI) -> None:
    async with app.state.session_factory() as session, session.begin():
        session.add(Account(id="acc_f", currency="usd"))
        session.add(Channel(id="ch_f", account_id="acc_f"))
        await session.flush()
        session.add(
            Subscription(
                stripe_id="sub_f",
                account_id="acc_f",
                channel_id="ch_f",
                status="active",
                cancel_at_period_end=True,
                current_period_end=NOW + timedelta(days=20),
            )
        )
        await session.flush()
        session.add(succeeded_payment("pi_f", "acc_f", days_ago=2, stripe_subscription_id="sub_f"))


async def answers(
    app: FastAPI, method: str, path: str, headers: dict[str, str]
) -> tuple[tuple[int, list[tuple[bytes, bytes]], bytes], tuple[int, list[Any], bytes]]:
    """The same request answered with the fast path on, then by FastAPI alone."""
    fast: FastReads | None = app.fast_reads  # type: ignore[attr-defined]
    assert fast is not None
    results = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://billing.test") as client:
        for enabled in (True, False):
            app.fast_reads = fast if enabled else None  # type: ignore[attr-defined]
            try:
                response = await client.request(
                    method, path, headers={"x-request-id": "req-fixed", **headers}
                )
            finally:
                app.fast_reads = fast  # type: ignore[attr-defined]
            results.append((response.status_code, response.headers.raw, response.content))
    return results[0], results[1]


async def fast_path_alone(app: FastAPI, path: str, headers: dict[str, str]) -> list[Any]:
    """The ASGI messages `FastReads` sends for a GET of `path` ([] when it leaves it to
    FastAPI)."""
    fast: FastReads = app.fast_reads  # type: ignore[attr-defined]
    scope = http_scope("GET", path, {"x-request-id": "req-fixed", **headers})
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    found = fast.match(scope)
    if found is None:
        return []
    answered = await fast(scope, receive, send, found)
    assert answered == bool(sent)
    return sent


async def test_successful_reads_are_answered_by_the_fast_path_exactly_as_by_fastapi(
    app: FastAPI, token: TokenFactory
) -> None:
    await seed(app)
    service = bearer(token(scope="billing:read"))
    cases = [
        (ACCESS.format("ch_f"), service),
        (ACCESS.format("ch_unknown"), service),
        (ACCESS.format("ch_f") + "?ignored=1", service),
        (ELIGIBILITY.format("acc_f"), service),
        (ELIGIBILITY.format("acc_f"), bearer(token(account_id="acc_f"))),
        (ELIGIBILITY.format("acc_nothing"), service),
    ]
    for path, headers in cases:
        sent = await fast_path_alone(app, path, headers)
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"], path
        fast, framework = await answers(app, "GET", path, headers)
        assert framework[0] == 200, (path, framework)
        assert fast == framework, path
        assert sent[0]["status"] == 200
        assert sent[0]["headers"] == framework[1], path
        assert sent[1]["body"] == framework[2], path


async def test_everything_but_a_successful_read_is_left_to_fastapi_with_the_same_answer(
    app: FastAPI, token: TokenFactory
) -> None:
    await seed(app)
    service = bearer(token(scope="billing:read"))
    other_user = bearer(token(account_id="acc_other"))
    cases: list[tuple[str, str, dict[str, str]]] = [
        ("GET", ACCESS.format("ch_f"), {}),  # no token
        ("GET", ACCESS.format("ch_f"), {"Authorization": "Bearer not-a-jwt"}),
        ("GET", ACCESS.format("ch_f"), {"Authorization": "Basic abc"}),
        ("GET", ACCESS.format("ch_f"), bearer(token(scope="billing:write"))),
        ("GET", ACCESS.format("ch_f"), bearer(token(account_id="acc_f"))),  # a user token
        ("GET", ACCESS.format("c" * 65), service),  # too long
        ("GET", ACCESS.format("ch%20f"), service),  # a space is no channel id
        ("GET", ACCESS.format("ch_f") + "/", service),  # FastAPI redirects
        ("HEAD", ACCESS.format("ch_f"), service),
        ("POST", ACCESS.format("ch_f"), service),
        ("GET", ACCESS.format("ch_f"), {**service, "Origin": "https://app.1msg.io"}),  # CORS
        ("GET", ELIGIBILITY.format("acc_f"), other_user),
        ("GET", ELIGIBILITY.format("acc_f"), bearer(token(scope="usage:write"))),
        ("GET", ELIGIBILITY.format("acc$f"), service),  # not an account id
        ("GET", ELIGIBILITY.format("acc$f"), other_user),  # the guard speaks first
        ("GET", ELIGIBILITY.format("a" * 65), bearer(token(account_id="a" * 65))),
    ]
    for method, path, headers in cases:
        if method == "GET":
            assert await fast_path_alone(app, path, headers) == [], path
        fast, framework = await answers(app, method, path, headers)
        assert framework[0] != 200 or "Origin" in headers, (method, path, framework)
        assert fast == framework, (method, path)


async def test_a_read_answered_by_the_fast_path_is_counted_in_the_routes_metrics(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory
) -> None:
    labels = {"method": "GET", "route": "/v1/channels/{channel_id}/access", "status": "200"}
    before = REGISTRY.get_sample_value("billing_http_requests_total", labels) or 0.0
    headers = bearer(token(scope="billing:read"))
    assert await fast_path_alone(app, ACCESS.format("ch_m"), headers) != []
    response = await client.get(ACCESS.format("ch_m"), headers=headers)
    assert response.status_code == 200
    assert len(response.headers["x-request-id"]) == 32  # one made up for the request
    after = REGISTRY.get_sample_value("billing_http_requests_total", labels)
    assert after == before + 2
