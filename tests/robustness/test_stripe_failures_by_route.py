"""Stripe failing under every route that calls it, the routes taken from the served OpenAPI
document (an operation documenting 502 is one that calls Stripe), so a new such route fails
`test_every_route_that_calls_stripe_has_a_failure_scenario` until it gets a scenario here.

Each scenario is run against each failure: Stripe answering 500, 429 with `Retry-After`,
timing out, and refusing connections. Every one must: answer 502 `stripe_unavailable` as
problem+json within a bounded time; have sent every attempt with one idempotency key derived
from our own row; leave nothing half-made (the scenario says what that means for its route);
and, once Stripe recovers, give exactly one result at Stripe when the caller retries, the
retry sending the same key where the row it derives from is reused.

tests/robustness/test_stripe_failures.py goes deeper into checkout (the customer creation,
the replay of a client `Idempotency-Key`); this file holds the breadth."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from app.config import Settings
from app.models import (
    Account,
    IdempotencyRecord,
    PortalSession,
    RefundExecution,
    RefundRequestResponse,
)
from app.stripe_gateway import StripeGateway
from tests.checkout.conftest import APP_URL, top_up_body
from tests.conftest import STRIPE_KEY, Deliver, TokenFactory, bearer, make_settings
from tests.refunds.flows import outbox, pay_subscription
from tests.refunds.test_refund_workflow import file_request, reply
from tests.refunds.test_retry_and_close import (
    APPROVE,
    attempts,
    failed_top_up_refund,
    finance_view,
    retry,
)
from tests.robustness.routes import Route, routes
from tests.robustness.test_stripe_failures import (
    assert_nothing_half_made,
    assert_stripe_unavailable,
    failure_bound,
    local_rows,
)
from tests.stripe_fake import StripeFake


@pytest.fixture
def settings(database_url: str, stripe_fake: StripeFake, clean_database: None) -> Settings:
    """A shorter Stripe timeout than the suite's (2 s), to keep the timeout cases quick."""
    stripe_fake.reset()
    return make_settings(database_url, stripe_fake.url, stripe_timeout_seconds=1.0)


@dataclass
class World:
    app: FastAPI
    client: httpx.AsyncClient
    fake: StripeFake
    deliver: Deliver
    token: TokenFactory
    settings: Settings


@dataclass
class Armed:
    """A route ready to call Stripe: `send` makes the request (again, on a retry); the Stripe
    path its creating POST goes to; the idempotency key that POST must carry (read after the
    failure, from our own row); what must hold after the failure and after the recovery."""

    send: Callable[[], Awaitable[httpx.Response]]
    stripe_path: str
    expected_key: Callable[[], Awaitable[str]]
    nothing_half_made: Callable[[], Awaitable[None]]
    one_result: Callable[[httpx.Response], Awaitable[None]]
    key_reused_on_retry: bool = True


Scenario = Callable[[World], Awaitable[Armed]]


async def no_stored_answer(app: FastAPI) -> None:
    """A failure is never kept for replay under the caller's `Idempotency-Key`."""
    async with app.state.session_factory() as session:
        kept = (await session.scalars(select(IdempotencyRecord))).all()
        assert [r for r in kept if r.response_status is not None] == []


async def checkout(w: World) -> Armed:
    account = "acc_sf_checkout"

    async def send() -> httpx.Response:
        return await w.client.post(
            f"/v1/accounts/{account}/checkout-sessions",
            json=top_up_body(),
            headers={
                **bearer(w.token(account_id=account, email=f"{account}@example.com")),
                "Idempotency-Key": "client-checkout-1",
            },
        )

    async def expected_key() -> str:
        [row] = await local_rows(w.app, account)
        return f"billing:checkout:{row.id}"

    async def nothing_half_made() -> None:
        await assert_nothing_half_made(w.app, w.client, w.token, account)

    async def one_result(response: httpx.Response) -> None:
        assert response.status_code == 201, response.text
        assert len(w.fake.all("checkout.session")) == 1
        live = [r for r in await local_rows(w.app, account) if r.status == "open"]
        assert [str(r.id) for r in live] == [response.json()["id"]]

    # the customer exists first: the failure under test is the session's creation
    async with w.app.state.session_factory() as session, session.begin():
        customer = w.fake.create_customer({"metadata": {"account_id": account}})
        session.add(Account(id=account, stripe_customer_id=customer["id"]))
    return Armed(send, "/v1/checkout/sessions", expected_key, nothing_half_made, one_result)


async def portal(w: World) -> Armed:
    account = "acc_sf_portal"
    customer = w.fake.create_customer({"metadata": {"account_id": account}})
    async with w.app.state.session_factory() as session, session.begin():
        session.add(
            Account(id=account, stripe_customer_id=customer["id"], first_paid_at=datetime.now(UTC))
        )

    async def send() -> httpx.Response:
        return await w.client.post(
            f"/v1/accounts/{account}/portal-sessions",
            json={"return_url": f"{APP_URL}/billing"},
            headers=bearer(w.token(account_id=account)),
        )

    async def rows() -> list[PortalSession]:
        async with w.app.state.session_factory() as session:
            return list((await session.scalars(select(PortalSession))).all())

    async def expected_key() -> str:
        [row] = await rows()
        return f"billing:portal:{row.id}"

    async def nothing_half_made() -> None:
        for row in await rows():
            assert (row.status, row.stripe_id, row.url) in (
                ("failed", None, None),
                ("pending", None, None),
            )
        await no_stored_answer(w.app)

    async def one_result(response: httpx.Response) -> None:
        assert response.status_code == 201, response.text
        usable = [r for r in await rows() if r.url is not None]
        assert [r.url for r in usable] == [response.json()["url"]]

    # a portal session is a link, not a thing kept: each request makes its own row and key
    return Armed(
        send,
        "/v1/billing_portal/sessions",
        expected_key,
        nothing_half_made,
        one_result,
        key_reused_on_retry=False,
    )


async def execution_rows(app: FastAPI, request_id: str) -> list[RefundExecution]:
    async with app.state.session_factory() as session:
        return list(
            (
                await session.scalars(
                    select(RefundExecution)
                    .where(RefundExecution.request_id == request_id)
                    .order_by(RefundExecution.attempt)
                )
            ).all()
        )


async def refund_approval(w: World) -> Armed:
    account = "acc_sf_approve"
    paid = await pay_subscription(w.app, w.fake, w.deliver, account_id=account, channel_id="ch_sf")
    created = await file_request(w.client, w.token, account, payment_reference=paid.payment_id)
    request_id = created["id"]
    refunds_before = len(w.fake.all("refund"))
    emails_before = len(await outbox(w.app, f"billing@{account}.example"))

    async def send() -> httpx.Response:
        return await reply(
            w.client,
            w.token,
            request_id,
            idempotency_key="finance-approve-1",
            **APPROVE,
            amount=1200,
        )

    async def expected_key() -> str:
        [execution] = await execution_rows(w.app, request_id)
        return f"billing:refund:{execution.id}"

    async def nothing_half_made() -> None:
        view = await finance_view(w.client, w.token, request_id)
        assert view["status"] == "received" and view["responses"] == [], view
        async with w.app.state.session_factory() as session:
            assert (await session.scalars(select(RefundRequestResponse))).all() == []
        # the attempt stays pending (Stripe may have made the refund: only that approval may
        # be repeated), without a Stripe refund id nobody saw
        for execution in await execution_rows(w.app, request_id):
            assert (execution.status, execution.stripe_refund_id) == ("pending", None)
        assert len(await outbox(w.app, f"billing@{account}.example")) == emails_before
        client_view = await w.client.get(
            f"/v1/accounts/{account}/refund-requests/{request_id}",
            headers=bearer(w.token(account_id=account)),
        )
        assert client_view.json()["status"] == "received", client_view.text
        await no_stored_answer(w.app)

    async def one_result(response: httpx.Response) -> None:
        assert response.status_code == 201, response.text
        assert response.json()["status"] == "refund_pending"
        assert len(w.fake.all("refund")) == refunds_before + 1
        [execution] = await execution_rows(w.app, request_id)
        assert execution.stripe_refund_id == w.fake.all("refund")[-1]["id"]

    return Armed(send, "/v1/refunds", expected_key, nothing_half_made, one_result)


async def refund_retry(w: World) -> Armed:
    account = "acc_sf_retry"
    request_id, _first = await failed_top_up_refund(
        w.app, w.client, w.fake, w.deliver, w.token, account
    )
    refunds_before = len(w.fake.all("refund"))
    emails_before = len(await outbox(w.app, f"billing@{account}.example"))

    async def send() -> httpx.Response:
        return await retry(w.client, w.token, request_id, note="client confirmed the card")

    async def expected_key() -> str:
        second = [e for e in await execution_rows(w.app, request_id) if e.attempt == 2]
        return f"billing:refund:{second[0].id}"

    async def nothing_half_made() -> None:
        assert (await finance_view(w.client, w.token, request_id))["status"] == "refund_failed"
        assert [(n, s) for n, s, _ in await attempts(w.app, request_id)] == [
            (1, "failed"),
            (2, "pending"),
        ]
        assert len(await outbox(w.app, f"billing@{account}.example")) == emails_before

    async def one_result(response: httpx.Response) -> None:
        assert response.status_code == 201, response.text
        assert response.json()["status"] == "refund_pending"
        assert len(w.fake.all("refund")) == refunds_before + 1

    return Armed(send, "/v1/refunds", expected_key, nothing_half_made, one_result)


SCENARIOS: dict[str, Scenario] = {
    "POST /v1/accounts/{account_id}/checkout-sessions": checkout,
    "POST /v1/accounts/{account_id}/portal-sessions": portal,
    "POST /v1/finance/refund-requests/{request_id}/responses": refund_approval,
    "POST /v1/finance/refund-requests/{request_id}/refund-attempts": refund_retry,
}


def calls_stripe(route: Route) -> bool:
    return "502" in route.documented_statuses


async def test_every_route_that_calls_stripe_has_a_failure_scenario(app: FastAPI) -> None:
    assert {str(r) for r in routes(app) if calls_stripe(r)} == set(SCENARIOS)


@pytest.fixture
async def refused_gateway() -> AsyncIterator[StripeGateway]:
    """A gateway whose Stripe is a port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gateway = StripeGateway(
        api_key=STRIPE_KEY, api_base=f"http://127.0.0.1:{port}", max_network_retries=1
    )
    yield gateway
    await gateway.close()


FAILURES = ["500", "429-retry-after", "timeout", "refused"]


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("label", sorted(SCENARIOS))
async def test_stripe_failing_under_each_route_is_502_with_one_key_and_nothing_half_made(
    label: str,
    failure: str,
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
    settings: Settings,
    refused_gateway: StripeGateway,
) -> None:
    world = World(app, client, stripe_fake, deliver, token, settings)
    armed = await SCENARIOS[label](world)
    attempts_before = len(stripe_fake.requests_to("POST", armed.stripe_path))
    delay = settings.stripe_timeout_seconds + 0.5
    if failure == "500":
        stripe_fake.fail_next(50, 500, path_prefix=armed.stripe_path, method="POST")
    elif failure == "429-retry-after":
        stripe_fake.fail_next(50, 429, retry_after=1, path_prefix=armed.stripe_path, method="POST")
    elif failure == "timeout":
        stripe_fake.fail_next(
            settings.stripe_max_network_retries + 1,
            kind="timeout",
            delay=delay,
            path_prefix=armed.stripe_path,
            method="POST",
        )
    original = app.state.stripe
    if failure == "refused":
        app.state.stripe = refused_gateway
    try:
        started = time.monotonic()
        response = await armed.send()
        elapsed = time.monotonic() - started
    finally:
        app.state.stripe = original
    assert_stripe_unavailable(response)
    assert elapsed < failure_bound(settings), elapsed

    sent = stripe_fake.requests_to("POST", armed.stripe_path)[attempts_before:]
    expected = await armed.expected_key()
    if failure != "refused":
        assert len(sent) >= 2, [a.status for a in sent]  # retried
        assert {a.idempotency_key for a in sent} == {expected}
    if failure != "timeout":
        # Stripe made nothing (a timed-out request may still be applied after we gave up)
        assert all(a.status is not None and a.status >= 429 for a in sent)
    await armed.nothing_half_made()

    # Stripe recovers (a timed-out request finishes first); the caller sends it again.
    if failure == "timeout":
        await asyncio.sleep(delay - settings.stripe_timeout_seconds + 0.3)
    stripe_fake.clear_failures()
    seen = len(stripe_fake.requests_to("POST", armed.stripe_path))
    again = await armed.send()
    await armed.one_result(again)
    if armed.key_reused_on_retry:
        keys = {
            a.idempotency_key for a in stripe_fake.requests_to("POST", armed.stripe_path)[seen:]
        }
        assert keys <= {expected}, keys
