"""A debt repayment the client has paid at Stripe repays that debt, even before its
`checkout.session.completed` reaches us: a client back from Checkout whose balance still
shows the debt (a late webhook) and who clicks "repay" again is not charged that debt a
second time. The amount of a new repayment is the debt less the repayments Stripe reports
paid that are not credited yet (409 `no_debt` when nothing is left)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.checkout.conftest import APP_URL, PostCheckout
from tests.conftest import Deliver, bearer
from tests.stripe_fake import StripeFake

REPAY = {"purpose": "debt_repayment", "success_url": f"{APP_URL}/ok", "cancel_url": f"{APP_URL}/no"}


async def spend(client: httpx.AsyncClient, token: Any, charge_id: str, amount: int) -> None:
    usage = {
        "id": charge_id,
        "amount": amount,
        "currency": "usd",
        "kind": "conversation",
        "occurred_at": "2026-11-01T10:00:00Z",
    }
    response = await client.post(
        "/v1/accounts/acc_1/usage-charges", json=usage, headers=bearer(token(scope="usage:write"))
    )
    assert response.status_code == 201, response.text


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
