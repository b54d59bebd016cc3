"""Maintenance emails through the outbox to a real local SMTP server; Stripe failures."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.models import MaintenanceExtension, Subscription
from app.notifications.worker import SmtpMailer, deliver_round
from app.subscriptions.access import access_until
from tests.conftest import Deliver, TokenFactory, bearer
from tests.maintenance.conftest import LiveSubscription
from tests.maintenance.test_completion import (
    ACROSS_MIDNIGHT,
    PERIOD_END,
    complete,
    open_window,
    stripe_updates,
    subscription,
)
from tests.notifications.smtp import SmtpServer
from tests.refunds.flows import outbox
from tests.stripe_fake import StripeFake

Factory = async_sessionmaker[AsyncSession]


@pytest.fixture
def ops(token: TokenFactory) -> dict[str, str]:
    return bearer(token(scope="ops"))


def later(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def test_each_client_receives_one_email_with_the_window_dates(
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
    smtp_settings: Settings,
    smtp_server: SmtpServer,
) -> None:
    await live_subscription("acc_1", "ch_1a", email="one@client.example")
    await live_subscription("acc_1", "ch_1b", email="one@client.example")
    await live_subscription("acc_2", "ch_2", email="two@client.example")
    await live_subscription("acc_3", "ch_3", email=None)  # no billing contact: nobody to email
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)
    response = await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])
    assert response.json()["accounts_notified"] == 2
    await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])

    await deliver_round(factory, smtp_settings)
    await deliver_round(factory, smtp_settings, now=later(10**6))

    assert sorted(to for m in smtp_server.messages for to in m.rcpt_tos) == [
        "one@client.example",
        "two@client.example",
    ]
    [one] = smtp_server.to("one@client.example")
    subject = one.message["Subject"]
    assert "2026-03-10 23:00" in subject and "2026-03-11 01:00" in subject
    assert "Asia/Singapore" in subject
    body = one.body
    assert "from 2026-03-10 23:00 to 2026-03-11 01:00 (Asia/Singapore)" in body
    assert "channel ch_1a: +2 day(s), access now until 2026-04-02 08:00" in body
    assert "channel ch_1b: +2 day(s)" in body
    assert "not grounds for a refund" in body


class WorkerCrash(BaseException):
    pass


class CrashAfterFirstSend(SmtpMailer):
    async def send(self, message: EmailMessage) -> None:
        await super().send(message)
        raise WorkerCrash


async def test_no_duplicate_email_after_a_worker_crash_and_restart(
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
    smtp_settings: Settings,
    smtp_server: SmtpServer,
) -> None:
    await live_subscription("acc_c", "ch_c", email="c@client.example")
    await live_subscription("acc_d", "ch_d", email="d@client.example")
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)
    await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])

    crashing = CrashAfterFirstSend(smtp_settings)
    with pytest.raises(WorkerCrash):
        await deliver_round(factory, smtp_settings, mailer=crashing)
    await crashing.close()
    assert len(smtp_server.messages) == 1

    # Restarted workers (now, and long after) deliver the other email and never the first again.
    await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])
    await deliver_round(factory, smtp_settings)
    await deliver_round(
        factory, smtp_settings, now=later(smtp_settings.email_sending_stale_seconds + 1)
    )
    assert sorted(to for m in smtp_server.messages for to in m.rcpt_tos) == [
        "c@client.example",
        "d@client.example",
    ]


async def test_stripe_down_leaves_the_extension_pending_and_a_repeat_pushes_it_once(
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    sub = await live_subscription("acc_e", "ch_e", email="e@client.example")
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)
    # Every attempt of the first completion fails (the SDK retries once).
    stripe_fake.fail_next(2, 500, path_prefix=f"/v1/subscriptions/{sub['id']}", method="POST")

    first = await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])

    assert first.status_code == 200
    assert first.json()["stripe_updates"]["pending"] == 1
    row = await subscription(factory, "ch_e")
    # Access shows the extension at once, outside Stripe's period for now.
    assert (row.extension_days, row.extension_days_in_period) == (2, 0)
    assert access_until(row) == PERIOD_END + timedelta(days=2)

    again = await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])

    assert again.json()["stripe_updates"] == {
        "applied": 1,
        "pending": 0,
        "rejected": 0,
        "skipped": 0,
    }
    keys = {
        r.idempotency_key for r in stripe_fake.requests_to("POST", f"/v1/subscriptions/{sub['id']}")
    }
    assert len(keys) == 1  # every attempt carried the same key
    assert len(stripe_updates(stripe_fake, sub["id"])) == 1
    row = await subscription(factory, "ch_e")
    assert (row.extension_days, row.extension_days_in_period) == (2, 2)
    assert access_until(row) == PERIOD_END + timedelta(days=2)


async def test_subscription_stripe_cannot_update_keeps_the_extension_locally(
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    sub = await live_subscription("acc_f", "ch_f", email="f@client.example")
    stripe_fake.delete_subscription(sub["id"])  # ended at Stripe; our mirror has not heard yet
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)

    response = await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])

    assert response.json()["stripe_updates"]["rejected"] == 1
    row = await subscription(factory, "ch_f")
    assert access_until(row) == PERIOD_END + timedelta(days=2)
    async with factory() as session:
        extension = (await session.execute(select(MaintenanceExtension))).scalar_one()
    assert extension.stripe_status == "rejected" and extension.last_error


async def test_concurrent_completions_extend_and_push_once(
    app: FastAPI,
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
) -> None:
    sub = await live_subscription("acc_g", "ch_g", email="g@client.example")
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)
    responses = await asyncio.gather(
        *(complete(client, ops, window_id, ACROSS_MIDNIGHT[1]) for _ in range(4))
    )
    assert {r.status_code for r in responses} == {200}
    assert len(stripe_updates(stripe_fake, sub["id"])) == 1
    row = await subscription(factory, "ch_g")
    assert (row.extension_days, row.extension_days_in_period) == (2, 2)


async def test_overlapping_windows_never_credit_the_same_day_twice(
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
) -> None:
    await live_subscription("acc_h", "ch_h", email="h@client.example")
    # 10 March 23:00 → 11 March 01:00 and 11 March 00:30 → 12 March 02:00 (Singapore):
    # together 10, 11 and 12 March.
    first = await open_window(client, ops, *ACROSS_MIDNIGHT)
    second = await open_window(
        client, ops, "2026-03-10T16:30:00Z", "2026-03-11T18:00:00Z", kind="emergency"
    )
    await complete(client, ops, first, ACROSS_MIDNIGHT[1])
    response = await complete(client, ops, second, "2026-03-11T18:00:00Z")
    assert response.json()["unavailable_days"] == 2
    row = await subscription(factory, "ch_h")
    assert row.extension_days == 3
    async with factory() as session:
        subs = (await session.execute(select(Subscription))).scalars().all()
    assert len(subs) == 1


async def test_a_window_whose_days_another_window_already_credited_emails_no_one(
    app: FastAPI,
    client: httpx.AsyncClient,
    ops: dict[str, str],
    factory: Factory,
    live_subscription: LiveSubscription,
) -> None:
    """A second window inside the local dates a first one already credited gives the
    subscription no more days, so its client gets no "+0 day(s)" notice."""
    await live_subscription("acc_z", "ch_z", email="z@client.example")
    first = await open_window(client, ops, *ACROSS_MIDNIGHT)
    # 11 March 00:10 → 00:40 in Singapore: a date the first window already covers.
    second = await open_window(client, ops, "2026-03-10T16:10:00Z", "2026-03-10T16:40:00Z")
    await complete(client, ops, first, ACROSS_MIDNIGHT[1])
    done = await complete(client, ops, second, "2026-03-10T16:40:00Z")

    assert done.status_code == 200, done.text
    assert (await subscription(factory, "ch_z")).extension_days == 2
    [notice] = await outbox(app, "z@client.example")
    assert "+2 day(s)" in notice.body


async def test_a_subscription_whose_access_a_chargeback_ended_is_not_told_of_access(
    app: FastAPI,
    client: httpx.AsyncClient,
    ops: dict[str, str],
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    """A lost chargeback after the window started ended the channel's access for good (Stripe's
    cancellation of it not yet reported): the window's days give it no access, so the notice
    must not tell the client its access now runs until a date. The client, whose service was
    suspended too, is still told of the window, with no days for that channel; the other
    client's notice is unchanged."""
    sub = await live_subscription("acc_cb", "ch_cb", email="cb@client.example")
    await live_subscription("acc_ok", "ch_ok", email="ok@client.example")
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)
    stripe_fake.set_time(datetime(2026, 3, 12, tzinfo=UTC).timestamp())
    [charge] = [c for c in stripe_fake.all("charge") if c["customer"] == sub["customer"]]
    opened = stripe_fake.create_dispute(charge["id"])
    await deliver(opened)
    await deliver(stripe_fake.close_dispute(opened[0]["data"]["object"]["id"], won=False))
    revoked = await subscription(app.state.session_factory, "ch_cb")
    assert revoked.access_revoked_at is not None

    response = await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])

    assert response.status_code == 200, response.text
    [other] = await outbox(app, "ok@client.example")
    assert "channel ch_ok: +2 day(s), access now until 2026-04-02 08:00" in other.body
    [told] = await outbox(app, "cb@client.example")
    assert "from 2026-03-10 23:00 to 2026-03-11 01:00 (Asia/Singapore)" in told.body
    assert "access now until" not in told.body
    assert "channel ch_cb: no days added, its access has ended" in told.body
    assert response.json()["accounts_notified"] == 2
    assert (await subscription(app.state.session_factory, "ch_cb")).extension_days == 0


async def test_a_subscription_stripe_ends_before_its_period_end_is_told_when_access_ends(
    app: FastAPI,
    client: httpx.AsyncClient,
    ops: dict[str, str],
    live_subscription: LiveSubscription,
    stripe_fake: StripeFake,
    deliver: Deliver,
) -> None:
    """Stripe is set to end the subscription on 20 March (a `cancel_at` inside its period, set
    in Stripe's Dashboard): its access ends then, as `access_until` shows, and the window's days
    cannot follow (Stripe ends it before the moved period end). The notice must not promise
    access past that day."""
    sub = await live_subscription("acc_ca", "ch_ca", email="ca@client.example")
    cancel_at = datetime(2026, 3, 20, tzinfo=UTC)
    await deliver(stripe_fake.update_subscription(sub["id"], cancel_at=int(cancel_at.timestamp())))
    window_id = await open_window(client, ops, *ACROSS_MIDNIGHT)

    response = await complete(client, ops, window_id, ACROSS_MIDNIGHT[1])

    assert response.status_code == 200, response.text
    [told] = await outbox(app, "ca@client.example")
    assert "2026-04-02" not in told.body
    # 20 March 00:00 UTC is 08:00 in Singapore: the end the access check answers too
    assert "channel ch_ca: +2 day(s), access until 2026-03-20 08:00, when it is set to end" in (
        told.body
    )
