"""A request about a payment Stripe's events have not brought yet (a delayed or replayed
webhook) waits in `needs_information`; once the payment is mirrored the request is identified
and its clock starts, without the client having to send its details again."""

from __future__ import annotations

import asyncio
from datetime import datetime

import asyncpg
import httpx
from fastapi import FastAPI

from tests.conftest import Deliver, TokenFactory, bearer, plain_dsn
from tests.refunds.flows import new_events
from tests.refunds.test_refund_workflow import file_request
from tests.robustness.test_lock_conflicts import wait_for_a_lock_wait
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import add_catalog, open_checkout

FINANCE = {"scope": "finance", "sub": "alice@1msg.io"}


async def test_a_request_naming_a_payment_not_yet_mirrored_starts_its_clock_when_it_arrives(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    session_id = await open_checkout(app, account_id="acc_late", purpose="top_up", amount=4200)
    seen = len(stripe_fake.events)
    stripe_fake.complete_checkout(session_id)  # paid at Stripe; the webhook is late

    headers = bearer(token(account_id="acc_late"))
    filed = await file_request(
        client,
        token,
        "acc_late",
        description="Please refund my top-up",
        payment_reference=session_id,
    )
    assert filed["status"] == "needs_information"
    assert filed["clock_started_at"] is None

    await deliver(new_events(stripe_fake, seen))

    shown = await client.get(
        f"/v1/accounts/acc_late/refund-requests/{filed['id']}", headers=headers
    )
    body = shown.json()
    assert body["status"] == "received", body
    assert body["payment_id"] is not None
    assert body["missing_information"] == []
    # The request named its payment correctly when it arrived: the clock runs from receipt.
    assert body["clock_started_at"] == body["received_at"] == filed["received_at"]
    assert body["first_response_due"] is not None and body["decision_due"] is not None
    audit = (
        await client.get(
            f"/v1/finance/refund-requests/{filed['id']}", headers=bearer(token(**FINANCE))
        )
    ).json()["audit"]
    assert (audit[-1]["action"], audit[-1]["actor"]) == ("payment_identified", "stripe")

    # Delivered again (Stripe retries): nothing changes.
    await deliver(new_events(stripe_fake, seen))
    again = await client.get(
        f"/v1/accounts/acc_late/refund-requests/{filed['id']}", headers=headers
    )
    assert again.json() == body


async def test_a_waiting_request_whose_payment_arrives_after_its_chargeback_is_closed(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    session_id = await open_checkout(app, account_id="acc_lcb", purpose="top_up", amount=4200)
    seen = len(stripe_fake.events)
    stripe_fake.complete_checkout(session_id)
    payment_events = new_events(stripe_fake, seen)
    [charge] = stripe_fake.all("charge")
    headers = bearer(token(account_id="acc_lcb"))
    filed = await file_request(
        client, token, "acc_lcb", description="Refund please", payment_reference=session_id
    )
    assert filed["status"] == "needs_information"
    # The chargeback's events arrive first, then the payment's: a disputed payment is never
    # also refunded, so the request, identified, is closed like any open one.
    await deliver(stripe_fake.create_dispute(charge["id"]))
    await deliver(payment_events)
    shown = await client.get(f"/v1/accounts/acc_lcb/refund-requests/{filed['id']}", headers=headers)
    assert shown.json()["status"] == "closed", shown.json()
    assert shown.json()["payment_id"] is not None


async def test_a_request_filed_while_its_payment_is_being_applied_is_identified(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
    database_url: str,
) -> None:
    """The payment's events are being applied (their transaction's snapshot taken, not yet
    committed) when the request naming it is filed: the filing cannot see the payment, and
    the events' transaction must not miss the request either."""
    session_id = await open_checkout(app, account_id="acc_race", purpose="top_up", amount=4200)
    seen = len(stripe_fake.events)
    stripe_fake.complete_checkout(session_id)
    await deliver(new_events(stripe_fake, seen), process=False)

    admin = await asyncpg.connect(plain_dsn(database_url))
    try:
        # Another replica holds the checkout session's lock: the processor has claimed the
        # events (its snapshot) and waits for it before applying them.
        await admin.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", session_id)
        applying = asyncio.create_task(app.state.event_processor.drain())
        await wait_for_a_lock_wait(admin)
        filed = await file_request(
            client, token, "acc_race", description="Refund please", payment_reference=session_id
        )
        assert filed["status"] == "needs_information"
        await admin.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", session_id)
        await applying
    finally:
        await admin.close()
    await app.state.event_processor.drain()

    shown = await client.get(
        f"/v1/accounts/acc_race/refund-requests/{filed['id']}",
        headers=bearer(token(account_id="acc_race")),
    )
    body = shown.json()
    assert body["status"] == "received", body
    assert body["payment_id"] is not None
    assert body["clock_started_at"] == body["received_at"]


async def test_a_request_naming_a_subscription_checkout_is_identified_whatever_event_links_it(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    """The subscription's Checkout session names its first payment only once an event has
    linked the session to its subscription; in Stripe's order, applied one event at a time,
    that comes after the payment's own events (`checkout.session.completed` is last)."""
    add_catalog(stripe_fake)
    session_id = await open_checkout(
        app, account_id="acc_late_sub", purpose="subscription", channel_id="ch_late_sub"
    )
    events = stripe_fake.complete_checkout(session_id)  # paid at Stripe; the webhook is late
    filed = await file_request(client, token, "acc_late_sub", payment_reference=session_id)
    assert filed["status"] == "needs_information"

    for event in events:
        await deliver([event])

    shown = await client.get(
        f"/v1/accounts/acc_late_sub/refund-requests/{filed['id']}",
        headers=bearer(token(account_id="acc_late_sub")),
    )
    body = shown.json()
    assert body["status"] == "received", body
    assert body["payment_id"] is not None
    # Paid at Stripe before the request arrived: the clock runs from receipt.
    assert body["clock_started_at"] == body["received_at"]


async def test_a_request_naming_a_top_up_checkout_is_identified_when_its_events_come_one_by_one(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    """Stripe delivers each event on its own: `charge.succeeded` brings the payment, and only
    `checkout.session.completed` after it tells which Checkout session it paid."""
    session_id = await open_checkout(app, account_id="acc_late_1", purpose="top_up", amount=4200)
    events = stripe_fake.complete_checkout(session_id)  # paid at Stripe; the webhook is late
    assert [event["type"] for event in events] == [
        "charge.succeeded",
        "checkout.session.completed",
    ]
    filed = await file_request(client, token, "acc_late_1", payment_reference=session_id)
    assert filed["status"] == "needs_information"

    for event in events:
        await deliver([event])

    shown = await client.get(
        f"/v1/accounts/acc_late_1/refund-requests/{filed['id']}",
        headers=bearer(token(account_id="acc_late_1")),
    )
    body = shown.json()
    assert body["status"] == "received", body
    assert body["payment_id"] is not None
    assert body["clock_started_at"] == body["received_at"]


async def test_a_running_request_naming_a_payment_not_yet_mirrored_is_identified_when_it_arrives(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    """An appeal filed without payment details runs its clock at once; the client then names
    the payment (PATCH) while its webhook is late. When the payment arrives the request is
    identified like one waiting in `needs_information` (README: "identified when they
    arrive"), not left unmatched until someone sends the same details again."""
    session_id = await open_checkout(app, account_id="acc_lr", purpose="top_up", amount=4200)
    seen = len(stripe_fake.events)
    stripe_fake.complete_checkout(session_id)  # paid at Stripe; the webhook is late

    headers = bearer(token(account_id="acc_lr"))
    filed = await file_request(
        client, token, "acc_lr", type="appeal", description="Suspended after paying"
    )
    assert filed["status"] == "received" and filed["clock_started_at"] is not None
    named = await client.patch(
        f"/v1/accounts/acc_lr/refund-requests/{filed['id']}",
        json={"payment_reference": session_id},
        headers=headers,
    )
    assert named.status_code == 200, named.text
    assert named.json()["missing_information"][0] == "payment_reference"

    await deliver(new_events(stripe_fake, seen))

    shown = (
        await client.get(f"/v1/accounts/acc_lr/refund-requests/{filed['id']}", headers=headers)
    ).json()
    assert shown["payment_id"] is not None, shown
    assert shown["missing_information"] == []
    assert shown["status"] == "received"
    # The clock kept running from receipt.
    assert shown["clock_started_at"] == filed["clock_started_at"]
    assert shown["decision_due"] == filed["decision_due"]
    audit = (
        await client.get(
            f"/v1/finance/refund-requests/{filed['id']}", headers=bearer(token(**FINANCE))
        )
    ).json()["audit"]
    assert (audit[-1]["action"], audit[-1]["actor"]) == ("payment_identified", "stripe")


async def test_a_late_payment_named_only_by_a_later_patch_starts_the_clock_at_that_patch(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    """A refund request filed with no details waits in `needs_information`; the client then
    names the payment (already made at Stripe, its webhook late). The request could be matched
    only from that PATCH, so its clock starts there when the payment arrives, not at the
    payment's time or at receipt ("its clock starts only when it can be matched")."""
    session_id = await open_checkout(app, account_id="acc_lp", purpose="top_up", amount=4200)
    seen = len(stripe_fake.events)
    stripe_fake.complete_checkout(session_id)  # paid at Stripe; the webhook is late

    headers = bearer(token(account_id="acc_lp"))
    filed = await file_request(client, token, "acc_lp", description="Refund my top-up")
    assert filed["status"] == "needs_information"
    await asyncio.sleep(0.05)
    named = await client.patch(
        f"/v1/accounts/acc_lp/refund-requests/{filed['id']}",
        json={"payment_reference": session_id},
        headers=headers,
    )
    assert named.json()["status"] == "needs_information", named.text
    audit = (
        await client.get(
            f"/v1/finance/refund-requests/{filed['id']}", headers=bearer(token(**FINANCE))
        )
    ).json()["audit"]
    details_at = audit[-1]["at"]
    assert audit[-1]["action"] == "details_added"

    await deliver(new_events(stripe_fake, seen))

    shown = (
        await client.get(f"/v1/accounts/acc_lp/refund-requests/{filed['id']}", headers=headers)
    ).json()
    assert shown["status"] == "received", shown
    assert datetime.fromisoformat(shown["clock_started_at"]) == datetime.fromisoformat(
        details_at
    ), (shown["clock_started_at"], details_at, filed["received_at"])
