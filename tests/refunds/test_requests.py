"""Refund and appeal requests: identification, the response clock on the business calendar,
finance replies (emailed once), overdue tracking and who may do what."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from fastapi import FastAPI

from app.refunds import repository as repo
from app.refunds.service import is_overdue
from tests.conftest import Deliver, TokenFactory, bearer
from tests.refunds.flows import outbox, pay_top_up
from tests.refunds.test_refund_workflow import reply
from tests.stripe_fake import StripeFake

SGT = ZoneInfo("Asia/Singapore")
FINANCE = {"scope": "finance", "sub": "bob@1msg.io"}


def sgt(*args: int) -> datetime:
    return datetime(*args, tzinfo=SGT)


async def finance_file(
    client: httpx.AsyncClient, token: TokenFactory, **body: Any
) -> httpx.Response:
    payload = {
        "account_id": "acc_mail",
        "type": "appeal",
        "description": "My channel was suspended",
        "channel": "email",
        **body,
    }
    return await client.post(
        "/v1/finance/refund-requests", json=payload, headers=bearer(token(**FINANCE))
    )


@pytest.mark.parametrize(
    ("received_at", "first_response_due", "decision_due"),
    [
        # Friday evening: the weekend does not count
        (
            sgt(2025, 11, 21, 18),
            sgt(2025, 11, 26, 23, 59, 59, 999999),
            sgt(2025, 12, 11, 23, 59, 59, 999999),
        ),
        # Saturday: counted from Monday
        (
            sgt(2025, 11, 22, 9),
            sgt(2025, 11, 26, 23, 59, 59, 999999),
            sgt(2025, 12, 11, 23, 59, 59, 999999),
        ),
        # Christmas (Thu) and New Year's Day (Thu) are Singapore public holidays; the year turns
        (
            sgt(2025, 12, 23, 12),
            sgt(2025, 12, 29, 23, 59, 59, 999999),
            sgt(2026, 1, 14, 23, 59, 59, 999999),
        ),
        (
            sgt(2025, 12, 30, 12),
            sgt(2026, 1, 5, 23, 59, 59, 999999),
            sgt(2026, 1, 20, 23, 59, 59, 999999),
        ),
        # 23:30 UTC on 31 December is already New Year's Day (a holiday) in Singapore
        (
            datetime(2025, 12, 31, 23, 30, tzinfo=UTC),
            sgt(2026, 1, 6, 23, 59, 59, 999999),
            sgt(2026, 1, 21, 23, 59, 59, 999999),
        ),
    ],
)
async def test_due_dates_count_business_days_from_the_true_receipt_time(
    client: httpx.AsyncClient,
    token: TokenFactory,
    received_at: datetime,
    first_response_due: datetime,
    decision_due: datetime,
) -> None:
    response = await finance_file(client, token, received_at=received_at.isoformat())
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "received"
    assert body["channel"] == "email"
    assert datetime.fromisoformat(body["received_at"]) == received_at
    assert datetime.fromisoformat(body["first_response_due"]) == first_response_due
    assert datetime.fromisoformat(body["decision_due"]) == decision_due


async def test_an_unidentifiable_payment_request_waits_for_details_and_its_clock_starts_on_match(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_n", amount=4200)
    headers = bearer(token(account_id="acc_n"))
    filed = await client.post(
        "/v1/accounts/acc_n/refund-requests",
        json={"type": "refund", "description": "Charged twice?", "amount": 4200},
        headers=headers,
    )
    assert filed.status_code == 201, filed.text
    request = filed.json()
    assert request["status"] == "needs_information"
    assert request["missing_information"] == ["payment_reference", "payment_date", "currency"]
    assert request["first_response_due"] is None and request["decision_due"] is None
    assert request["clock_started_at"] is None

    wrong = await client.patch(
        f"/v1/accounts/acc_n/refund-requests/{request['id']}",
        json={"payment_reference": "pi_not_ours"},
        headers=headers,
    )
    assert wrong.json()["status"] == "needs_information"
    assert wrong.json()["missing_information"][0] == "payment_reference"

    today = datetime.now(SGT).date().isoformat()
    matched = await client.patch(
        f"/v1/accounts/acc_n/refund-requests/{request['id']}",
        json={"payment_reference": None, "payment_date": today, "currency": "usd"},
        headers=headers,
    )
    body = matched.json()
    assert body["status"] == "received", body
    assert body["payment_id"] == paid.payment_id
    assert body["missing_information"] == []
    started = datetime.fromisoformat(body["clock_started_at"])
    assert started > datetime.fromisoformat(body["received_at"])
    assert datetime.fromisoformat(body["first_response_due"]) > started

    again = await client.patch(
        f"/v1/accounts/acc_n/refund-requests/{request['id']}",
        json={"amount": 1},
        headers=headers,
    )
    assert again.status_code == 422


async def test_the_patch_that_identified_the_payment_sent_again_answers_the_same_request(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    """A PATCH whose answer was lost (or a double submit) is sent again: the details it adds
    are the request's already, so it changes nothing and answers as the first did, not 422
    "already identified" for details the request was identified by."""
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_p", amount=4200)
    headers = bearer(token(account_id="acc_p"))
    filed = await client.post(
        "/v1/accounts/acc_p/refund-requests",
        json={"type": "refund", "description": "Charged twice?", "amount": 4200},
        headers=headers,
    )
    assert filed.status_code == 201, filed.text
    url = f"/v1/accounts/acc_p/refund-requests/{filed.json()['id']}"
    details = {"payment_reference": paid.payment_intent, "amount": 4200}

    first, again = [await client.patch(url, json=details, headers=headers) for _ in range(2)]

    assert first.status_code == 200, first.text
    assert first.json()["status"] == "received"
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    trail = await client.get(
        f"/v1/finance/refund-requests/{filed.json()['id']}", headers=bearer(token(**FINANCE))
    )
    assert [step["action"] for step in trail.json()["audit"]] == ["filed", "details_added"]
    other = await client.patch(url, json={"amount": 4100}, headers=headers)
    assert other.status_code == 422  # other details than those it was identified by


async def test_a_request_not_about_a_payment_starts_its_clock_at_once(
    client: httpx.AsyncClient, token: TokenFactory
) -> None:
    filed = await client.post(
        "/v1/accounts/acc_s/refund-requests",
        json={"type": "appeal", "description": "My access was suspended"},
        headers=bearer(token(account_id="acc_s", email="ops@client.example")),
    )
    assert filed.status_code == 201
    body = filed.json()
    assert body["status"] == "received"
    assert body["clock_started_at"] == body["received_at"]
    assert body["decision_due"] is not None


async def test_replies_move_the_status_are_emailed_once_and_shown_to_the_client(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory
) -> None:
    filed = await client.post(
        "/v1/accounts/acc_m/refund-requests",
        json={"type": "compensation", "description": "Outage on Monday"},
        headers=bearer(token(account_id="acc_m", email="pay@acc-m.example")),
    )
    request_id = filed.json()["id"]
    url = f"/v1/finance/refund-requests/{request_id}/responses"
    finance = bearer(token(**FINANCE))

    initial = await client.post(
        url, json={"kind": "initial", "message": "Received."}, headers=finance
    )
    assert initial.json()["status"] == "acknowledged"
    next_step = (datetime.now(UTC) + timedelta(days=5)).replace(microsecond=0)
    interim = await client.post(
        url,
        json={
            "kind": "interim",
            "message": "Checking with the bank.",
            "next_step_due": next_step.isoformat(),
        },
        headers=finance,
    )
    assert interim.status_code == 201, interim.text
    assert interim.json()["status"] == "in_review"
    assert datetime.fromisoformat(interim.json()["next_step_due"]) == next_step
    decision = await client.post(
        url,
        json={"kind": "decision", "message": "Not covered.", "outcome": "rejected"},
        headers=finance,
    )
    assert decision.json()["status"] == "rejected"
    late = await client.post(url, json={"kind": "initial", "message": "Hi"}, headers=finance)
    assert late.status_code == 409
    assert late.json()["code"] == "request_already_decided"

    emails = await outbox(app, "pay@acc-m.example")
    assert [e.subject for e in emails] == [
        f"We have received your billing request [{request_id}]",
        f"An update on your billing request [{request_id}]",
        f"A decision on your billing request [{request_id}]",
    ]
    assert emails[1].body.startswith("Checking with the bank.")
    # the promised date in the business time zone, as every date a client reads
    local = next_step.astimezone(SGT)
    assert f"Next step by: {local:%Y-%m-%d %H:%M} (Asia/Singapore)" in emails[1].body
    assert "Decision: rejected" in emails[2].body

    client_view = await client.get(
        "/v1/accounts/acc_m/refund-requests", headers=bearer(token(account_id="acc_m"))
    )
    [shown] = client_view.json()
    assert [r["kind"] for r in shown["responses"]] == ["initial", "interim", "decision"]
    assert "audit" not in shown


async def test_balance_credit_remedy_credits_the_ledger_once(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory
) -> None:
    from tests.refunds.flows import balance

    filed = await client.post(
        "/v1/accounts/acc_c/refund-requests",
        json={"type": "compensation", "description": "Outage"},
        headers=bearer(token(account_id="acc_c", email="pay@acc-c.example")),
    )
    response = await client.post(
        f"/v1/finance/refund-requests/{filed.json()['id']}/responses",
        json={
            "kind": "decision",
            "message": "Credited.",
            "outcome": "approved",
            "remedy": "balance_credit",
            "amount": 700,
        },
        headers=bearer(token(**FINANCE)),
    )
    assert response.json()["status"] == "approved"
    assert await balance(app, "acc_c") == 700
    # the email says in words what was granted, in the currency the ledger credited (a
    # request about no payment has none of its own)
    [decision] = await outbox(app, "pay@acc-c.example")
    assert "Remedy: a credit of 7.00 USD to your prepaid balance" in decision.body


async def test_overdue_requests_are_listed_and_counted_in_metrics(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory
) -> None:
    old = await finance_file(client, token, received_at="2026-10-01T10:00:00+08:00")
    recent = await finance_file(client, token, received_at=datetime.now(UTC).isoformat())
    assert old.status_code == recent.status_code == 201
    finance = bearer(token(**FINANCE))

    listed = await client.get("/v1/finance/refund-requests?overdue=true", headers=finance)
    assert [r["id"] for r in listed.json()] == [old.json()["id"]]
    assert listed.json()[0]["overdue"] is True
    metrics = (await client.get("/metrics")).text
    assert "billing_refund_requests_overdue 1.0" in metrics

    url = f"/v1/finance/refund-requests/{old.json()['id']}/responses"
    await client.post(
        url, json={"kind": "initial", "message": "Sorry for the delay."}, headers=finance
    )
    still = await client.get("/v1/finance/refund-requests?overdue=true", headers=finance)
    assert len(still.json()) == 1  # the 14-day decision is overdue too
    soon = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    await client.post(
        url,
        json={"kind": "interim", "message": "Next week.", "next_step_due": soon},
        headers=finance,
    )
    assert (
        await client.get("/v1/finance/refund-requests?overdue=true", headers=finance)
    ).json() == []
    assert "billing_refund_requests_overdue 0.0" in (await client.get("/metrics")).text

    by_status = await client.get("/v1/finance/refund-requests?status=in_review", headers=finance)
    assert [r["id"] for r in by_status.json()] == [old.json()["id"]]


async def test_an_empty_filter_value_filters_nothing(
    client: httpx.AsyncClient, token: TokenFactory
) -> None:
    # The contract's own URL, `?status=&overdue=true`, is what a finance tool's form sends
    # for "any status": an empty value is no filter, not a status that does not exist (422)
    # nor an account whose id is empty (an empty list).
    old = await finance_file(client, token, received_at="2026-10-01T10:00:00+08:00")
    recent = await finance_file(
        client, token, account_id="acc_other", received_at=datetime.now(UTC).isoformat()
    )
    assert old.status_code == recent.status_code == 201
    finance = bearer(token(**FINANCE))

    overdue = await client.get("/v1/finance/refund-requests?status=&overdue=true", headers=finance)
    assert overdue.status_code == 200, overdue.text
    assert [r["id"] for r in overdue.json()] == [old.json()["id"]]
    everything = await client.get(
        "/v1/finance/refund-requests?status=&account_id=", headers=finance
    )
    assert everything.status_code == 200, everything.text
    assert {r["id"] for r in everything.json()} == {old.json()["id"], recent.json()["id"]}
    unknown = await client.get("/v1/finance/refund-requests?status=pending", headers=finance)
    assert (unknown.status_code, unknown.json()["code"]) == (422, "validation_error")


async def test_bad_input_and_wrong_callers_are_refused(
    client: httpx.AsyncClient, token: TokenFactory
) -> None:
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert (await finance_file(client, token, received_at=future)).status_code == 422
    naive = await finance_file(client, token, received_at="2026-11-20T10:00:00")
    assert naive.status_code == 422
    # year 1 with a positive offset once overflowed the business calendar (a 500)
    ancient = await finance_file(client, token, received_at="0001-01-01T01:00:00+03:01")
    assert (ancient.status_code, ancient.json()["code"]) == (422, "validation_error")
    user = bearer(token(account_id="acc_x"))
    other = await client.post(
        "/v1/accounts/acc_y/refund-requests",
        json={"type": "other", "description": "x"},
        headers=user,
    )
    assert other.status_code == 403
    finance_only = await client.get("/v1/finance/refund-requests", headers=user)
    assert finance_only.status_code == 403
    assert (await client.get("/v1/finance/disputes", headers=user)).status_code == 403
    bad = await client.post(
        "/v1/accounts/acc_x/refund-requests",
        json={"type": "refund", "description": "", "amount": -5, "currency": "USD"},
        headers=user,
    )
    assert bad.status_code == 422
    assert bad.json()["code"] == "validation_error"
    filed = await client.post(
        "/v1/accounts/acc_x/refund-requests",
        json={"type": "other", "description": "question"},
        headers=user,
    )
    url = f"/v1/finance/refund-requests/{filed.json()['id']}/responses"
    finance = bearer(token(**FINANCE))
    for body in (
        {"kind": "interim", "message": "x"},
        {"kind": "decision", "message": "x"},
        {"kind": "decision", "message": "x", "outcome": "approved"},
        {"kind": "decision", "message": "x", "outcome": "approved", "remedy": "refund"},
        {
            "kind": "decision",
            "message": "x",
            "outcome": "rejected",
            "remedy": "refund",
            "amount": 5,
        },
        {"kind": "initial", "message": "x", "surprise": 1},
    ):
        refused = await client.post(url, json=body, headers=finance)
        assert refused.status_code == 422, body
    no_payment = await client.post(
        url,
        json={
            "kind": "decision",
            "message": "x",
            "outcome": "approved",
            "remedy": "refund",
            "amount": 5,
        },
        headers=finance,
    )
    assert no_payment.status_code == 409
    assert no_payment.json()["code"] == "request_needs_information"
    missing = await client.get(
        "/v1/accounts/acc_x/refund-requests/8a0c2d4e-0000-4000-8000-000000000000", headers=user
    )
    assert missing.status_code == 404


async def test_naming_an_unknown_payment_later_does_not_stop_a_running_clock(
    client: httpx.AsyncClient, token: TokenFactory
) -> None:
    headers = bearer(token(account_id="acc_p"))
    filed = await client.post(
        "/v1/accounts/acc_p/refund-requests",
        json={"type": "appeal", "description": "Suspended without notice"},
        headers=headers,
    )
    patched = await client.patch(
        f"/v1/accounts/acc_p/refund-requests/{filed.json()['id']}",
        json={"payment_reference": "pi_unknown"},
        headers=headers,
    )
    body = patched.json()
    assert body["status"] == "received"
    assert body["missing_information"][0] == "payment_reference"
    assert body["decision_due"] == filed.json()["decision_due"]


async def test_finance_adds_the_missing_details_of_an_email_request_and_its_clock_starts(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    # A client who writes to finance@ (policy section 4) gives the missing payment details by
    # email too: finance records them, the request is identified and can be decided.
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_mail", amount=4200)
    filed = await finance_file(
        client,
        token,
        type="refund",
        description="Please refund my top-up",
        amount=4200,
        received_at=(datetime.now(UTC) - timedelta(minutes=5)).isoformat(),
    )
    assert filed.json()["status"] == "needs_information", filed.text
    request_id = filed.json()["id"]

    added = await client.patch(
        f"/v1/accounts/acc_mail/refund-requests/{request_id}",
        json={"payment_reference": paid.charge_id},
        headers=bearer(token(**FINANCE)),
    )
    assert added.status_code == 200, added.text
    body = added.json()
    assert body["status"] == "received"
    assert body["payment_id"] == paid.payment_id
    assert body["clock_started_at"] is not None and body["first_response_due"] is not None
    view = await client.get(
        f"/v1/finance/refund-requests/{request_id}", headers=bearer(token(**FINANCE))
    )
    assert view.json()["audit"][-1]["action"] == "details_added"
    assert view.json()["audit"][-1]["actor"] == FINANCE["sub"]
    decided = await reply(
        client,
        token,
        request_id,
        kind="decision",
        message="Refunded.",
        outcome="approved",
        remedy="refund",
        amount=4200,
    )
    assert decided.status_code == 201, decided.text
    # Other services still may not change a client's request.
    service = await client.patch(
        f"/v1/accounts/acc_mail/refund-requests/{request_id}",
        json={"description": "x"},
        headers=bearer(token(scope="billing:read billing:write")),
    )
    assert service.status_code == 403


async def test_finance_filing_for_an_account_id_no_account_route_accepts_is_refused(
    client: httpx.AsyncClient, token: TokenFactory
) -> None:
    # An id the account routes refuse (422) would file a request its client can never see.
    for account_id in ("acc mail", "acc/mail", "acc.mail"):
        response = await finance_file(
            client,
            token,
            account_id=account_id,
            received_at=(datetime.now(UTC) - timedelta(hours=1)).isoformat(),
        )
        assert (response.status_code, response.json()["code"]) == (422, "validation_error")
    listed = await client.get("/v1/finance/refund-requests", headers=bearer(token(**FINANCE)))
    assert listed.json() == []


async def test_a_request_is_not_overdue_before_its_due_day_has_ended(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory
) -> None:
    # Due "within 3 business days": the whole third business day, to its last instant, is in
    # time; the request is overdue only once that local day is over.
    filed = await finance_file(client, token, received_at=sgt(2025, 11, 24, 10).isoformat())
    request_id = uuid.UUID(filed.json()["id"])
    last_second = sgt(2025, 11, 27, 23, 59, 59, 500000)  # Thursday, the 3rd business day
    next_day = sgt(2025, 11, 28, 0, 0, 0)
    async with app.state.session_factory() as session:
        request = await repo.get_request(session, request_id)
        assert request is not None
        assert not is_overdue(request, last_second)
        assert await repo.list_requests(session, overdue_at=last_second) == []
        assert is_overdue(request, next_day)
        assert [r.id for r in await repo.list_requests(session, overdue_at=next_day)] == [
            request_id
        ]


async def test_a_request_identified_after_finance_replied_keeps_the_status_of_those_replies(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    # Finance answers a request it cannot match yet (asking for the payment, then saying when
    # it will look again); once the client's details identify it, it is not `received` again
    # as if no reply had been sent: initial → `acknowledged`, interim → `in_review`.
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_ri", amount=4200)
    headers = bearer(token(account_id="acc_ri"))
    filed = await client.post(
        "/v1/accounts/acc_ri/refund-requests",
        json={"type": "refund", "description": "Refund please", "payment_reference": "pi_x"},
        headers=headers,
    )
    request_id = filed.json()["id"]
    assert filed.json()["status"] == "needs_information"
    asked = await reply(client, token, request_id, kind="initial", message="Which payment is it?")
    assert asked.status_code == 201, asked.text
    assert asked.json()["status"] == "needs_information"

    url = f"/v1/accounts/acc_ri/refund-requests/{request_id}"
    matched = await client.patch(url, json={"payment_reference": paid.charge_id}, headers=headers)
    assert matched.json()["payment_id"] == paid.payment_id
    assert matched.json()["status"] == "acknowledged", matched.json()

    # The same after an interim reply.
    other = await client.post(
        "/v1/accounts/acc_ri/refund-requests",
        json={"type": "refund", "description": "And this one", "payment_reference": "pi_y"},
        headers=headers,
    )
    soon = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    interim = await reply(
        client, token, other.json()["id"], kind="interim", message="Checking.", next_step_due=soon
    )
    assert interim.status_code == 201, interim.text
    matched = await client.patch(
        f"/v1/accounts/acc_ri/refund-requests/{other.json()['id']}",
        json={"payment_reference": paid.charge_id},
        headers=headers,
    )
    assert matched.json()["status"] == "in_review", matched.json()


async def test_a_next_step_promised_while_details_are_missing_is_overdue_once_it_passes(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory
) -> None:
    # An email request finance cannot match yet; finance replies that it is checking with the
    # bank and names the date of its next step. That date passing without a reply is overdue
    # (the contract: "a due date passed without the reply it asks for"), clock or no clock.
    filed = await finance_file(
        client,
        token,
        type="refund",
        description="Charged but not in my invoices",
        payment_reference="pi_from_a_bank_statement",
        received_at=(datetime.now(UTC) - timedelta(hours=1)).isoformat(),
    )
    assert filed.json()["status"] == "needs_information", filed.text
    request_id = uuid.UUID(filed.json()["id"])
    promised = datetime.now(UTC) + timedelta(days=2)
    interim = await reply(
        client,
        token,
        str(request_id),
        kind="interim",
        message="We are checking the charge with Stripe.",
        next_step_due=promised.isoformat(),
    )
    assert interim.status_code == 201, interim.text
    after = promised + timedelta(minutes=1)
    async with app.state.session_factory() as session:
        request = await repo.get_request(session, request_id)
        assert request is not None
        assert not is_overdue(request, promised - timedelta(minutes=1))
        assert is_overdue(request, after)
        assert [r.id for r in await repo.list_requests(session, overdue_at=after)] == [request_id]
