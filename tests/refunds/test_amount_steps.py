"""A refund quote is an amount Stripe refunds: in the three-decimal currencies (BHD, JOD, KWD,
OMR, TND) Stripe's payment flows, refunds included, take only amounts whose last digit is 0
(docs.stripe.com/currencies, three-decimal currencies), and a Stripe fee converted back from
another settlement currency is any number of fils."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from sqlalchemy import select

from app.models import Payment
from tests.conftest import Deliver, TokenFactory, bearer
from tests.refunds.flows import new_events
from tests.refunds.test_refund_workflow import file_request, reply
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import PRICE_ID, open_checkout


async def pay_in_kwd(app: FastAPI, stripe_fake: StripeFake, deliver: Deliver) -> Payment:
    """A 15.000 KWD subscription payment of account `acc_kwd`, settled in USD at 3.26 with a
    Stripe fee of 1.72 USD (0.528 KWD back in the payment's currency)."""
    app.state.settings.waba_setup_fees["kwd"] = 5000
    stripe_fake.add_price(id=PRICE_ID, unit_amount=15000, currency="kwd", interval="month")
    session_id = await open_checkout(
        app, account_id="acc_kwd", purpose="subscription", channel_id="ch_kwd"
    )
    await deliver(stripe_fake.complete_checkout(session_id))
    async with app.state.session_factory() as session:
        payment = await session.scalar(select(Payment).where(Payment.account_id == "acc_kwd"))
        assert payment is not None and payment.stripe_charge_id is not None
    await deliver(
        stripe_fake.settle_charge(
            payment.stripe_charge_id, fee=172, exchange_rate=3.26, currency="usd"
        )
    )
    return payment


async def test_a_quote_in_a_three_decimal_currency_is_an_amount_stripe_refunds(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    """15.000 KWD paid, settled in USD at 3.26; Stripe's fee of 1.72 USD is 0.528 KWD back in
    the payment's currency: paid less the 5.000 KWD setup fee and that fee is 9.472 KWD, which
    Stripe refuses to refund (finance approving the quote got a 502). The quote is 9.470 KWD,
    rounded down (never more than the policy's amount), and that refund goes through."""
    payment = await pay_in_kwd(app, stripe_fake, deliver)
    quotes = await client.get(
        "/v1/accounts/acc_kwd/refund-eligibility", headers=bearer(token(account_id="acc_kwd"))
    )
    assert quotes.status_code == 200, quotes.text
    [quote] = quotes.json()["quotes"]
    assert (quote["amount_paid"], quote["processing_fee"], quote["setup_fee"]) == (15000, 528, 5000)
    assert quote["eligible"] is True, quote
    assert quote["refundable_amount"] == 9470

    created = await file_request(client, token, "acc_kwd", payment_reference=payment.stripe_id)
    seen = len(stripe_fake.events)
    approval = await reply(
        client,
        token,
        created["id"],
        kind="decision",
        message="Approved: zero usage.",
        outcome="approved",
        remedy="refund",
        amount=quote["refundable_amount"],
    )
    assert approval.status_code == 201, approval.text
    await deliver(new_events(stripe_fake, seen))
    [refund] = stripe_fake.all("refund")
    assert (refund["amount"], refund["currency"], refund["status"]) == (9470, "kwd", "succeeded")


async def test_a_refund_stripe_cannot_make_is_422_before_stripe_is_asked(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    """Finance approving a refund of 9.472 KWD got Stripe's refusal as a 502 (to retry, as if
    Stripe were failing): the amount is refused as one that cannot be refunded (422, nothing
    recorded, Stripe not asked), and 9.470 KWD is then approved."""
    payment = await pay_in_kwd(app, stripe_fake, deliver)
    created = await file_request(client, token, "acc_kwd", payment_reference=payment.stripe_id)
    approval = {
        "kind": "decision",
        "message": "Approved: zero usage.",
        "outcome": "approved",
        "remedy": "refund",
    }
    refused = await reply(client, token, created["id"], **approval, amount=9472)
    assert refused.status_code == 422, refused.text
    assert refused.json()["code"] == "validation_error"
    assert stripe_fake.requests_to("post", "/v1/refunds") == []
    approved = await reply(client, token, created["id"], **approval, amount=9470)
    assert approved.status_code == 201, approved.text
