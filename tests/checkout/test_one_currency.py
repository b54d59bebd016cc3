"""One account's ledger holds one currency, whatever writes to it: a payment refused for its
currency, and a finance balance credit, each with real HTTP and Stripe's events."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.accounts.service import ensure_account, ledger_entries_in_account_currency
from app.models import LedgerEntry, OutboxEmail, Payment
from tests.checkout.conftest import APP_URL, PostCheckout, charge_usage, top_up_body
from tests.conftest import Deliver, bearer
from tests.refunds.test_refund_workflow import file_request, reply
from tests.stripe_fake import StripeFake

FINANCE = {"scope": "finance", "sub": "bob@1msg.io"}
OCCURRED = "2026-11-01T00:00:00+00:00"


def decision(remedy: str, amount: int) -> dict[str, Any]:
    """An approving decision with `remedy` for `amount`."""
    message = "Refunded." if remedy == "refund" else "Credited."
    return {
        "kind": "decision",
        "message": message,
        "outcome": "approved",
        "remedy": remedy,
        "amount": amount,
    }


def allow_eur(app: FastAPI) -> None:
    limits = app.state.settings.top_up_limits
    limits["eur"] = type(limits["usd"])(min=100, max=100000)


async def ledger_currencies(db: async_sessionmaker[AsyncSession], account: str) -> list[str]:
    async with db() as session:
        rows = await session.scalars(
            select(LedgerEntry.currency).where(LedgerEntry.account_id == account).distinct()
        )
        return list(rows.all())


async def balance(client: httpx.AsyncClient, token: Any, account: str) -> Any:
    response = await client.get(
        f"/v1/accounts/{account}/balance", headers=bearer(token(account_id=account))
    )
    assert response.status_code == 200, response.text
    return response.json()


async def pay_eur_top_up_after_usd_usage(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
    app: FastAPI,
) -> dict[str, Any]:
    """An EUR top-up opened while the account is unbound, USD usage charged before it is
    paid (the ledger now holds USD), then the EUR payment's events, one delivery each in
    Stripe's order (`charge.succeeded` before `checkout.session.completed`)."""
    allow_eur(app)
    eur = (await post_checkout("acc_1", top_up_body(amount=3000, currency="eur"))).json()
    assert "id" in eur, eur
    await charge_usage(client, token, "acc_1", 100, "usd")
    for event in stripe_fake.complete_checkout(eur["stripe_checkout_session_id"]):
        await deliver([event])
    checkout: dict[str, Any] = eur
    return checkout


async def test_a_payment_refused_for_its_currency_leaves_the_usage_bound_ledger_in_its_currency(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
    app: FastAPI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    eur = await pay_eur_top_up_after_usd_usage(
        post_checkout, client, token, stripe_fake, deliver, app
    )

    assert await ledger_currencies(db, "acc_1") == ["usd"]
    assert await balance(client, token, "acc_1") == {"balance": 0, "debt": 100, "currency": "usd"}
    status = await client.get(
        f"/v1/accounts/acc_1/checkout-sessions/{eur['id']}",
        headers=bearer(token(account_id="acc_1")),
    )
    assert status.json()["fulfilled"] is False
    async with db() as session:
        payments = (await session.execute(select(Payment.currency, Payment.status))).all()
    assert [tuple(p) for p in payments] == [("eur", "succeeded")]
    # the account stays bound to USD: USD usage still debits, EUR money is refused
    await charge_usage(client, token, "acc_1", 50, "usd")
    refused = await client.post(
        "/v1/accounts/acc_1/usage-charges",
        json={
            "id": "usage-eur",
            "amount": 50,
            "currency": "eur",
            "kind": "conversation",
            "occurred_at": OCCURRED,
        },
        headers=bearer(token(scope="usage:write")),
    )
    assert refused.status_code == 422
    assert refused.json()["code"] == "currency_mismatch"
    assert await balance(client, token, "acc_1") == {"balance": 0, "debt": 150, "currency": "usd"}


async def test_a_payment_refused_for_its_currency_still_opens_the_customer_portal(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
    app: FastAPI,
) -> None:
    headers = bearer(token(account_id="acc_1"))
    body = {"return_url": f"{APP_URL}/billing"}
    before = await client.post("/v1/accounts/acc_1/portal-sessions", json=body, headers=headers)
    assert before.json()["code"] == "portal_unavailable"

    await pay_eur_top_up_after_usd_usage(post_checkout, client, token, stripe_fake, deliver, app)

    # the client paid successfully at Stripe: the portal opens though nothing was credited
    opened = await client.post("/v1/accounts/acc_1/portal-sessions", json=body, headers=headers)
    assert opened.status_code == 201, opened.text
    [portal] = stripe_fake.all("billing_portal.session")
    assert portal["return_url"] == body["return_url"]


async def test_a_balance_credit_about_a_payment_in_another_currency_is_refused_and_changes_nothing(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
    app: FastAPI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    allow_eur(app)
    usd = (await post_checkout("acc_1", top_up_body(amount=7500, currency="usd"))).json()
    eur = (await post_checkout("acc_1", top_up_body(amount=3000, currency="eur"))).json()
    await deliver(stripe_fake.complete_checkout(usd["stripe_checkout_session_id"]))
    await deliver(stripe_fake.complete_checkout(eur["stripe_checkout_session_id"]))
    filed = await file_request(
        client,
        token,
        "acc_1",
        type="appeal",
        description="My EUR top-up never reached my balance",
        payment_reference=eur["stripe_checkout_session_id"],
    )
    assert filed["status"] == "received"
    request_id = filed["id"]

    response = await reply(client, token, request_id, **decision("balance_credit", 3000))

    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "currency_mismatch"
    assert await ledger_currencies(db, "acc_1") == ["usd"]
    assert await balance(client, token, "acc_1") == {"balance": 7500, "debt": 0, "currency": "usd"}
    shown = await client.get(
        f"/v1/finance/refund-requests/{request_id}", headers=bearer(token(**FINANCE))
    )
    assert shown.json()["status"] == "received"
    assert shown.json()["responses"] == []
    async with db() as session:
        emails = (await session.scalars(select(OutboxEmail.subject))).all()
    assert not any("decision" in subject for subject in emails)


async def test_a_balance_credit_not_about_a_payment_is_in_the_currency_the_ledger_is_bound_to(
    client: httpx.AsyncClient,
    token: Any,
    app: FastAPI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    allow_eur(app)
    await charge_usage(client, token, "acc_2", 100, "eur")  # binds the account before any payment
    filed = await file_request(client, token, "acc_2", type="compensation", description="Outage")
    response = await reply(client, token, filed["id"], **decision("balance_credit", 700))

    assert response.status_code == 201, response.text
    assert response.json()["status"] == "approved"
    assert await ledger_currencies(db, "acc_2") == ["eur"]
    assert await balance(client, token, "acc_2") == {"balance": 600, "debt": 0, "currency": "eur"}


async def test_an_event_transaction_older_than_the_first_usage_charge_cannot_bind_another_currency(
    client: httpx.AsyncClient, token: Any, db: async_sessionmaker[AsyncSession]
) -> None:
    """Event transactions are SERIALIZABLE with their snapshot taken when they claim their
    events; a usage charge is not. A usage charge that binds the account after that snapshot
    must make the event transaction run again (and then see the charge), not let it credit
    another currency from a ledger it sees as empty."""
    async with db() as session, session.begin():
        await ensure_account(session, "acc_3")
    async with db() as events:
        await events.execute(text("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
        await events.execute(text("SELECT 1"))  # the snapshot: before the usage charge
        await charge_usage(client, token, "acc_3", 100, "usd")  # binds the account to USD
        credit = {"account_id": "acc_3", "currency": "eur", "kind": "top_up", "source_id": "x"}
        with pytest.raises(DBAPIError, match="could not serialize"):
            await ledger_entries_in_account_currency(events, [credit])
        await events.rollback()
        _, refused = await ledger_entries_in_account_currency(events, [credit])  # run again
        assert refused == [credit]
    assert await ledger_currencies(db, "acc_3") == ["usd"]


async def test_a_top_up_refused_for_its_currency_can_be_refunded_whole_and_moves_no_balance(
    post_checkout: PostCheckout,
    client: httpx.AsyncClient,
    token: Any,
    stripe_fake: StripeFake,
    deliver: Deliver,
    app: FastAPI,
    db: async_sessionmaker[AsyncSession],
) -> None:
    # The EUR top-up never reached the USD balance, so none of it was spent: finance refunds
    # it whole ("for a top-up, at most the unspent balance" is the top-up's unspent part, not
    # the USD balance, here 0 with a debt of 100).
    eur = await pay_eur_top_up_after_usd_usage(
        post_checkout, client, token, stripe_fake, deliver, app
    )
    filed = await file_request(
        client,
        token,
        "acc_1",
        description="My EUR top-up never reached my balance",
        payment_reference=eur["stripe_checkout_session_id"],
    )
    assert filed["status"] == "received", filed
    seen = len(stripe_fake.events)
    response = await reply(client, token, filed["id"], **decision("refund", 3000))
    assert response.status_code == 201, response.text
    [refund] = stripe_fake.all("refund")
    assert (refund["amount"], refund["currency"]) == (3000, "eur")
    await deliver(stripe_fake.events_since(seen))
    shown = await client.get(
        f"/v1/finance/refund-requests/{filed['id']}", headers=bearer(token(**FINANCE))
    )
    assert shown.json()["status"] == "refunded"
    assert await ledger_currencies(db, "acc_1") == ["usd"]
    assert await balance(client, token, "acc_1") == {"balance": 0, "debt": 100, "currency": "usd"}
