"""A client retrying a checkout after a 502 whose cause was Stripe's answer getting lost.

The Stripe fake's `lost_response` failure applies the request at Stripe (the Checkout session
exists, its answer kept under our idempotency key) and then answers 500: every attempt of the
gateway (the SDK retries once in tests) gets a 500, the service answers 502
`stripe_unavailable`, and one session exists at Stripe whose URL nobody received.

A retry with the same `Idempotency-Key` and body is the same request: it reuses the row the
first attempt left and its Stripe key, so Stripe replays the session it made instead of making
a second one. Another key is a new request, by the client's choice.
"""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.models import CheckoutSession
from tests.checkout.conftest import APP_URL, PostCheckout, subscription_body, top_up_body
from tests.conftest import bearer
from tests.stripe_fake import StripeFake

CHECKOUT_PATH = "/v1/checkout/sessions"
REPAY = {"purpose": "debt_repayment", "success_url": f"{APP_URL}/ok", "cancel_url": f"{APP_URL}/no"}


async def lost_answer(
    post_checkout: PostCheckout,
    stripe_fake: StripeFake,
    account_id: str,
    body: dict[str, Any],
    key: str,
) -> dict[str, Any]:
    """Post a checkout whose every Stripe answer is lost; returns the session Stripe made."""
    stripe_fake.fail_next(2, 500, kind="lost_response", path_prefix=CHECKOUT_PATH, method="POST")
    response = await post_checkout(account_id, body, key=key)
    assert response.status_code == 502, response.text
    assert response.json()["code"] == "stripe_unavailable"
    [made] = stripe_fake.all("checkout.session")
    assert made["status"] == "open"
    return made


def stripe_keys(stripe_fake: StripeFake) -> list[str | None]:
    return [r.idempotency_key for r in stripe_fake.requests_to("POST", CHECKOUT_PATH)]


async def rows(db: async_sessionmaker[AsyncSession]) -> list[CheckoutSession]:
    async with db() as session:
        return list((await session.scalars(select(CheckoutSession))).all())


async def test_a_top_up_retried_with_its_key_after_a_lost_answer_gets_the_session_stripe_made(
    post_checkout: PostCheckout, stripe_fake: StripeFake, db: async_sessionmaker[AsyncSession]
) -> None:
    made = await lost_answer(post_checkout, stripe_fake, "acc_1", top_up_body(), "pay-1")
    [first] = await rows(db)

    retry = await post_checkout("acc_1", top_up_body(), key="pay-1")

    assert retry.status_code == 201, retry.text
    assert retry.json()["id"] == str(first.id)
    assert retry.json()["stripe_checkout_session_id"] == made["id"]
    assert retry.json()["url"] == made["url"]
    assert [s["id"] for s in stripe_fake.all("checkout.session")] == [made["id"]]
    assert set(stripe_keys(stripe_fake)) == {f"billing:checkout:{first.id}"}
    [row] = await rows(db)
    assert (row.status, row.stripe_id) == ("open", made["id"])
    replay = await post_checkout("acc_1", top_up_body(), key="pay-1")
    assert replay.json() == retry.json()
    assert replay.headers["Idempotent-Replayed"] == "true"


async def test_a_subscription_retried_with_its_key_after_a_lost_answer_leaves_one_session(
    post_checkout: PostCheckout, stripe_fake: StripeFake, db: async_sessionmaker[AsyncSession]
) -> None:
    made = await lost_answer(post_checkout, stripe_fake, "acc_1", subscription_body("ch_1"), "buy")

    retry = await post_checkout("acc_1", subscription_body("ch_1"), key="buy")

    assert retry.status_code == 201, retry.text
    assert retry.json()["stripe_checkout_session_id"] == made["id"]
    assert [s["id"] for s in stripe_fake.all("checkout.session")] == [made["id"]]
    assert len(set(stripe_keys(stripe_fake))) == 1
    assert [(r.status, r.stripe_id) for r in await rows(db)] == [("open", made["id"])]


async def test_a_retry_with_another_idempotency_key_is_a_new_checkout(
    post_checkout: PostCheckout, stripe_fake: StripeFake, db: async_sessionmaker[AsyncSession]
) -> None:
    made = await lost_answer(post_checkout, stripe_fake, "acc_1", top_up_body(), "pay-1")

    other = await post_checkout("acc_1", top_up_body(), key="pay-2")

    assert other.status_code == 201, other.text
    assert other.json()["stripe_checkout_session_id"] != made["id"]
    assert len(stripe_fake.all("checkout.session")) == 2
    assert len(set(stripe_keys(stripe_fake))) == 2
    assert sorted(r.status for r in await rows(db)) == ["failed", "open"]


async def test_a_debt_repayment_retried_after_the_debt_changed_is_made_for_the_new_debt(
    post_checkout: PostCheckout, client: httpx.AsyncClient, token: Any, stripe_fake: StripeFake
) -> None:
    """The request is "repay my debt": once the debt has changed, the first attempt's session
    (for the old amount, its URL never given) is not what the client asks for."""

    async def charge(usage_id: str, amount: int) -> None:
        usage = {
            "id": usage_id,
            "amount": amount,
            "currency": "usd",
            "kind": "conversation",
            "occurred_at": "2026-11-01T10:00:00Z",
        }
        response = await client.post(
            "/v1/accounts/acc_1/usage-charges",
            json=usage,
            headers=bearer(token(scope="usage:write")),
        )
        assert response.status_code == 201, response.text

    await charge("conv-1", 1234)
    made = await lost_answer(post_checkout, stripe_fake, "acc_1", REPAY, "repay")
    assert made["amount_total"] == 1234
    await charge("conv-2", 100)

    retry = await post_checkout("acc_1", REPAY, key="repay")

    assert retry.status_code == 201, retry.text
    assert retry.json()["amount"] == 1334
    assert retry.json()["stripe_checkout_session_id"] != made["id"]


async def test_an_accounts_first_checkout_retried_by_another_member_after_a_lost_customer_answer(
    post_checkout: PostCheckout, stripe_fake: StripeFake, token: Any
) -> None:
    """The Stripe customer is created with a key derived from the account id (never two
    customers). Stripe refuses a key sent again with other parameters (400 idempotency_error,
    docs.stripe.com/api/idempotent_requests), so what is sent under it must not depend on who
    asks: after Stripe made the customer but its answer was lost, another member of the account
    (another email in the token) or a service token retrying the first checkout got 502 for
    the 24 hours Stripe keeps the key. It gets the same customer, with the current email."""
    stripe_fake.fail_next(2, 500, kind="lost_response", path_prefix="/v1/customers", method="POST")
    first = await post_checkout(
        "acc_1", top_up_body(), tok=token(account_id="acc_1", email="a@x.io")
    )
    assert first.status_code == 502, first.text
    [made] = stripe_fake.all("customer")

    retry = await post_checkout(
        "acc_1", top_up_body(), tok=token(account_id="acc_1", email="b@x.io")
    )

    assert retry.status_code == 201, retry.text
    assert [c["id"] for c in stripe_fake.all("customer")] == [made["id"]]
    assert stripe_fake.all("customer")[0]["email"] == "b@x.io"
    [session] = stripe_fake.all("checkout.session")
    assert session["customer"] == made["id"]


async def test_an_email_stripe_refuses_does_not_stop_the_account_from_paying(
    post_checkout: PostCheckout, stripe_fake: StripeFake, token: Any
) -> None:
    """Stripe refuses some addresses our plausibility check lets through as the billing
    contact ("Invalid email address: test@test", 400 `email_invalid`). The customer's email is
    only where Stripe sends receipts: the customer is made without it and the checkout goes
    on, rather than answering 502 on every checkout of the account for ever."""
    response = await post_checkout(
        "acc_1", top_up_body(), tok=token(account_id="acc_1", email="test@test")
    )

    assert response.status_code == 201, response.text
    [customer] = stripe_fake.all("customer")
    assert customer["email"] is None
    [session] = stripe_fake.all("checkout.session")
    assert session["customer"] == customer["id"]
