"""Checkout sessions through HTTP, against Postgres and the Stripe fake."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.models import Account, CheckoutSession, Subscription
from tests.checkout.conftest import (
    APP_URL,
    PostCheckout,
    charge_usage,
    subscription_body,
    top_up_body,
)
from tests.conftest import bearer, plain_dsn
from tests.stripe_fake import StripeFake
from tests.stripe_fake.state import StripeError


async def test_subscription_checkout_carries_account_channel_and_purpose_to_stripe(
    post_checkout: PostCheckout, stripe_fake: StripeFake
) -> None:
    response = await post_checkout("acc_1", subscription_body("ch_1"))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["purpose"] == "subscription"
    assert body["status"] == "open"
    assert body["fulfilled"] is False
    assert body["url"].startswith("http")
    assert body["expires_at"]

    [created] = stripe_fake.all("checkout.session")
    assert created["mode"] == "subscription"
    assert created["client_reference_id"] == "acc_1"
    metadata = {
        "account_id": "acc_1",
        "purpose": "subscription",
        "checkout_session_id": body["id"],
        "channel_id": "ch_1",
        "plan_code": "channel_monthly",
    }
    assert created["metadata"] == metadata
    assert created["success_url"] == f"{APP_URL}/billing/done?session_id={{CHECKOUT_SESSION_ID}}"
    [customer] = stripe_fake.all("customer")
    assert created["customer"] == customer["id"]
    assert customer["email"] == "acc_1@example.com"
    [request] = stripe_fake.requests_to("POST", "/v1/checkout/sessions")
    assert request.params["subscription_data"]["metadata"] == metadata
    assert request.params["line_items"] == [{"price": "price_channel_monthly_usd", "quantity": 1}]
    assert request.idempotency_key == f"billing:checkout:{body['id']}"


async def test_top_up_checkout_is_a_payment_for_the_amount_with_metadata_on_the_intent(
    post_checkout: PostCheckout, stripe_fake: StripeFake
) -> None:
    response = await post_checkout("acc_1", top_up_body(amount=2500))
    assert response.status_code == 201, response.text
    [created] = stripe_fake.all("checkout.session")
    assert created["mode"] == "payment"
    assert created["amount_total"] == 2500
    assert created["currency"] == "usd"
    assert created["customer"] is not None
    [request] = stripe_fake.requests_to("POST", "/v1/checkout/sessions")
    assert request.params["payment_intent_data"]["metadata"] == {
        "account_id": "acc_1",
        "purpose": "top_up",
        "checkout_session_id": response.json()["id"],
    }


async def test_two_concurrent_first_checkouts_create_one_stripe_customer(
    post_checkout: PostCheckout, stripe_fake: StripeFake
) -> None:
    responses = await asyncio.gather(
        post_checkout("acc_1", subscription_body("ch_1")),
        post_checkout("acc_1", subscription_body("ch_2")),
        post_checkout("acc_1", top_up_body()),
    )
    assert [r.status_code for r in responses] == [201, 201, 201]
    customers = stripe_fake.all("customer")
    assert len(customers) == 1
    assert {s["customer"] for s in stripe_fake.all("checkout.session")} == {customers[0]["id"]}


async def test_double_click_with_one_idempotency_key_creates_one_stripe_session(
    post_checkout: PostCheckout, stripe_fake: StripeFake
) -> None:
    first, second = await asyncio.gather(
        post_checkout("acc_1", top_up_body(), key="click-1"),
        post_checkout("acc_1", top_up_body(), key="click-1"),
    )
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    later = await post_checkout("acc_1", top_up_body(), key="click-1")
    assert later.json() == first.json()
    assert len(stripe_fake.all("checkout.session")) == 1


async def test_same_idempotency_key_with_another_body_is_refused(
    post_checkout: PostCheckout, stripe_fake: StripeFake
) -> None:
    assert (await post_checkout("acc_1", top_up_body(5000), key="k")).status_code == 201
    response = await post_checkout("acc_1", top_up_body(6000), key="k")
    assert response.status_code == 409
    assert response.json()["code"] == "idempotency_key_reused"
    assert len(stripe_fake.all("checkout.session")) == 1


async def test_idempotency_keys_are_scoped_to_the_caller(
    post_checkout: PostCheckout, stripe_fake: StripeFake, token: Any
) -> None:
    a = await post_checkout("acc_1", top_up_body(), key="k", tok=token(account_id="acc_1"))
    b = await post_checkout(
        "acc_1", top_up_body(), key="k", tok=token(account_id="acc_1", sub="other-user")
    )
    assert a.status_code == b.status_code == 201
    assert a.json()["id"] != b.json()["id"]
    assert len(stripe_fake.all("checkout.session")) == 2


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (top_up_body(amount=499), "validation_error"),
        (top_up_body(amount=500001), "validation_error"),
        (top_up_body(currency="xyz"), "validation_error"),
        (top_up_body(amount=0), "validation_error"),
        ({**top_up_body(), "amount": "500"}, "validation_error"),
        (subscription_body(plan="channel_forever"), "validation_error"),
        ({**subscription_body(), "success_url": "not a url"}, "validation_error"),
        ({**subscription_body(), "success_url": "javascript:alert(1)"}, "validation_error"),
        (
            {**subscription_body(), "cancel_url": "https://app.1msg.io\\@evil.example"},
            "validation_error",
        ),
        ({**subscription_body(), "success_url": "https://evil.example/x"}, "redirect_not_allowed"),
        (
            {**subscription_body(), "success_url": "https://app.1msg.io.evil.example/"},
            "redirect_not_allowed",
        ),
        ({**subscription_body(), "purpose": "donation"}, "validation_error"),
        ({**subscription_body(), "channel_id": ""}, "validation_error"),
        ({"purpose": "debt_repayment"}, "validation_error"),
    ],
)
async def test_invalid_requests_get_422_and_create_nothing_at_stripe(
    post_checkout: PostCheckout,
    stripe_fake: StripeFake,
    db: async_sessionmaker[AsyncSession],
    body: dict[str, Any],
    code: str,
) -> None:
    response = await post_checkout("acc_1", body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == code
    assert stripe_fake.requests_to("POST") == []
    async with db() as session:
        assert (await session.scalars(select(CheckoutSession))).all() == []


async def test_malformed_json_is_422(client: httpx.AsyncClient, token: Any) -> None:
    response = await client.post(
        "/v1/accounts/acc_1/checkout-sessions",
        content=b"{not json",
        headers={**bearer(token(account_id="acc_1")), "Content-Type": "application/json"},
    )
    assert response.status_code == 422


async def test_a_user_token_cannot_act_on_or_read_another_account(
    post_checkout: PostCheckout, client: httpx.AsyncClient, token: Any, stripe_fake: StripeFake
) -> None:
    created = (await post_checkout("acc_b", top_up_body())).json()
    intruder = bearer(token(account_id="acc_a"))
    response = await post_checkout("acc_b", top_up_body(), tok=token(account_id="acc_a"))
    assert response.status_code == 403
    read = await client.get(
        f"/v1/accounts/acc_b/checkout-sessions/{created['id']}", headers=intruder
    )
    assert read.status_code == 403
    # Under its own account path, B's session does not exist for A.
    read = await client.get(
        f"/v1/accounts/acc_a/checkout-sessions/{created['id']}", headers=intruder
    )
    assert read.status_code == 404
    for path in ("balance", "ledger", "subscriptions"):
        assert (await client.get(f"/v1/accounts/acc_b/{path}", headers=intruder)).status_code == 403
    assert len(stripe_fake.all("checkout.session")) == 1


async def test_a_service_token_with_billing_write_may_create_for_any_account(
    post_checkout: PostCheckout, token: Any
) -> None:
    response = await post_checkout("acc_1", top_up_body(), tok=token(scope="billing:write"))
    assert response.status_code == 201
    response = await post_checkout("acc_1", top_up_body(), tok=token(scope="billing:read"))
    assert response.status_code == 403


async def test_a_channel_belongs_to_the_account_that_first_named_it(
    post_checkout: PostCheckout, stripe_fake: StripeFake
) -> None:
    assert (await post_checkout("acc_a", subscription_body("ch_shared"))).status_code == 201
    response = await post_checkout("acc_b", subscription_body("ch_shared"))
    assert response.status_code == 404
    assert response.json()["code"] == "channel_not_found"
    assert "acc_a" not in response.text
    assert len(stripe_fake.all("checkout.session")) == 1


async def test_an_open_checkout_for_the_channel_is_reused(
    post_checkout: PostCheckout, stripe_fake: StripeFake
) -> None:
    first = await post_checkout("acc_1", subscription_body("ch_1"))
    second = await post_checkout("acc_1", subscription_body("ch_1"))
    assert first.status_code == second.status_code == 201
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["url"] == first.json()["url"]
    assert len(stripe_fake.all("checkout.session")) == 1


async def test_a_checkout_for_another_plan_expires_the_channels_open_one(
    post_checkout: PostCheckout, stripe_fake: StripeFake
) -> None:
    first = (await post_checkout("acc_1", subscription_body("ch_1"))).json()
    second = await post_checkout("acc_1", subscription_body("ch_1", plan="channel_yearly"))
    assert second.status_code == 201
    assert second.json()["id"] != first["id"]
    sessions = {
        s["metadata"]["checkout_session_id"]: s for s in stripe_fake.all("checkout.session")
    }
    assert sessions[first["id"]]["status"] == "expired"
    assert sessions[second.json()["id"]]["status"] == "open"


@pytest.mark.parametrize("plan", ["channel_monthly", "channel_yearly"])
async def test_a_checkout_made_a_day_ago_still_open_is_reused_or_expired_not_left_payable(
    post_checkout: PostCheckout,
    db: async_sessionmaker[AsyncSession],
    stripe_fake: StripeFake,
    plan: str,
) -> None:
    """Stripe keeps a Checkout session open 24 hours. The channel's open checkout made 23.5
    hours ago (30 minutes still to go) was ignored, being older than the 23 hours a pending
    row's idempotency key replays: a second session was made beside it, neither reused nor
    expired, so the client could pay both and be billed twice for one channel."""
    day_ago = datetime.now(UTC) - timedelta(hours=23, minutes=30)
    stripe_fake.set_time(day_ago.timestamp())
    first = (await post_checkout("acc_1", subscription_body("ch_1"))).json()
    stripe_fake.set_time(None)
    async with db() as session, session.begin():
        row = await session.get(CheckoutSession, uuid.UUID(first["id"]))
        assert row is not None
        row.created_at = day_ago

    second = await post_checkout("acc_1", subscription_body("ch_1", plan=plan))

    assert second.status_code == 201, second.text
    open_at_stripe = [s for s in stripe_fake.all("checkout.session") if s["status"] == "open"]
    assert len(open_at_stripe) == 1
    if plan == "channel_monthly":  # the same plan, more than 10 minutes from expiry
        assert second.json()["id"] == first["id"]
    else:
        assert open_at_stripe[0]["metadata"]["checkout_session_id"] == second.json()["id"]


async def test_a_channel_with_a_live_subscription_cannot_be_bought_again(
    post_checkout: PostCheckout, db: async_sessionmaker[AsyncSession], stripe_fake: StripeFake
) -> None:
    assert (await post_checkout("acc_1", subscription_body("ch_1"))).status_code == 201
    async with db() as session, session.begin():
        session.add(
            Subscription(
                stripe_id="sub_live",
                account_id="acc_1",
                channel_id="ch_1",
                status="active",
                current_period_end=datetime.now(UTC) + timedelta(days=20),
            )
        )
    response = await post_checkout("acc_1", subscription_body("ch_1"))
    assert response.status_code == 409
    assert response.json()["code"] == "subscription_exists"
    assert len(stripe_fake.all("checkout.session")) == 1


async def test_debt_repayment_without_debt_is_409_no_debt(
    post_checkout: PostCheckout, stripe_fake: StripeFake
) -> None:
    body = {
        "purpose": "debt_repayment",
        "success_url": f"{APP_URL}/ok",
        "cancel_url": f"{APP_URL}/no",
    }
    response = await post_checkout("acc_1", body)
    assert response.status_code == 409
    assert response.json()["code"] == "no_debt"
    assert stripe_fake.requests_to("POST") == []


async def test_debt_repayment_charges_exactly_the_current_debt(
    post_checkout: PostCheckout, client: httpx.AsyncClient, token: Any, stripe_fake: StripeFake
) -> None:
    await charge_usage(client, token, "acc_1", 1234, "usd")
    body = {
        "purpose": "debt_repayment",
        "success_url": f"{APP_URL}/ok",
        "cancel_url": f"{APP_URL}/no",
    }
    response = await post_checkout("acc_1", body)
    assert response.status_code == 201, response.text
    assert response.json()["amount"] == 1234
    [created] = stripe_fake.all("checkout.session")
    assert (created["mode"], created["amount_total"]) == ("payment", 1234)
    assert created["metadata"]["purpose"] == "debt_repayment"


async def test_a_debt_below_stripes_minimum_charge_is_409_and_reaches_no_stripe(
    post_checkout: PostCheckout, client: httpx.AsyncClient, token: Any, stripe_fake: StripeFake
) -> None:
    """Stripe refuses a Checkout payment below its minimum charge (0.50 USD,
    docs.stripe.com/currencies#minimum-and-maximum-charge-amounts): a debt of 0.30 USD cannot
    be repaid by card. The client is told so (409, how to settle it: a top-up), not given
    Stripe's refusal as a 502 to retry forever, and no session is made."""
    await charge_usage(client, token, "acc_1", 30, "usd")
    body = {
        "purpose": "debt_repayment",
        "success_url": f"{APP_URL}/ok",
        "cancel_url": f"{APP_URL}/no",
    }
    response = await post_checkout("acc_1", body)
    assert response.status_code == 409, response.text
    assert response.json()["code"] == "debt_below_minimum_charge"
    assert "top-up" in response.json()["detail"]
    assert stripe_fake.requests_to("POST", "/v1/checkout/sessions") == []
    assert stripe_fake.all("checkout.session") == []


async def test_a_debt_stripe_refuses_as_below_its_minimum_once_converted_is_409_too(
    post_checkout: PostCheckout, client: httpx.AsyncClient, token: Any, stripe_fake: StripeFake
) -> None:
    """Stripe's minimum also holds once converted to the settlement currency, which no table
    of ours can know: its `amount_too_small` refusal is answered as the 409 above, not 502, and
    the retry with the same key gets the same answer."""
    stripe_fake.minimum_charge["usd"] = 100  # 0.80 USD is below 0.50 of the settlement currency
    await charge_usage(client, token, "acc_1", 80, "usd")
    body = {
        "purpose": "debt_repayment",
        "success_url": f"{APP_URL}/ok",
        "cancel_url": f"{APP_URL}/no",
    }
    for _ in range(2):
        response = await post_checkout("acc_1", body, key="repay-1")
        assert response.status_code == 409, response.text
        assert response.json()["code"] == "debt_below_minimum_charge"
    assert stripe_fake.all("checkout.session") == []


async def test_a_debt_above_stripes_largest_charge_is_repaid_in_parts(
    post_checkout: PostCheckout, client: httpx.AsyncClient, token: Any, stripe_fake: StripeFake
) -> None:
    """Stripe charges at most eight digits of minor units (999,999.99 USD,
    docs.stripe.com/currencies#minimum-and-maximum-charge-amounts) and refuses a Checkout
    session for more (`amount_too_large`). A debt above that (usage charges go up to 10^12)
    was asked for whole: a 502 on every attempt, a debt the client could never repay. The
    repayment asks for the largest charge Stripe takes (the rest is asked once it is paid),
    and asked again returns that same open repayment."""
    await charge_usage(client, token, "acc_1", 150_000_000, "usd")
    body = {
        "purpose": "debt_repayment",
        "success_url": f"{APP_URL}/ok",
        "cancel_url": f"{APP_URL}/no",
    }
    response = await post_checkout("acc_1", body)
    assert response.status_code == 201, response.text
    assert response.json()["amount"] == 99_999_999
    again = await post_checkout("acc_1", body)
    assert again.status_code == 201, again.text
    assert again.json()["id"] == response.json()["id"]
    [created] = stripe_fake.all("checkout.session")
    assert created["amount_total"] == 99_999_999


async def test_a_top_up_below_stripes_minimum_charge_is_422_even_where_the_limits_allow_it(
    post_checkout: PostCheckout, app: Any, stripe_fake: StripeFake
) -> None:
    """TOP_UP_LIMITS is the operator's; Stripe still refuses a payment below its minimum
    charge (0.50 USD), so a smaller configured minimum must not turn into Stripe's 400 as a
    502: the amount is out of bounds (422), as any other."""
    limits = app.state.settings.top_up_limits
    limits["usd"] = type(limits["usd"])(min=10, max=500000)
    response = await post_checkout("acc_1", top_up_body(amount=20))
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_error"
    assert "50" in response.json()["detail"]
    assert stripe_fake.requests_to("POST", "/v1/checkout/sessions") == []
    assert (await post_checkout("acc_1", top_up_body(amount=50))).status_code == 201


async def test_the_stripe_fake_refuses_a_checkout_payment_below_stripes_minimum_charge(
    stripe_fake: StripeFake,
) -> None:
    """The fake keeps Stripe's rule, so a service sending such a session fails in tests too."""

    def session(amount: int, currency: str) -> dict[str, Any]:
        line = {"currency": currency, "unit_amount": amount, "product_data": {"name": "Debt"}}
        return {
            "mode": "payment",
            "success_url": f"{APP_URL}/ok",
            "line_items": [{"price_data": line, "quantity": 1}],
        }

    for amount, currency in ((49, "usd"), (29, "gbp"), (49, "jpy")):
        with pytest.raises(StripeError) as refused:
            stripe_fake.call("post", "/v1/checkout/sessions", {}, session(amount, currency))
        assert refused.value.status == 400
        assert refused.value.body()["error"]["code"] == "amount_too_small"
    for amount, currency in ((50, "usd"), (30, "gbp"), (50, "jpy")):
        status, _ = stripe_fake.call("post", "/v1/checkout/sessions", {}, session(amount, currency))
        assert status == 200


async def test_a_payment_in_another_currency_than_the_accounts_is_refused(
    post_checkout: PostCheckout, db: async_sessionmaker[AsyncSession], app: Any
) -> None:
    app.state.settings.top_up_limits["eur"] = type(app.state.settings.top_up_limits["usd"])(
        min=100, max=100000
    )
    async with db() as session, session.begin():
        session.add(Account(id="acc_1", currency="usd"))
    response = await post_checkout("acc_1", top_up_body(currency="eur"))
    assert response.status_code == 422
    assert response.json()["code"] == "currency_mismatch"


async def test_stripe_failing_is_502_and_a_retry_succeeds(
    post_checkout: PostCheckout, stripe_fake: StripeFake, db: async_sessionmaker[AsyncSession]
) -> None:
    # The gateway retries once (STRIPE_MAX_NETWORK_RETRIES=1 in tests): both attempts fail.
    stripe_fake.fail_next(2, 500, path_prefix="/v1/checkout/sessions")
    response = await post_checkout("acc_1", top_up_body(), key="retry-me")
    assert response.status_code == 502
    assert response.json()["code"] == "stripe_unavailable"
    assert stripe_fake.all("checkout.session") == []
    async with db() as session:
        assert [r.status for r in (await session.scalars(select(CheckoutSession))).all()] == [
            "failed"
        ]
    retry = await post_checkout("acc_1", top_up_body(), key="retry-me")
    assert retry.status_code == 201, retry.text
    assert len(stripe_fake.all("checkout.session")) == 1


async def test_too_many_stripe_sessions_per_minute_is_429_with_retry_after(
    post_checkout: PostCheckout, app: Any, stripe_fake: StripeFake
) -> None:
    app.state.settings.stripe_sessions_per_account_per_minute = 2
    assert (await post_checkout("acc_1", top_up_body())).status_code == 201
    assert (await post_checkout("acc_1", top_up_body())).status_code == 201
    response = await post_checkout("acc_1", top_up_body())
    assert response.status_code == 429
    assert response.json()["code"] == "rate_limited"
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert len(stripe_fake.all("checkout.session")) == 2
    assert (await post_checkout("acc_2", top_up_body())).status_code == 201


async def test_reading_a_session_syncs_stripe_status_but_not_fulfilment(
    post_checkout: PostCheckout, client: httpx.AsyncClient, token: Any, stripe_fake: StripeFake
) -> None:
    created = (await post_checkout("acc_1", top_up_body())).json()
    stripe_id = created["stripe_checkout_session_id"]
    stripe_fake.complete_checkout(stripe_id)  # the webhook has not arrived
    response = await client.get(
        f"/v1/accounts/acc_1/checkout-sessions/{created['id']}",
        headers=bearer(token(account_id="acc_1")),
    )
    assert response.status_code == 200
    assert response.json()["status"] == "complete"
    assert response.json()["payment_status"] == "paid"
    assert response.json()["fulfilled"] is False
    balance = await client.get(
        "/v1/accounts/acc_1/balance", headers=bearer(token(account_id="acc_1"))
    )
    assert balance.json()["balance"] == 0


async def test_polling_a_session_asks_stripe_at_most_once_a_second_per_account(
    post_checkout: PostCheckout, client: httpx.AsyncClient, token: Any, stripe_fake: StripeFake
) -> None:
    """Each read of an unfulfilled session could ask Stripe: one client polling its open
    checkouts as fast as it can would use up the Stripe rate limit every checkout shares (the
    contract: one client cannot exhaust it for all). Reads in between answer the stored state."""
    first = (await post_checkout("acc_1", top_up_body())).json()
    second = (await post_checkout("acc_1", top_up_body(amount=6000))).json()
    headers = bearer(token(account_id="acc_1"))

    def stripe_reads() -> int:
        return sum(
            1
            for r in stripe_fake.requests
            if r.method == "GET" and r.path.startswith("/v1/checkout/sessions/")
        )

    for _ in range(10):
        for created in (first, second):
            response = await client.get(
                f"/v1/accounts/acc_1/checkout-sessions/{created['id']}", headers=headers
            )
            assert response.status_code == 200
            assert response.json()["status"] == "open"
    assert stripe_reads() == 1
    other = (await post_checkout("acc_2", top_up_body())).json()
    await client.get(
        f"/v1/accounts/acc_2/checkout-sessions/{other['id']}",
        headers=bearer(token(account_id="acc_2")),
    )
    assert stripe_reads() == 2  # another account's read is its own


async def test_unknown_or_malformed_session_ids_are_404(
    client: httpx.AsyncClient, token: Any
) -> None:
    headers = bearer(token(account_id="acc_1"))
    for session_id in (str(uuid.uuid4()), "not-a-uuid"):
        response = await client.get(
            f"/v1/accounts/acc_1/checkout-sessions/{session_id}", headers=headers
        )
        assert response.status_code == 404
        assert response.json()["code"] == "checkout_session_not_found"


async def test_success_url_keeps_its_query_and_fragment(
    post_checkout: PostCheckout, stripe_fake: StripeFake
) -> None:
    body = {**top_up_body(), "success_url": f"{APP_URL}/done?tab=balance#top"}
    assert (await post_checkout("acc_1", body)).status_code == 201
    [created] = stripe_fake.all("checkout.session")
    assert created["success_url"] == (
        f"{APP_URL}/done?tab=balance&session_id={{CHECKOUT_SESSION_ID}}#top"
    )


async def test_the_stripe_customer_is_reused_for_later_checkouts(
    post_checkout: PostCheckout, stripe_fake: StripeFake, db: async_sessionmaker[AsyncSession]
) -> None:
    await post_checkout("acc_1", top_up_body())
    await post_checkout("acc_1", subscription_body())
    async with db() as session:
        customer_id = await session.scalar(
            select(Account.stripe_customer_id).where(Account.id == "acc_1")
        )
    assert [c["id"] for c in stripe_fake.all("customer")] == [customer_id]


async def test_two_tabs_repaying_one_debt_at_once_get_one_payable_session(
    post_checkout: PostCheckout, client: httpx.AsyncClient, token: Any, stripe_fake: StripeFake
) -> None:
    """A second repayment of the same debt asked while the first one's session is still being
    created at Stripe (its row pending) answers that session, as an open one would: the
    account never has two payable repayments of one debt (which the client could both pay)."""
    await charge_usage(client, token, "acc_1", 2500, "usd")
    body = {
        "purpose": "debt_repayment",
        "success_url": f"{APP_URL}/ok",
        "cancel_url": f"{APP_URL}/no",
    }
    # Stripe slow on the first creation: the second request comes while it is pending
    stripe_fake.fail_next(1, kind="timeout", delay=0.5, path_prefix="/v1/checkout/sessions")
    first = asyncio.create_task(post_checkout("acc_1", body))
    await asyncio.sleep(0.2)
    second = await post_checkout("acc_1", body)
    first_answer = await first
    assert (first_answer.status_code, second.status_code) == (201, 201), second.text
    assert first_answer.json()["id"] == second.json()["id"]
    assert len(stripe_fake.all("checkout.session")) == 1


async def test_a_subscription_checkout_never_deadlocks_with_a_batch_writing_its_channel(
    post_checkout: PostCheckout, database_url: str
) -> None:
    """A batch records its channels' access (`record_access_changes` writes a new version
    of each channel's row) and goes on to lock their accounts (a first payment, a credit). A
    subscription checkout locked its account and then claimed the channel with an insert,
    which waits for the batch's uncommitted channel row: a cycle whose victim was the
    checkout (503 after `deadlock_timeout`). A channel that exists is read, never waited for."""
    first = await post_checkout("acc_1", subscription_body("ch_1"))
    assert first.status_code == 201, first.text
    batch = await asyncpg.connect(plain_dsn(database_url))
    try:
        held = batch.transaction()
        await held.start()
        # the batch never looks for the deadlock first: the checkout's backend would
        await batch.execute("SET LOCAL deadlock_timeout = '30s'")
        await batch.execute(  # `TOUCH_CHANNELS`
            "UPDATE channels SET updated_at = now() WHERE id = 'ch_1'"
        )
        again = asyncio.create_task(post_checkout("acc_1", subscription_body("ch_1")))
        for _ in range(100):  # until the checkout ends or waits
            if again.done() or await batch.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            ):
                break
            await asyncio.sleep(0.02)
        await batch.execute(  # `RECORD_FIRST_PAYMENTS`
            "UPDATE accounts SET first_paid_at = now() WHERE id = 'acc_1'"
        )
        await held.commit()
    finally:
        await batch.close()
    response = await again
    assert response.status_code == 201, response.text
    assert response.json()["id"] == first.json()["id"]  # the open one, returned again


async def test_a_channel_id_the_access_check_cannot_address_is_refused(
    client: httpx.AsyncClient, token: Any, post_checkout: PostCheckout, stripe_fake: StripeFake
) -> None:
    """Every channel a checkout sells can be checked at GET /v1/channels/{channel_id}/access:
    an id with `/` never reaches that route (encoded or not, the path splits there), so the
    other services would deny a paid channel; such an id is refused before anything is made."""
    response = await post_checkout("acc_1", subscription_body(channel_id="wa/42"))
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_error"
    assert stripe_fake.all("checkout.session") == []
    reader = bearer(token(scope="billing:read"))
    for path in ("/v1/channels/wa%2F42/access", "/v1/channels/wa/42/access"):
        assert (await client.get(path, headers=reader)).status_code == 404


async def test_the_browser_frontend_can_read_retry_after_and_the_replay_header(
    client: httpx.AsyncClient, token: Any, app: Any
) -> None:
    """The frontend calls from the browser (CORS): a header the contract names for its answers
    (`Retry-After` of a 429, `Idempotent-Replayed` of a replay) is one its code can read only
    when the response exposes it (neither is CORS-safelisted)."""
    app.state.settings.stripe_sessions_per_account_per_minute = 1
    headers = {
        **bearer(token(account_id="acc_1")),
        "Origin": APP_URL,
        "Idempotency-Key": "pay-once",
    }
    url = "/v1/accounts/acc_1/checkout-sessions"
    assert (await client.post(url, json=top_up_body(), headers=headers)).status_code == 201
    replay = await client.post(url, json=top_up_body(), headers=headers)
    assert replay.headers["Idempotent-Replayed"] == "true"
    limited = await client.post(
        url, json=top_up_body(600), headers={**headers, "Idempotency-Key": "2"}
    )
    assert limited.status_code == 429 and limited.headers["Retry-After"]
    for response in (replay, limited):
        assert response.headers["access-control-allow-origin"] == APP_URL
        exposed = response.headers.get("access-control-expose-headers", "").lower().split(", ")
        assert {"retry-after", "idempotent-replayed"} <= set(exposed), response.headers


async def test_a_client_back_from_checkout_reads_the_session_by_the_id_in_its_success_url(
    post_checkout: PostCheckout, client: httpx.AsyncClient, token: Any, stripe_fake: StripeFake
) -> None:
    """The success URL carries `session_id={CHECKOUT_SESSION_ID}`, which Stripe fills with its
    own id (its live ids are 66 characters): that is the id a browser back from Checkout has
    (the page it left is gone), and the read that shows it the truth before the webhook must
    accept it, for the account's own sessions only."""
    created = (await post_checkout("acc_1", top_up_body())).json()
    stripe_id = created["stripe_checkout_session_id"]
    stripe_fake.complete_checkout(stripe_id)  # the webhook has not arrived
    for returned in (stripe_id, "cs_live_" + "a1" * 29):
        assert len(returned) <= 66
    response = await client.get(
        f"/v1/accounts/acc_1/checkout-sessions/{stripe_id}",
        headers=bearer(token(account_id="acc_1")),
    )
    assert response.status_code == 200, response.text
    assert response.json()["id"] == created["id"]
    assert response.json()["status"] == "complete"
    assert response.json()["fulfilled"] is False
    other = await client.get(
        f"/v1/accounts/acc_2/checkout-sessions/{stripe_id}",
        headers=bearer(token(account_id="acc_2")),
    )
    assert other.status_code == 404 and other.json()["code"] == "checkout_session_not_found"
    unknown = await client.get(
        "/v1/accounts/acc_1/checkout-sessions/cs_live_" + "a1" * 29,
        headers=bearer(token(account_id="acc_1")),
    )
    assert unknown.status_code == 404 and unknown.json()["code"] == "checkout_session_not_found"
