"""The Stripe fake, driven through the real stripe SDK (async methods, real HTTP)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import stripe

from tests.stripe_fake import (
    API_VERSION,
    StripeFake,
    event_payload,
    object_errors,
    sign,
    spec_event_types,
)


class _FastRetryClient(stripe.HTTPXClient):
    """The SDK's httpx client without its 0.5 s minimum back-off (keeps tests fast)."""

    def _sleep_time_seconds(self, num_retries: int, response: Any = None) -> float:
        return 0.01


@pytest.fixture(scope="module")
def server() -> Iterator[StripeFake]:
    with StripeFake() as fake:
        yield fake


@pytest.fixture
def fake(server: StripeFake) -> StripeFake:
    server.reset()
    server.add_price(
        id="price_basic_monthly",
        unit_amount=900,
        currency="eur",
        interval="month",
        nickname="Basic",
    )
    server.add_price(id="price_credits", unit_amount=2500, currency="eur", interval=None)
    return server


def make_client(fake: StripeFake, *, retries: int = 0, timeout: float = 10) -> stripe.StripeClient:
    return stripe.StripeClient(
        "sk_test_fake",
        base_addresses={"api": fake.url},
        http_client=_FastRetryClient(timeout=timeout),
        max_network_retries=retries,
    )


@pytest.fixture
async def client(fake: StripeFake) -> AsyncIterator[stripe.StripeClient]:
    return make_client(fake)


SUB_SESSION: dict[str, Any] = {
    "mode": "subscription",
    "line_items": [{"price": "price_basic_monthly", "quantity": 1}],
    "success_url": "https://app.example/success?session_id={CHECKOUT_SESSION_ID}",
    "cancel_url": "https://app.example/cancel",
    "client_reference_id": "org_1",
    "metadata": {"org_id": "org_1"},
    "subscription_data": {"metadata": {"org_id": "org_1"}},
}


# ----------------------------------------------------------------------------- API basics


async def test_checkout_session_create_and_retrieve(
    fake: StripeFake, client: stripe.StripeClient
) -> None:
    session = await client.v1.checkout.sessions.create_async(params=SUB_SESSION)
    assert session.id.startswith("cs_test_")
    assert session.url == f"{fake.url}/checkout/{session.id}"
    assert session.status == "open"
    assert session.amount_total == 900
    assert session.currency == "eur"
    assert session.metadata["org_id"] == "org_1"

    again = await client.v1.checkout.sessions.retrieve_async(session.id)
    assert again.id == session.id
    assert again.client_reference_id == "org_1"
    listed = await client.v1.checkout.sessions.list_async(params={"limit": 5})
    assert [s.id for s in listed.data] == [session.id]

    req = fake.requests_to("POST", "/v1/checkout/sessions")[0]
    assert req.params["line_items"] == [{"price": "price_basic_monthly", "quantity": 1}]
    assert req.idempotency_key
    assert req.stripe_version == API_VERSION
    assert not object_errors("checkout.session", fake.get("checkout.session", session.id))


async def test_misspelled_parameter_rejected(fake: StripeFake, client: stripe.StripeClient) -> None:
    params = {**SUB_SESSION, "sucess_url": SUB_SESSION["success_url"]}
    del params["success_url"]
    with pytest.raises(stripe.InvalidRequestError) as info:
        await client.v1.checkout.sessions.create_async(params=params)  # type: ignore[arg-type]
    assert info.value.param == "sucess_url"
    assert "unknown parameter" in str(info.value.user_message)
    assert fake.all("checkout.session") == []
    assert fake.requests[-1].status == 400


@pytest.mark.parametrize(
    ("override", "param"),
    [
        ({"mode": "subscriptionz"}, "mode"),
        (
            {"line_items": [{"price": "price_basic_monthly", "quantity": "many"}]},
            "line_items[0][quantity]",
        ),
        ({"expires_at": "tomorrow"}, "expires_at"),
    ],
)
async def test_wrong_type_or_enum_rejected(
    client: stripe.StripeClient, override: dict[str, Any], param: str
) -> None:
    with pytest.raises(stripe.InvalidRequestError) as info:
        await client.v1.checkout.sessions.create_async(params={**SUB_SESSION, **override})
    assert info.value.param == param


async def test_nested_unknown_key_rejected(client: stripe.StripeClient) -> None:
    params = {**SUB_SESSION, "subscription_data": {"metadata": {"a": "b"}, "trial_dayz": 3}}
    with pytest.raises(stripe.InvalidRequestError) as info:
        await client.v1.checkout.sessions.create_async(params=params)
    assert info.value.param == "subscription_data[trial_dayz]"


async def test_unknown_price_and_path_and_auth(
    fake: StripeFake, client: stripe.StripeClient
) -> None:
    with pytest.raises(stripe.InvalidRequestError) as info:
        await client.v1.checkout.sessions.create_async(
            params={**SUB_SESSION, "line_items": [{"price": "price_nope", "quantity": 1}]}
        )
    assert info.value.code == "resource_missing"
    assert info.value.http_status == 404
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.customers.retrieve_async("cus_missing")
    bad = stripe.StripeClient(
        "pk_test_wrong_kind", base_addresses={"api": fake.url}, http_client=stripe.HTTPXClient()
    )
    with pytest.raises(stripe.AuthenticationError):
        await bad.v1.customers.list_async()


async def test_idempotent_replay(fake: StripeFake, client: stripe.StripeClient) -> None:
    opts: Any = {"idempotency_key": "key-1"}
    first = await client.v1.customers.create_async(params={"email": "a@example.com"}, options=opts)
    second = await client.v1.customers.create_async(params={"email": "a@example.com"}, options=opts)
    assert first.id == second.id
    assert len(fake.all("customer")) == 1
    assert [r.replayed for r in fake.requests_to("POST", "/v1/customers")] == [False, True]
    assert second.last_response.headers["idempotent-replayed"] == "true"
    with pytest.raises(stripe.IdempotencyError):
        await client.v1.customers.create_async(params={"email": "b@example.com"}, options=opts)
    assert len(fake.all("customer")) == 1


# ----------------------------------------------------------------------------- failures


async def test_injected_500_and_retry_with_same_idempotency_key(fake: StripeFake) -> None:
    fake.fail_next(status=500)
    with pytest.raises(stripe.APIError) as info:
        await make_client(fake).v1.customers.create_async(params={"email": "x@example.com"})
    assert info.value.http_status == 500
    assert fake.all("customer") == []

    fake.fail_next(count=1, status=500, path_prefix="/v1/customers")
    customer = await make_client(fake, retries=2).v1.customers.create_async(
        params={"email": "x@example.com"}
    )
    attempts = fake.requests_to("POST", "/v1/customers")[1:]
    assert [r.status for r in attempts] == [500, 200]
    assert attempts[0].idempotency_key == attempts[1].idempotency_key
    assert [c["id"] for c in fake.all("customer")] == [customer.id]


async def test_injected_429_rate_limit(fake: StripeFake, client: stripe.StripeClient) -> None:
    fake.fail_next(status=429, retry_after=2)
    with pytest.raises(stripe.RateLimitError) as info:
        await client.v1.prices.list_async()
    assert info.value.http_status == 429
    assert info.value.headers is not None
    assert info.value.headers["retry-after"] == "2"
    assert info.value.json_body["error"]["code"] == "rate_limit"  # type: ignore[index]
    # with Stripe-Should-Retry the SDK retries through it
    fake.fail_next(status=429, retry_after=0, should_retry=True)
    prices = await make_client(fake, retries=1).v1.prices.list_async()
    assert {p.id for p in prices.data} == {"price_basic_monthly", "price_credits"}


async def test_injected_card_error_and_timeout(
    fake: StripeFake, client: stripe.StripeClient
) -> None:
    fake.fail_next(kind="card_error", path_prefix="/v1/refunds")
    with pytest.raises(stripe.CardError) as info:
        await client.v1.refunds.create_async(params={"charge": "ch_x"})
    assert info.value.code == "card_declined"

    fake.fail_next(kind="timeout", delay=0.6)
    slow = make_client(fake, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(stripe.APIConnectionError):
        await slow.v1.customers.list_async()
    assert time.monotonic() - started < 0.6
    # the retry of a timed-out create gets the same object once the first attempt finishes
    fake.fail_next(kind="timeout", delay=0.4)
    customer = await make_client(fake, retries=2, timeout=1.5).v1.customers.create_async(
        params={"email": "t@example.com"}
    )
    assert customer.email == "t@example.com"


# ----------------------------------------------------------------------------- webhooks


def test_signature_verifies_with_sdk() -> None:
    event = {"id": "evt_1", "object": "event", "type": "invoice.paid", "data": {"object": {}}}
    body = event_payload(event)
    header = sign(body, "whsec_test")
    assert stripe.WebhookSignature.verify_header(body.decode(), header, "whsec_test", 300)
    parsed = stripe.Webhook.construct_event(body, header, "whsec_test")
    assert parsed.type == "invoice.paid"
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(body.decode(), header, "whsec_other", 300)
    old = sign(body, "whsec_test", timestamp=int(time.time()) - 3600)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(body.decode(), old, "whsec_test", 300)


async def test_webhook_endpoint_crud(fake: StripeFake, client: stripe.StripeClient) -> None:
    we = await client.v1.webhook_endpoints.create_async(
        params={
            "url": "https://app.example/stripe/webhook",
            "enabled_events": ["checkout.session.completed", "invoice.paid"],
        }
    )
    assert we.secret
    assert we.secret.startswith("whsec_")
    updated = await client.v1.webhook_endpoints.update_async(
        we.id, params={"enabled_events": ["*"]}
    )
    assert updated.enabled_events == ["*"]
    listed = await client.v1.webhook_endpoints.list_async()
    assert [w.id for w in listed.data] == [we.id]


# ----------------------------------------------------------------------------- lifecycle


def _assert_valid(event: dict[str, Any]) -> None:
    obj = event["data"]["object"]
    assert event["type"] in spec_event_types()
    assert not object_errors("event", event), object_errors("event", event)
    assert not object_errors(obj["object"], obj), (event["type"], object_errors(obj["object"], obj))


async def test_complete_checkout_subscription(
    fake: StripeFake, client: stripe.StripeClient
) -> None:
    session = await client.v1.checkout.sessions.create_async(params=SUB_SESSION)
    events = fake.complete_checkout(session.id)
    types = [e["type"] for e in events]
    assert types == [
        "customer.created",
        "customer.subscription.created",
        "charge.succeeded",
        "invoice_payment.paid",
        "invoice.paid",
        "checkout.session.completed",
    ]
    for event in events:
        _assert_valid(event)
    by_type = {e["type"]: e["data"]["object"] for e in events}
    sub = by_type["customer.subscription.created"]
    assert sub["metadata"] == {"org_id": "org_1"}
    item = sub["items"]["data"][0]
    assert item["current_period_end"] > item["current_period_start"]
    inv = by_type["invoice.paid"]
    assert inv["parent"]["subscription_details"]["subscription"] == sub["id"]
    assert by_type["charge.succeeded"]["balance_transaction"] is None
    done = by_type["checkout.session.completed"]
    assert (done["subscription"], done["payment_status"]) == (sub["id"], "paid")

    # the service's follow-up reads, with expansions
    invoice = await client.v1.invoices.retrieve_async(inv["id"], params={"expand": ["payments"]})
    payment = invoice.payments.data[0]  # type: ignore[union-attr]
    pi = await client.v1.payment_intents.retrieve_async(
        payment.payment.payment_intent, params={"expand": ["latest_charge"]}
    )
    charge = pi.latest_charge
    assert charge.id == by_type["charge.succeeded"]["id"]  # type: ignore[union-attr]

    fee_events = fake.settle_charge(charge.id, fee=55)  # type: ignore[union-attr]
    assert [e["type"] for e in fee_events] == ["charge.updated"]
    assert fee_events[0]["data"]["previous_attributes"] == {"balance_transaction": None}
    ch = await client.v1.charges.retrieve_async(
        charge.id, params={"expand": ["balance_transaction"]}
    )  # type: ignore[union-attr]
    assert ch.balance_transaction.fee == 55  # type: ignore[union-attr]
    assert ch.balance_transaction.net == 845  # type: ignore[union-attr]

    listed = await client.v1.events.list_async(
        params={"types": ["invoice.paid", "charge.updated"], "limit": 1}
    )
    assert [e.type for e in listed.data] == ["charge.updated"]
    assert listed.has_more
    page2 = await client.v1.events.list_async(
        params={"types": ["invoice.paid", "charge.updated"], "starting_after": listed.data[0].id}
    )
    assert [e.type for e in page2.data] == ["invoice.paid"]


async def test_subscription_update_cancel_and_renew(
    fake: StripeFake, client: stripe.StripeClient
) -> None:
    session = await client.v1.checkout.sessions.create_async(params=SUB_SESSION)
    fake.complete_checkout(session.id)
    sub_id = fake.get("checkout.session", session.id)["subscription"]
    mark = len(fake.events)

    sub = await client.v1.subscriptions.update_async(
        sub_id, params={"cancel_at_period_end": True, "proration_behavior": "none"}
    )
    assert sub.cancel_at_period_end
    assert sub.cancel_at == sub["items"].data[0].current_period_end
    updated = fake.events[mark]
    assert updated["type"] == "customer.subscription.updated"
    assert updated["data"]["previous_attributes"]["cancel_at_period_end"] is False
    assert updated["request"]["idempotency_key"]

    await client.v1.subscriptions.update_async(sub_id, params={"cancel_at": ""})
    events = fake.renew_subscription(sub_id, paid=False)
    assert [e["type"] for e in events] == [
        "customer.subscription.updated",
        "invoice.created",
        "charge.failed",
        "invoice.payment_failed",
        "customer.subscription.updated",
    ]
    assert fake.get("subscription", sub_id)["status"] == "past_due"
    for event in events:
        _assert_valid(event)

    canceled = await client.v1.subscriptions.cancel_async(sub_id, params={"prorate": True})
    assert canceled.status == "canceled"
    assert fake.events[-1]["type"] == "customer.subscription.deleted"
    _assert_valid(fake.events[-1])


async def test_trial_end_on_an_active_subscription_starts_a_trial_period_now(
    fake: StripeFake, client: stripe.StripeClient
) -> None:
    """As Stripe: the subscription is `trialing` from now to `trial_end`, its period is that
    trial and its billing cycle is anchored at `trial_end` (the next charge)."""
    session = await client.v1.checkout.sessions.create_async(params=SUB_SESSION)
    fake.complete_checkout(session.id)
    sub_id = fake.get("checkout.session", session.id)["subscription"]
    before = fake.get("subscription", sub_id)["items"]["data"][0]["current_period_end"]
    fake.set_time(fake.now() + 3600)
    target = before + 3 * 86400

    sub = await client.v1.subscriptions.update_async(
        sub_id, params={"trial_end": target, "proration_behavior": "none"}
    )

    item = sub["items"].data[0]
    assert sub.status == "trialing"
    assert (item.current_period_start, item.current_period_end) == (fake.now(), target)
    assert (sub.trial_start, sub.trial_end, sub.billing_cycle_anchor) == (
        fake.now(),
        target,
        target,
    )
    _assert_valid(fake.events[-1])


async def test_payment_mode_refund_and_dispute(
    fake: StripeFake, client: stripe.StripeClient
) -> None:
    session = await client.v1.checkout.sessions.create_async(
        params={
            "mode": "payment",
            "line_items": [{"price": "price_credits", "quantity": 2}],
            "success_url": "https://app.example/ok",
            "payment_intent_data": {"metadata": {"org_id": "org_1"}},
        }
    )
    events = fake.complete_checkout(session.id, payment_status="unpaid")
    assert [e["type"] for e in events][-1] == "checkout.session.completed"
    assert events[-1]["data"]["object"]["payment_status"] == "unpaid"
    events = fake.async_payment_succeeded(session.id)
    assert [e["type"] for e in events] == [
        "charge.succeeded",
        "checkout.session.async_payment_succeeded",
    ]
    pi_id = fake.get("checkout.session", session.id)["payment_intent"]
    assert fake.get("payment_intent", pi_id)["metadata"] == {"org_id": "org_1"}

    refund = await client.v1.refunds.create_async(
        params={
            "payment_intent": pi_id,
            "amount": 1000,
            "reason": "requested_by_customer",
            "metadata": {"r": "1"},
        }
    )
    assert refund.status == "succeeded"
    assert refund.amount == 1000
    assert [e["type"] for e in fake.events[-2:]] == ["refund.created", "charge.refunded"]
    with pytest.raises(stripe.InvalidRequestError) as info:
        await client.v1.refunds.create_async(params={"payment_intent": pi_id, "amount": 9999})
    assert info.value.param == "amount"
    failed = fake.fail_refund(refund.id)
    assert failed[0]["type"] == "refund.updated"
    assert failed[0]["data"]["object"]["status"] == "failed"

    charge_id = fake.get("payment_intent", pi_id)["latest_charge"]
    created = fake.create_dispute(charge_id)
    dispute_id = created[0]["data"]["object"]["id"]
    withdrawn = fake.withdraw_dispute_funds(dispute_id)
    closed = fake.close_dispute(dispute_id, won=True)
    assert [e["type"] for e in created + withdrawn + closed] == [
        "charge.dispute.created",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.closed",
        "charge.dispute.funds_reinstated",
    ]
    for event in created + withdrawn + closed + failed:
        _assert_valid(event)
    dispute = await client.v1.disputes.retrieve_async(dispute_id)
    assert dispute.status == "won"
    assert json.loads(event_payload(closed[0]))["type"] == "charge.dispute.closed"


async def test_portal_customers_and_expire(fake: StripeFake, client: stripe.StripeClient) -> None:
    customer = await client.v1.customers.create_async(
        params={"email": "p@example.com", "metadata": {"org_id": "org_9"}}
    )
    updated = await client.v1.customers.update_async(
        customer.id, params={"name": "Pat", "metadata": {"org_id": ""}}
    )
    assert updated.name == "Pat"
    assert updated.metadata.to_dict() == {}
    found = await client.v1.customers.search_async(params={"query": "email:'p@example.com'"})
    assert [c.id for c in found.data] == [customer.id]

    config = await client.v1.billing_portal.configurations.create_async(
        params={
            "features": {"subscription_cancel": {"enabled": True, "mode": "at_period_end"}},
            "business_profile": {"headline": "Billing"},
        }
    )
    config = await client.v1.billing_portal.configurations.update_async(
        config.id, params={"default_return_url": "https://app.example/billing"}
    )
    assert config.default_return_url == "https://app.example/billing"
    configs = await client.v1.billing_portal.configurations.list_async()
    assert [c.id for c in configs.data] == [config.id]
    portal = await client.v1.billing_portal.sessions.create_async(
        params={"customer": customer.id, "configuration": config.id}
    )
    assert portal.url == f"{fake.url}/billing_portal/{portal.id}"
    assert portal.return_url == "https://app.example/billing"
    assert not object_errors(
        "billing_portal.session", fake.get("billing_portal.session", portal.id)
    )

    session = await client.v1.checkout.sessions.create_async(
        params={**SUB_SESSION, "customer": customer.id}
    )
    items = await client.v1.checkout.sessions.line_items.list_async(session.id)
    assert [i.price.id for i in items.data] == ["price_basic_monthly"]  # type: ignore[union-attr]
    expired = await client.v1.checkout.sessions.expire_async(session.id)
    assert expired.status == "expired"
    assert fake.events[-1]["type"] == "checkout.session.expired"
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.checkout.sessions.expire_async(session.id)
