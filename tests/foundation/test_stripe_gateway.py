"""The gateway talks to the Stripe fake through the real SDK over real HTTP."""

from __future__ import annotations

import time

import pytest

from app.errors import StripeUnavailable
from app.stripe_gateway import API_VERSION, StripeGateway, StripeRequestRejected, idempotency_key
from tests.conftest import STRIPE_KEY
from tests.stripe_fake import StripeFake


def session_params(**overrides: object) -> dict[str, object]:
    params: dict[str, object] = {
        "mode": "payment",
        "line_items": [
            {
                "price_data": {
                    "currency": "usd",
                    "unit_amount": 5000,
                    "product_data": {"name": "Balance top-up"},
                },
                "quantity": 1,
            }
        ],
        "success_url": "https://app.1msg.io/ok?session={CHECKOUT_SESSION_ID}",
        "cancel_url": "https://app.1msg.io/cancel",
    }
    params.update(overrides)
    return params


@pytest.fixture(autouse=True)
def _fresh_fake(stripe_fake: StripeFake) -> None:
    stripe_fake.reset()


async def test_creates_with_our_idempotency_key_and_pinned_version(
    gateway: StripeGateway, stripe_fake: StripeFake
) -> None:
    key = idempotency_key("checkout", "3f6c")
    created = await gateway.create_checkout_session(session_params(), key=key)
    assert created["id"].startswith("cs_")
    again = await gateway.create_checkout_session(session_params(), key=key)
    assert again["id"] == created["id"]
    posts = [r for r in stripe_fake.requests if r.method == "POST"]
    assert [r.idempotency_key for r in posts] == [key, key]
    assert {r.stripe_version for r in posts} == {API_VERSION}
    assert len(stripe_fake.all("checkout.session")) == 1


async def test_misspelled_parameter_is_refused_and_surfaces_clearly(
    gateway: StripeGateway, stripe_fake: StripeFake
) -> None:
    params = session_params()
    params["sucess_url"] = params.pop("success_url")
    with pytest.raises(StripeRequestRejected) as excinfo:
        await gateway.create_checkout_session(params, key=idempotency_key("checkout", "x1"))
    error = excinfo.value
    assert error.status == 502
    assert error.code == "stripe_request_rejected"
    assert error.param == "sucess_url"
    assert "sucess_url" in error.detail
    assert stripe_fake.all("checkout.session") == []


async def test_wrong_enum_value_is_refused(gateway: StripeGateway) -> None:
    with pytest.raises(StripeRequestRejected) as excinfo:
        await gateway.create_checkout_session(
            session_params(mode="subscribe"), key=idempotency_key("checkout", "x2")
        )
    assert excinfo.value.param == "mode"


async def test_a_500_is_retried_with_the_same_key(
    gateway: StripeGateway, stripe_fake: StripeFake
) -> None:
    stripe_fake.fail_next(1, 500, path_prefix="/v1/customers")
    customer = await gateway.create_customer(account_id="acc_1", key="billing:customer:1")
    assert customer["metadata"] == {"account_id": "acc_1"}
    attempts = [r for r in stripe_fake.requests if r.path == "/v1/customers"]
    assert len(attempts) == 2
    assert {r.idempotency_key for r in attempts} == {"billing:customer:1"}
    assert len(stripe_fake.all("customer")) == 1


async def test_429_is_retried_after_retry_after(
    gateway: StripeGateway, stripe_fake: StripeFake
) -> None:
    stripe_fake.fail_next(1, 429, path_prefix="/v1/customers", retry_after=1)
    started = time.monotonic()
    await gateway.create_customer(account_id="acc_2", key="billing:customer:2")
    assert time.monotonic() - started >= 0.9
    assert len(stripe_fake.all("customer")) == 1


async def test_persistent_failures_become_stripe_unavailable(
    gateway: StripeGateway, stripe_fake: StripeFake
) -> None:
    stripe_fake.fail_next(10, 503, path_prefix="/v1/customers")
    with pytest.raises(StripeUnavailable) as excinfo:
        await gateway.create_customer(account_id="acc_3", key="billing:customer:3")
    assert excinfo.value.code == "stripe_unavailable"
    assert excinfo.value.status == 502
    assert stripe_fake.all("customer") == []


async def test_timeouts_become_stripe_unavailable_within_bounded_time(
    stripe_fake: StripeFake,
) -> None:
    impatient = StripeGateway(
        api_key=STRIPE_KEY, api_base=stripe_fake.url, max_network_retries=1, timeout_seconds=0.3
    )
    stripe_fake.fail_next(5, kind="timeout", delay=2.0, path_prefix="/v1/customers")
    started = time.monotonic()
    try:
        with pytest.raises(StripeUnavailable):
            await impatient.create_customer(account_id="acc_4", key="billing:customer:4")
    finally:
        await impatient.close()
    assert time.monotonic() - started < 3.0


async def test_refused_connection_becomes_stripe_unavailable() -> None:
    nowhere = StripeGateway(
        api_key=STRIPE_KEY, api_base="http://127.0.0.1:1", max_network_retries=1
    )
    try:
        with pytest.raises(StripeUnavailable):
            await nowhere.retrieve_subscription("sub_123")
    finally:
        await nowhere.close()
