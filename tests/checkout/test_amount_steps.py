"""Amounts Stripe can charge: in the three-decimal currencies (BHD, JOD, KWD, OMR, TND) the last
digit of every amount must be 0, and ISK is charged in whole krónur, multiples of 100 of its
two-decimal API amounts (docs.stripe.com/currencies, three-decimal currencies and special
cases). Usage is charged to the fils, so a debt need not be such an amount."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI

from tests.checkout.conftest import APP_URL, PostCheckout, top_up_body
from tests.checkout.test_one_currency import charge_usage
from tests.stripe_fake import StripeFake

REPAYMENT = {
    "purpose": "debt_repayment",
    "success_url": f"{APP_URL}/ok",
    "cancel_url": f"{APP_URL}/no",
}


def allow_kwd(app: FastAPI) -> None:
    limits = app.state.settings.top_up_limits
    limits["kwd"] = type(limits["usd"])(min=1000, max=1000000)


async def test_a_debt_in_fils_stripe_cannot_charge_is_asked_for_as_the_next_amount_it_can(
    app: FastAPI,
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
) -> None:
    """A debt of 5.005 KWD was asked for as 5005 fils, which Stripe refuses: every repayment
    answered 502 and the debt could not be repaid. It is asked for as 5.010 KWD, the smallest
    amount Stripe charges that repays it (the 5 fils over stay in the prepaid balance)."""
    allow_kwd(app)
    await charge_usage(client, token, "acc_1", 5005, "kwd")
    response = await post_checkout("acc_1", REPAYMENT)
    assert response.status_code == 201, response.text
    assert (response.json()["amount"], response.json()["currency"]) == (5010, "kwd")
    [created] = stripe_fake.all("checkout.session")
    assert created["amount_total"] == 5010


async def test_a_top_up_stripe_cannot_charge_is_422_not_stripes_refusal(
    app: FastAPI, post_checkout: PostCheckout, stripe_fake: StripeFake
) -> None:
    """A top-up of 5.005 KWD is out of what Stripe charges: 422 (as an amount out of bounds),
    not Stripe's refusal as a 502 to retry, and no session is asked for."""
    allow_kwd(app)
    response = await post_checkout("acc_1", top_up_body(amount=5005, currency="kwd"))
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_error"
    assert stripe_fake.requests_to("POST", "/v1/checkout/sessions") == []
    response = await post_checkout("acc_1", top_up_body(amount=5010, currency="kwd"))
    assert response.status_code == 201, response.text
