"""A debt repayment the client has paid at Stripe repays that debt, even before its
`checkout.session.completed` reaches us: a client back from Checkout whose balance still
shows the debt (a late webhook) and who clicks "repay" again is not charged that debt a
second time. The amount of a new repayment is the debt less the repayments Stripe reports
paid that are not credited yet (409 `no_debt` when nothing is left)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.checkout.conftest import APP_URL, PostCheckout, charge_usage
from tests.conftest import Deliver, bearer
from tests.stripe_fake import StripeFake

REPAY = {"purpose": "debt_repayment", "success_url": f"{APP_URL}/ok", "cancel_url": f"{APP_URL}/no"}


async def spend(client: httpx.AsyncClient, token: Any, charge_id: str, amount: int) -> None:
    await charge_usage(client, token, "acc_1", amount, "usd", usage_id=charge_id)


async def test_a_debt_paid_at_stripe_is_not_charged_again_before_its_event(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    headers = bearer(token(account_id="acc_1"))
    await spend(client, token, "conv-1", 1500)
    first = (await post_checkout("acc_1", REPAY)).json()
    events = stripe_fake.complete_checkout(first["stripe_checkout_session_id"])
    read = await client.get(f"/v1/accounts/acc_1/checkout-sessions/{first['id']}", headers=headers)
    assert (read.json()["payment_status"], read.json()["fulfilled"]) == ("paid", False)

    again = await post_checkout("acc_1", REPAY)
    assert again.status_code == 409, again.text
    assert again.json()["code"] == "no_debt"

    # Usage since then is debt of its own: only that is asked for.
    await spend(client, token, "conv-2", 700)
    more = await post_checkout("acc_1", REPAY)
    assert more.status_code == 201, more.text
    assert more.json()["amount"] == 700

    await deliver(events)
    shown = (await client.get("/v1/accounts/acc_1/balance", headers=headers)).json()
    assert (shown["balance"], shown["debt"]) == (0, 700)


async def test_a_second_repayment_of_the_same_debt_returns_the_open_one(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
) -> None:
    """Two tabs, a double click, or a retry with a new Idempotency-Key: a second repayment of
    an unchanged debt returns the open Checkout session (as a subscription checkout for the same
    channel and plan does), so the client cannot pay the debt twice; once the debt has
    changed, the open one is expired at Stripe before the new one is made."""
    await spend(client, token, "conv-1", 1500)
    first = await post_checkout("acc_1", REPAY)
    assert first.status_code == 201, first.text
    again = await post_checkout("acc_1", REPAY)
    assert again.status_code == 201, again.text
    assert again.json()["id"] == first.json()["id"]
    assert len(stripe_fake.all("checkout.session")) == 1

    await spend(client, token, "conv-2", 700)
    grown = await post_checkout("acc_1", REPAY)
    assert grown.status_code == 201, grown.text
    assert (grown.json()["id"] != first.json()["id"], grown.json()["amount"]) == (True, 2200)
    old = stripe_fake.get("checkout.session", first.json()["stripe_checkout_session_id"])
    assert old["status"] == "expired"
    shown = await client.get(
        f"/v1/accounts/acc_1/checkout-sessions/{first.json()['id']}",
        headers=bearer(token(account_id="acc_1")),
    )
    assert shown.json()["status"] == "expired"


async def test_an_open_repayment_paid_while_a_new_one_is_asked_is_not_asked_again(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
) -> None:
    """The debt grew while an earlier repayment was open, and the client paid that one just as
    the new one is asked for: expiring it, Stripe reports it completed, so the answer is 409
    `no_debt` and no second session for the whole debt; asked again, only the rest."""
    await spend(client, token, "conv-1", 1500)
    first = (await post_checkout("acc_1", REPAY)).json()
    await spend(client, token, "conv-2", 700)
    stripe_fake.complete_checkout(first["stripe_checkout_session_id"])  # events not delivered

    raced = await post_checkout("acc_1", REPAY)
    assert raced.status_code == 409, raced.text
    assert raced.json()["code"] == "no_debt"
    rest = await post_checkout("acc_1", REPAY)
    assert rest.status_code == 201, rest.text
    assert rest.json()["amount"] == 700
