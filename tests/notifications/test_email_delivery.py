"""The email outbox worker against a real local SMTP server (aiosmtpd)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.models import Account, OutboxEmail
from app.notifications.outbox import enqueue_email
from app.notifications.worker import (
    EMAILS_FAILED,
    EMAILS_SENT,
    SmtpMailer,
    claim_next,
    deliver_round,
)
from tests.conftest import TokenFactory, bearer
from tests.notifications.smtp import SmtpServer

Factory = async_sessionmaker[AsyncSession]


@pytest.fixture
def factory(app: FastAPI) -> Factory:
    session_factory: Factory = app.state.session_factory
    return session_factory


async def queue(factory: Factory, key: str, to: str = "client@example.com", **kw: str) -> None:
    async with factory() as session, session.begin():
        await enqueue_email(
            session,
            dedupe_key=key,
            to=to,
            subject=kw.get("subject", f"Notice {key}"),
            body=kw.get("body", f"Body of {key}\nSecond line, ünïcode."),
        )


async def rows(factory: Factory) -> dict[str, OutboxEmail]:
    async with factory() as session:
        found = (await session.execute(select(OutboxEmail))).scalars()
        return {row.dedupe_key: row for row in found}


def later(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def test_queued_email_is_delivered_once_with_headers_and_body(
    factory: Factory, smtp_settings: Settings, smtp_server: SmtpServer
) -> None:
    await queue(factory, "k1", subject="Your maintenance notice", body="Hello,\nline two ü")
    sent_before = EMAILS_SENT._value.get()

    first = await deliver_round(factory, smtp_settings)
    second = await deliver_round(factory, smtp_settings, now=later(3600))

    assert len(first.sent) == 1
    assert second.handled == 0
    assert len(smtp_server.messages) == 1
    received = smtp_server.messages[0]
    outbox_id = (await rows(factory))["k1"].id
    assert received.rcpt_tos == ["client@example.com"]
    assert received.mail_from == "billing@1msg.io"
    assert received.message["To"] == "client@example.com"
    assert received.message["From"] == "1msg billing <billing@1msg.io>"
    assert received.message["Subject"] == "Your maintenance notice"
    assert received.message["Message-ID"] == f"<outbox.{outbox_id}@1msg.io>"
    assert received.message["Date"]
    assert received.body.replace("\r\n", "\n").rstrip("\n") == "Hello,\nline two ü"
    row = (await rows(factory))["k1"]
    assert (row.status, row.attempts, row.sent_at is not None) == ("sent", 1, True)
    assert EMAILS_SENT._value.get() == sent_before + 1


async def test_enqueueing_the_same_dedupe_key_twice_sends_one_email(
    factory: Factory, smtp_settings: Settings, smtp_server: SmtpServer
) -> None:
    await queue(factory, "same")
    await queue(factory, "same", body="another body")
    await deliver_round(factory, smtp_settings)
    assert len(smtp_server.messages) == 1


async def test_smtp_down_is_retried_with_backoff_then_delivered(
    factory: Factory, smtp_settings: Settings, smtp_server: SmtpServer
) -> None:
    await queue(factory, "a")
    await queue(factory, "b")
    smtp_server.stop()
    retry_before = EMAILS_FAILED.labels("retry")._value.get()

    down = await deliver_round(factory, smtp_settings)

    # The relay is unreachable: one attempt is spent, the round stops, nothing is lost.
    assert len(down.retrying) == 1 and not down.sent
    state = await rows(factory)
    tried = next(row for row in state.values() if row.attempts == 1)
    assert tried.status == "pending"
    assert tried.last_error and "connect" in tried.last_error
    base = smtp_settings.email_retry_base_seconds
    assert tried.next_attempt_at >= tried.claimed_at + timedelta(seconds=base)  # type: ignore[operator]
    assert EMAILS_FAILED.labels("retry")._value.get() == retry_before + 1

    smtp_server.start()
    # Before the backoff elapses only the untried message is due.
    soon = await deliver_round(factory, smtp_settings, now=tried.claimed_at)
    assert len(soon.sent) == 1
    after = await deliver_round(factory, smtp_settings, now=later(base + 1))
    assert len(after.sent) == 1
    assert sorted(m.message["Subject"] for m in smtp_server.messages) == ["Notice a", "Notice b"]
    assert {row.status for row in (await rows(factory)).values()} == {"sent"}


async def test_backoff_doubles_and_the_email_is_parked_failed_after_max_attempts(
    factory: Factory, smtp_settings: Settings, smtp_server: SmtpServer
) -> None:
    settings = smtp_settings.model_copy(update={"email_max_attempts": 3})
    await queue(factory, "doomed")
    smtp_server.reply_to_data = "451 4.3.0 try again later"
    moment = later(0)
    delays = []
    for _ in range(3):
        await deliver_round(factory, settings, now=moment)
        row = (await rows(factory))["doomed"]
        if row.status == "pending":
            delays.append(row.next_attempt_at - moment)
            moment = row.next_attempt_at
    assert delays == [timedelta(seconds=30), timedelta(seconds=60)]
    row = (await rows(factory))["doomed"]
    assert (row.status, row.attempts) == ("failed", 3)
    assert row.last_error and "451" in row.last_error
    smtp_server.reply_to_data = None
    assert (await deliver_round(factory, settings, now=later(10**6))).handled == 0
    assert smtp_server.messages == []


async def test_permanent_refusal_parks_the_email_at_once(
    factory: Factory, smtp_settings: Settings, smtp_server: SmtpServer
) -> None:
    await queue(factory, "refused")
    smtp_server.reply_to_data = "554 5.7.1 rejected"
    result = await deliver_round(factory, smtp_settings)
    assert len(result.failed) == 1
    assert (await rows(factory))["refused"].status == "failed"


class CrashAfterSend(BaseException):
    """The worker process dies (not an ordinary error the round would handle)."""


class CrashingMailer(SmtpMailer):
    async def send(self, message: EmailMessage) -> None:
        await super().send(message)
        raise CrashAfterSend


async def test_worker_crash_after_sending_never_sends_the_email_again(
    factory: Factory, smtp_settings: Settings, smtp_server: SmtpServer
) -> None:
    await queue(factory, "crash")
    mailer = CrashingMailer(smtp_settings)
    with pytest.raises(CrashAfterSend):
        await deliver_round(factory, smtp_settings, mailer=mailer)
    await mailer.close()
    assert len(smtp_server.messages) == 1
    assert (await rows(factory))["crash"].status == "sending"

    # A restarted worker does not resend it; once stale it is parked as uncertain for a human.
    assert (await deliver_round(factory, smtp_settings, now=later(60))).handled == 0
    stale = later(smtp_settings.email_sending_stale_seconds + 1)
    restarted = await deliver_round(factory, smtp_settings, now=stale)
    assert len(restarted.uncertain) == 1 and not restarted.sent
    row = (await rows(factory))["crash"]
    assert row.status == "failed"
    assert row.last_error and row.last_error.startswith("delivery_uncertain")
    await deliver_round(factory, smtp_settings, now=later(10**6))
    assert len(smtp_server.messages) == 1


async def test_worker_crash_after_claiming_does_not_send_twice(
    factory: Factory, smtp_settings: Settings, smtp_server: SmtpServer
) -> None:
    await queue(factory, "claimed")
    async with factory() as session, session.begin():
        assert await claim_next(session, datetime.now(UTC)) is not None
    # ...the worker dies here, before or during the SMTP conversation.
    for seconds in (0, 60, smtp_settings.email_sending_stale_seconds + 1, 10**6):
        await deliver_round(factory, smtp_settings, now=later(seconds))
    assert smtp_server.messages == []
    assert (await rows(factory))["claimed"].status == "failed"


async def test_two_concurrent_workers_deliver_each_message_exactly_once(
    factory: Factory, smtp_settings: Settings, smtp_server: SmtpServer
) -> None:
    keys = [f"many-{n}" for n in range(24)]
    for key in keys:
        await queue(factory, key, to=f"{key}@example.com")

    async def worker() -> int:
        total = 0
        while True:
            result = await deliver_round(factory, smtp_settings, limit=3)
            total += len(result.sent)
            if result.handled == 0:
                return total

    counts = await asyncio.gather(worker(), worker())

    assert sum(counts) == len(keys)
    ids = [m.message["Message-ID"] for m in smtp_server.messages]
    assert len(ids) == len(set(ids)) == len(keys)
    assert sorted(to for m in smtp_server.messages for to in m.rcpt_tos) == sorted(
        f"{key}@example.com" for key in keys
    )
    assert {row.attempts for row in (await rows(factory)).values()} == {1}


async def test_message_id_is_stable_for_an_outbox_row() -> None:
    from app.notifications.worker import message_id

    outbox_id = uuid.uuid4()
    assert message_id(outbox_id, "Billing <b@1msg.io>") == message_id(outbox_id, "b@1msg.io")
    assert message_id(outbox_id, "b@1msg.io") == f"<outbox.{outbox_id}@1msg.io>"


async def test_web_process_delivers_in_the_background_when_workers_are_enabled(
    smtp_settings: Settings, smtp_server: SmtpServer
) -> None:
    from app.main import create_app

    settings = smtp_settings.model_copy(
        update={"run_background_workers": True, "email_poll_seconds": 0.05}
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        await queue(application.state.session_factory, "background")
        for _ in range(400):  # wait for the worker, not for a duration
            if smtp_server.messages:
                break
            await asyncio.sleep(0.025)
    assert [m.message["Subject"] for m in smtp_server.messages] == ["Notice background"]


class SlowFirstMessageMailer(SmtpMailer):
    """A relay slow to take the round's first message; while the round's second message is
    being sent, another worker process runs its own round (with the real clock)."""

    def __init__(self, settings: Settings, factory: Factory, slow_seconds: float) -> None:
        super().__init__(settings)
        self.factory = factory
        self.slow_seconds = slow_seconds
        self.sent = 0
        self.other_round: list[uuid.UUID] = []

    async def send(self, message: EmailMessage) -> None:
        if self.sent == 0:
            await asyncio.sleep(self.slow_seconds)
        else:
            other = await deliver_round(self.factory, self.settings)
            self.other_round += other.uncertain + other.sent
        await super().send(message)
        self.sent += 1


async def test_a_message_claimed_late_in_a_long_round_is_not_parked_by_another_worker(
    factory: Factory, smtp_settings: Settings, smtp_server: SmtpServer
) -> None:
    """A round sends up to EMAIL_BATCH_SIZE messages one after the other; `claimed_at` is when
    each one was claimed, so a message claimed after the round has run longer than
    EMAIL_SENDING_STALE_SECONDS is not taken for a dead worker's while it is being sent."""
    settings = smtp_settings.model_copy(update={"email_sending_stale_seconds": 1.0})
    await queue(factory, "first")
    await queue(factory, "second")
    mailer = SlowFirstMessageMailer(settings, factory, slow_seconds=1.5)
    result = await deliver_round(factory, settings, mailer=mailer)
    await mailer.close()

    assert mailer.other_round == []
    assert len(result.sent) == 2
    assert {key: row.status for key, row in (await rows(factory)).items()} == {
        "first": "sent",
        "second": "sent",
    }
    assert len(smtp_server.messages) == 2


async def test_a_relay_outage_longer_than_the_attempts_never_drops_a_queued_email(
    factory: Factory, smtp_settings: Settings, smtp_server: SmtpServer
) -> None:
    # Connection refused proves nothing about the message: it waits for the relay (backoff
    # capped at EMAIL_RETRY_MAX_SECONDS) instead of being parked after EMAIL_MAX_ATTEMPTS.
    settings = smtp_settings.model_copy(update={"email_max_attempts": 3})
    await queue(factory, "notice")
    smtp_server.stop()
    moment = later(0)
    for _ in range(5):
        down = await deliver_round(factory, settings, now=moment)
        assert len(down.retrying) == 1 and not down.failed
        moment = (await rows(factory))["notice"].next_attempt_at

    row = (await rows(factory))["notice"]
    assert (row.status, row.attempts) == ("pending", 5)
    assert row.last_error and "connect" in row.last_error
    smtp_server.start()
    up = await deliver_round(factory, settings, now=moment)
    assert len(up.sent) == 1
    assert [m.message["Subject"] for m in smtp_server.messages] == ["Notice notice"]


async def test_a_message_that_cannot_be_built_is_parked_failed_and_the_rest_are_sent(
    factory: Factory, smtp_settings: Settings, smtp_server: SmtpServer
) -> None:
    """An address no email can carry (a line break: a header injection attempt) fails that
    row at once; it is not left `sending`, and the round goes on to the next message."""
    await queue(factory, "bad", to="client@example.com\r\nBcc: all@example.com")
    await queue(factory, "good")

    result = await deliver_round(factory, smtp_settings)

    found = await rows(factory)
    assert (found["bad"].status, found["good"].status) == ("failed", "sent")
    assert "cannot be built" in (found["bad"].last_error or "")
    assert result.failed == [found["bad"].id]
    assert [m.rcpt_tos for m in smtp_server.messages] == [["client@example.com"]]
    assert "Bcc" not in str(smtp_server.messages[0].message)


async def test_an_address_the_relay_cannot_be_given_fails_that_row_and_the_round_goes_on(
    factory: Factory, smtp_settings: Settings, smtp_server: SmtpServer
) -> None:
    """A billing contact with a non-ASCII address (accepted by `plausible_email`, e.g. typed
    at Stripe Checkout) cannot be put in a plain SMTP envelope: that row fails at once as one
    that cannot be built, it is not left `sending` (to be parked later as uncertain, as if it
    might have been sent), and the round still sends the rest."""
    await queue(factory, "a-idn", to="josé@example.com")
    await queue(factory, "b-good")

    result = await deliver_round(factory, smtp_settings)

    found = await rows(factory)
    assert (found["a-idn"].status, found["b-good"].status) == ("failed", "sent")
    assert (found["a-idn"].last_error or "").startswith("the message cannot be built")
    assert result.failed == [found["a-idn"].id]
    assert [m.rcpt_tos for m in smtp_server.messages] == [["client@example.com"]]


async def test_attempts_while_the_relay_was_down_do_not_count_towards_parking(
    factory: Factory, smtp_settings: Settings, smtp_server: SmtpServer
) -> None:
    """EMAIL_MAX_ATTEMPTS counts refusals of the message only: an email that waited out a long
    outage is not parked at the relay's first transient refusal once it is back."""
    settings = smtp_settings.model_copy(update={"email_max_attempts": 3})
    await queue(factory, "waited")
    smtp_server.stop()
    moment = later(0)
    for _ in range(3):
        await deliver_round(factory, settings, now=moment)
        moment = (await rows(factory))["waited"].next_attempt_at
    smtp_server.start()
    smtp_server.reply_to_data = "451 4.3.0 try again later"

    refused = await deliver_round(factory, settings, now=moment)

    row = (await rows(factory))["waited"]
    assert (row.status, len(refused.retrying), refused.failed) == ("pending", 1, [])
    smtp_server.reply_to_data = None
    sent = await deliver_round(factory, settings, now=row.next_attempt_at)
    assert len(sent.sent) == 1
    assert [m.message["Subject"] for m in smtp_server.messages] == ["Notice waited"]


async def test_stopping_the_worker_finishes_the_message_in_flight_and_claims_no_more(
    factory: Factory, smtp_settings: Settings, smtp_server: SmtpServer
) -> None:
    """A shutdown (a rollout) during a round with a slow relay: the message being sent is
    finished, the rest of the batch stays `pending` for the next worker. Going on through the
    batch until `stop` gives up and cancels would cut a message off mid-conversation, leaving it
    `sending`, to be parked as delivery_uncertain instead of sent."""
    from app.notifications.worker import EmailWorker

    settings = smtp_settings.model_copy(update={"smtp_timeout_seconds": 0.5})
    for key in ("m1", "m2", "m3", "m4"):
        await queue(factory, key)
    smtp_server.data_delay = 0.3
    worker = EmailWorker(factory, settings)
    worker.start()
    for _ in range(400):  # until the first message is being sent
        if any(row.status == "sending" for row in (await rows(factory)).values()):
            break
        await asyncio.sleep(0.01)

    await worker.stop()

    statuses = sorted(row.status for row in (await rows(factory)).values())
    assert "sending" not in statuses
    assert statuses.count("sent") == len(smtp_server.messages) >= 1
    assert set(statuses) <= {"sent", "pending"}


@pytest.mark.parametrize("once", [[], ["--once"]], ids=["loop", "once"])
async def test_billing_deliver_emails_stops_on_sigterm_after_the_message_in_flight(
    once: list[str], factory: Factory, smtp_settings: Settings, smtp_server: SmtpServer
) -> None:
    """`billing deliver-emails` runs as its own process (README "Background work"): a SIGTERM
    (a rollout, a scaled-down pod) finishes the message being sent and exits 0, instead of
    killing the process mid-conversation and leaving the row `sending` (parked later as
    delivery_uncertain, never resent). So does a single round (`--once`, say from cron): it
    was killed mid-conversation."""
    import os
    import signal
    import sys

    from tests.conftest import ROOT

    await queue(factory, "in-flight")
    smtp_server.data_delay = 1.0
    env = {
        **os.environ,
        "APP_ENV": "development",
        "DATABASE_URL": smtp_settings.database_url,
        "SMTP_HOST": smtp_server.host,
        "SMTP_PORT": str(smtp_server.port),
        "EMAIL_POLL_SECONDS": "0.1",
        "LOG_LEVEL": "WARNING",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", "deliver-emails", *once, cwd=ROOT, env=env
    )
    try:
        for _ in range(600):  # until the message is being sent (the process starts first)
            if (await rows(factory))["in-flight"].status != "pending":
                break
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 0
    assert (await rows(factory))["in-flight"].status == "sent"
    assert [m.message["Subject"] for m in smtp_server.messages] == ["Notice in-flight"]


async def test_an_address_whose_header_names_another_mailbox_is_never_sent_to_it(
    app: FastAPI,
    client: httpx.AsyncClient,
    token: TokenFactory,
    factory: Factory,
    smtp_settings: Settings,
    smtp_server: SmtpServer,
) -> None:
    """`billing;ann@client.example` (a list typed as one address) has no space nor control
    character, but as a `To:` header it is the bare mailbox `billing`: the relay was handed
    RCPT TO:<billing> (which a relay completes with its own domain, a stranger's mailbox). It
    is no billing contact (the token's claim is ignored), and a row queued with such an address
    fails as one that cannot be built, the rest still sent."""
    listed = "billing;ann@client.example"
    filed = await client.post(
        "/v1/accounts/acc_list/refund-requests",
        json={"type": "refund", "description": "unused"},
        headers=bearer(token(account_id="acc_list", email=listed)),
    )
    assert filed.status_code == 201, filed.text
    async with factory() as session:
        assert await session.scalar(select(Account.email).where(Account.id == "acc_list")) is None

    await queue(factory, "a-list", to="a,b@client.example")
    await queue(factory, "b-good")
    await deliver_round(factory, smtp_settings)

    found = await rows(factory)
    assert (found["a-list"].status, found["b-good"].status) == ("failed", "sent")
    assert [m.rcpt_tos for m in smtp_server.messages] == [["client@example.com"]]
