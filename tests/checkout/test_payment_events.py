"""End to end with Stripe's events: nothing changes until the payment events confirm it."""

from __future__ import annotations

import asyncio
import copy
import time
from datetime import datetime
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.main import create_app
from app.models import Account, LedgerEntry, Payment
from tests.checkout.conftest import APP_URL, PostCheckout, subscription_body, top_up_body
from tests.conftest import Deliver, bearer
from tests.stripe_fake import StripeFake


async def _status(client: httpx.AsyncClient, token: Any, account: str, our_id: str) -> Any:
    response = await client.get(
        f"/v1/accounts/{account}/checkout-sessions/{our_id}",
        headers=bearer(token(account_id=account)),
    )
    assert response.status_code == 200, response.text
    return response.json()


async def _access(client: httpx.AsyncClient, token: Any, channel: str) -> Any:
    response = await client.get(
        f"/v1/channels/{channel}/access", headers=bearer(token(scope="billing:read"))
    )
    assert response.status_code == 200, response.text
    return response.json()


async def test_returning_before_the_webhook_shows_unfulfilled_then_the_event_grants_access(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    created = (await post_checkout("acc_1", subscription_body("ch_1"))).json()
    events = stripe_fake.complete_checkout(created["stripe_checkout_session_id"])

    before = await _status(client, token, "acc_1", created["id"])
    assert (before["status"], before["fulfilled"]) == ("complete", False)
    assert (await _access(client, token, "ch_1"))["has_access"] is False
    subs = await client.get(
        "/v1/accounts/acc_1/subscriptions", headers=bearer(token(account_id="acc_1"))
    )
    assert subs.json()["data"] == []

    await deliver(events)

    after = await _status(client, token, "acc_1", created["id"])
    assert (after["status"], after["fulfilled"]) == ("complete", True)
    access = await _access(client, token, "ch_1")
    assert access["has_access"] is True
    assert access["access_until"] is not None
    [subscription] = (
        await client.get(
            "/v1/accounts/acc_1/subscriptions", headers=bearer(token(account_id="acc_1"))
        )
    ).json()["data"]
    assert subscription["channel_id"] == "ch_1"
    assert subscription["plan"] == "channel_monthly"
    assert subscription["has_access"] is True
    assert subscription["status"] == "active"

    feed = await client.get("/v1/access-changes", headers=bearer(token(scope="billing:read")))
    assert feed.status_code == 200
    changes = feed.json()["data"]
    assert [(c["channel_id"], c["has_access"]) for c in changes] == [("ch_1", True)]
    later = await client.get(
        "/v1/access-changes",
        params={"after": feed.json()["next_cursor"]},
        headers=bearer(token(scope="billing:read")),
    )
    assert later.json()["data"] == []

    again = await post_checkout("acc_1", subscription_body("ch_1"))
    assert again.status_code == 409
    assert again.json()["code"] == "subscription_exists"


async def test_a_completed_checkout_whose_subscription_is_incomplete_grants_nothing(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    created = (await post_checkout("acc_1", subscription_body("ch_1"))).json()
    await deliver(
        stripe_fake.complete_checkout(
            created["stripe_checkout_session_id"], payment_status="unpaid"
        )
    )
    status = await _status(client, token, "acc_1", created["id"])
    assert status["status"] == "complete"
    assert status["fulfilled"] is False
    access = await _access(client, token, "ch_1")
    assert access["has_access"] is False
    portal = await client.post(
        "/v1/accounts/acc_1/portal-sessions",
        json={"return_url": f"{APP_URL}/billing"},
        headers=bearer(token(account_id="acc_1")),
    )
    assert portal.status_code == 409
    assert portal.json()["code"] == "portal_unavailable"


async def test_a_paid_top_up_credits_the_balance_once(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
    db: async_sessionmaker[AsyncSession],
) -> None:
    created = (await post_checkout("acc_1", top_up_body(amount=7500))).json()
    events = stripe_fake.complete_checkout(created["stripe_checkout_session_id"])
    await deliver(events)
    await deliver(events)  # Stripe delivers at least once

    headers = bearer(token(account_id="acc_1"))
    balance = (await client.get("/v1/accounts/acc_1/balance", headers=headers)).json()
    assert balance == {"balance": 7500, "debt": 0, "currency": "usd"}
    assert (await _status(client, token, "acc_1", created["id"]))["fulfilled"] is True
    async with db() as session:
        total = await session.scalar(
            select(func.sum(LedgerEntry.amount)).where(LedgerEntry.account_id == "acc_1")
        )
    assert total == 7500


async def test_portal_opens_after_the_first_payment_and_uses_the_accounts_customer(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    headers = bearer(token(account_id="acc_1"))
    body = {"return_url": f"{APP_URL}/billing"}
    early = await client.post("/v1/accounts/acc_1/portal-sessions", json=body, headers=headers)
    assert early.status_code == 409
    assert early.json()["code"] == "portal_unavailable"

    created = (await post_checkout("acc_1", subscription_body("ch_1"))).json()
    await deliver(stripe_fake.complete_checkout(created["stripe_checkout_session_id"]))

    response = await client.post("/v1/accounts/acc_1/portal-sessions", json=body, headers=headers)
    assert response.status_code == 201, response.text
    assert response.json()["url"].startswith("http")
    [portal] = stripe_fake.all("billing_portal.session")
    [customer] = stripe_fake.all("customer")
    assert portal["customer"] == customer["id"]
    assert portal["return_url"] == body["return_url"]
    [sent] = [r for r in stripe_fake.requests_to("POST", "/v1/billing_portal/sessions")]
    assert sent.idempotency_key is not None
    assert sent.idempotency_key.startswith("billing:portal:")

    bad = await client.post(
        "/v1/accounts/acc_1/portal-sessions",
        json={"return_url": "https://evil.example/"},
        headers=headers,
    )
    assert bad.status_code == 422
    assert bad.json()["code"] == "redirect_not_allowed"
    assert len(stripe_fake.all("billing_portal.session")) == 1


async def test_a_subscription_cancelled_in_the_portal_keeps_access_until_the_period_ends(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    created = (await post_checkout("acc_1", subscription_body("ch_1"))).json()
    await deliver(stripe_fake.complete_checkout(created["stripe_checkout_session_id"]))
    [sub] = stripe_fake.all("subscription")
    period_end = sub["items"]["data"][0]["current_period_end"]

    await deliver(stripe_fake.update_subscription(sub["id"], cancel_at_period_end=True))

    [listed] = (
        await client.get(
            "/v1/accounts/acc_1/subscriptions", headers=bearer(token(account_id="acc_1"))
        )
    ).json()["data"]
    assert listed["cancel_at_period_end"] is True
    assert listed["has_access"] is True
    assert listed["reason"] == "cancelling"
    access = await _access(client, token, "ch_1")
    assert access["has_access"] is True
    assert datetime.fromisoformat(access["access_until"]).timestamp() == period_end

    await deliver(stripe_fake.delete_subscription(sub["id"]))
    assert (await _access(client, token, "ch_1"))["has_access"] is False
    feed = await client.get("/v1/access-changes", headers=bearer(token(scope="billing:read")))
    assert feed.json()["data"][0]["has_access"] is True
    assert feed.json()["data"][-1]["has_access"] is False
    ids = [c["id"] for c in feed.json()["data"]]
    assert ids == sorted(ids)


async def test_two_top_ups_opened_in_different_currencies_credit_only_the_first_paid(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
    db: async_sessionmaker[AsyncSession],
    app: Any,
) -> None:
    app.state.settings.top_up_limits["eur"] = type(app.state.settings.top_up_limits["usd"])(
        min=100, max=100000
    )
    # both open before any payment: neither creation can see the other's currency
    usd = (await post_checkout("acc_1", top_up_body(amount=7500, currency="usd"))).json()
    eur = (await post_checkout("acc_1", top_up_body(amount=3000, currency="eur"))).json()
    assert "id" in usd and "id" in eur, (usd, eur)
    await deliver(stripe_fake.complete_checkout(usd["stripe_checkout_session_id"]))
    await deliver(stripe_fake.complete_checkout(eur["stripe_checkout_session_id"]))

    headers = bearer(token(account_id="acc_1"))
    balance = (await client.get("/v1/accounts/acc_1/balance", headers=headers)).json()
    assert balance == {"balance": 7500, "debt": 0, "currency": "usd"}
    async with db() as session:
        currencies = (
            await session.scalars(
                select(LedgerEntry.currency).where(LedgerEntry.account_id == "acc_1").distinct()
            )
        ).all()
        payments = (
            await session.execute(
                select(Payment.amount, Payment.currency, Payment.status).where(
                    Payment.account_id == "acc_1"
                )
            )
        ).all()
    assert currencies == ["usd"]
    # the EUR payment is recorded (finance refunds it on review), not credited or fulfilled
    assert sorted(payments) == [(3000, "eur", "succeeded"), (7500, "usd", "succeeded")]
    assert (await _status(client, token, "acc_1", usd["id"]))["fulfilled"] is True
    assert (await _status(client, token, "acc_1", eur["id"]))["fulfilled"] is False

    # a chargeback of the EUR payment moves no balance: it never reached the ledger
    session = stripe_fake.get("checkout.session", eur["stripe_checkout_session_id"])
    charge = stripe_fake.get("payment_intent", session["payment_intent"])["latest_charge"]
    opened = stripe_fake.create_dispute(charge)
    await deliver(opened)
    await deliver(stripe_fake.withdraw_dispute_funds(opened[0]["data"]["object"]["id"]))
    balance = (await client.get("/v1/accounts/acc_1/balance", headers=headers)).json()
    assert balance == {"balance": 7500, "debt": 0, "currency": "usd"}


async def test_a_read_answered_by_stripe_before_the_payment_event_does_not_move_the_session_back(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    """A browser reads its session while Stripe's answer is in flight and the payment event is
    applied meanwhile: the read's older view (`open`, `unpaid`) must not overwrite it, or the
    session would show `open` with a payable URL for good (fulfilled rows are not synced)."""
    created = (await post_checkout("acc_1", top_up_body())).json()
    stripe_id = created["stripe_checkout_session_id"]
    before = copy.deepcopy(stripe_fake.get("checkout.session", stripe_id))
    events = stripe_fake.complete_checkout(stripe_id)
    stripe_fake.get("checkout.session", stripe_id).update(before)  # Stripe's view before paying
    stripe_fake.fail_next(kind="timeout", delay=1.0, method="GET", path_prefix="/v1/checkout/")

    read = asyncio.create_task(_status(client, token, "acc_1", created["id"]))
    await asyncio.sleep(0.3)  # the read is waiting for Stripe's (older) answer
    await deliver(events)
    await read

    after = await _status(client, token, "acc_1", created["id"])
    assert (after["status"], after["payment_status"], after["fulfilled"]) == (
        "complete",
        "paid",
        True,
    )
    assert after["url"] is None


async def test_the_email_entered_at_checkout_becomes_the_contact_of_an_account_without_one(
    post_checkout: PostCheckout,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
    db: async_sessionmaker[AsyncSession],
) -> None:
    """A checkout opened by a service (no user email) leaves the account without a billing
    contact, so refund replies and maintenance notices could not reach the client: the email
    the client enters at Stripe Checkout becomes it. A contact already on file is kept."""
    service = token(scope="billing:write")
    bare = (await post_checkout("acc_bare", top_up_body(), tok=service)).json()
    known = (await post_checkout("acc_known", top_up_body())).json()  # token email on file
    await deliver(
        [
            *stripe_fake.complete_checkout(
                bare["stripe_checkout_session_id"], email="payer@client.example"
            ),
            *stripe_fake.complete_checkout(
                known["stripe_checkout_session_id"], email="other@client.example"
            ),
        ]
    )
    async with db() as session:
        emails = dict((await session.execute(select(Account.id, Account.email))).all())
    assert emails["acc_bare"] == "payer@client.example"
    assert emails["acc_known"] == "acc_known@example.com"


async def test_reads_waiting_for_stripe_to_sync_a_checkout_hold_no_database_connection(
    settings: Settings, token: Any, stripe_fake: StripeFake
) -> None:
    """Reading an unfulfilled session asks Stripe; while it waits, it holds no pooled
    connection: clients polling their checkouts while Stripe is slow (or often enough while it
    is not) must not take the pool from every other request."""
    small = settings.model_copy(update={"database_pool_size": 2, "stripe_timeout_seconds": 10.0})
    app = create_app(small)  # 2 pooled connections + 2 overflow
    accounts = [f"acc_{n}" for n in range(4)]  # one poll each (reads are throttled per account)
    headers = {a: bearer(token(account_id=a, email=f"{a}@example.com")) for a in accounts}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
    ):
        paths = []
        for a in accounts:
            created = await http.post(
                f"/v1/accounts/{a}/checkout-sessions", json=top_up_body(), headers=headers[a]
            )
            assert created.status_code == 201, created.text
            paths.append((a, f"/v1/accounts/{a}/checkout-sessions/{created.json()['id']}"))
        stripe_fake.fail_next(
            4, kind="timeout", delay=6.0, method="GET", path_prefix="/v1/checkout/"
        )
        polls = [asyncio.create_task(http.get(p, headers=headers[a])) for a, p in paths]
        await asyncio.sleep(0.5)  # every poll is waiting for Stripe

        started = time.monotonic()
        balance = await http.get("/v1/accounts/acc_0/balance", headers=headers["acc_0"])
        assert balance.status_code == 200, balance.text
        assert time.monotonic() - started < 2
        assert all(r.status_code == 200 for r in await asyncio.gather(*polls))


async def test_a_cancel_at_before_the_period_end_ends_access_there(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    """A `cancel_at` set in Stripe's Dashboard before the period's end: Stripe ends the
    subscription at `cancel_at` (prorating the rest), so access lasts until then, not to the
    period end; the subscriptions list, the access check and the access feed all say so."""
    created = (await post_checkout("acc_1", subscription_body("ch_1"))).json()
    await deliver(stripe_fake.complete_checkout(created["stripe_checkout_session_id"]))
    [sub] = stripe_fake.all("subscription")
    period_end = sub["items"]["data"][0]["current_period_end"]
    cancel_at = period_end - 10 * 86400

    await deliver(stripe_fake.update_subscription(sub["id"], cancel_at=cancel_at))

    [listed] = (
        await client.get(
            "/v1/accounts/acc_1/subscriptions", headers=bearer(token(account_id="acc_1"))
        )
    ).json()["data"]
    assert datetime.fromisoformat(listed["current_period_end"]).timestamp() == period_end
    assert (listed["has_access"], listed["reason"]) == (True, "cancelling")
    assert datetime.fromisoformat(listed["access_until"]).timestamp() == cancel_at
    access = await _access(client, token, "ch_1")
    assert access["has_access"] is True
    assert datetime.fromisoformat(access["access_until"]).timestamp() == cancel_at
    feed = await client.get("/v1/access-changes", headers=bearer(token(scope="billing:read")))
    last = feed.json()["data"][-1]
    assert datetime.fromisoformat(last["access_until"]).timestamp() == cancel_at

    # cleared again (renewal turned back on): the period end again
    await deliver(stripe_fake.update_subscription(sub["id"], cancel_at=""))
    access = await _access(client, token, "ch_1")
    assert datetime.fromisoformat(access["access_until"]).timestamp() == period_end
