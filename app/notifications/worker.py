"""Email delivery: the outbox worker that sends queued emails over SMTP, at most once.

How one message travels (`deliver_round`):

1. Claim: in its own short transaction, one due `pending` row is picked with
   `FOR UPDATE SKIP LOCKED` (so any number of worker processes can run side by side without
   picking the same row), marked `sending` with `claimed_at` and `attempts + 1`, and COMMITTED
   before any byte goes to the SMTP server.
2. Send: one SMTP conversation per round (connection reused for the round's messages). Every
   message carries a stable `Message-ID: <outbox.<outbox id>@<EMAIL_FROM's domain>>`, so the
   same notice is recognisable as one message wherever it is seen.
3. Record: `sent` with `sent_at` on the server's `250` to DATA; otherwise, when the failure
   proves the message was not accepted (connection refused, any step before DATA, or an error
   reply to DATA), back to `pending` with exponential backoff
   (`EMAIL_RETRY_BASE_SECONDS × 2^(attempts-1)`, capped at `EMAIL_RETRY_MAX_SECONDS`), or
   `failed` after `EMAIL_MAX_ATTEMPTS` refusals (`refusals`) or a permanent (5xx) refusal. A
   relay that cannot be reached (or refuses the connection) is not the message's failure: such
   attempts back off the same way (`attempts` counts them) but are not refusals and never park
   it, so an outage of any length loses no notice, nor shortens its retries afterwards.

At-most-once, deliberately. Two moments leave us not knowing whether the client got the email:
the worker dying between step 1's commit and step 3, and the connection dropping while the
server holds the message after DATA (no reply). Resending could give a client the same notice
twice; not resending could lose one. We choose never to send twice: such a row is never picked
again automatically. A DATA that ends without a reply is parked at once as `failed` with
`last_error` starting `delivery_uncertain`; a row still `sending` `EMAIL_SENDING_STALE_SECONDS`
after its claim (far beyond any live SMTP conversation) is parked the same way by the next round.
Parked rows are counted in `billing_emails_failed_total{reason="uncertain"}` and logged
(`email.delivery_uncertain`) for an operator to check the mail logs and requeue by hand.

Run it: the web process loops `EmailWorker` in the background when `RUN_BACKGROUND_WORKERS` is
true; `billing deliver-emails` runs the same loop as its own process (`--once` for one round).
Tests call `deliver_round(...)` for one deterministic round.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.errors
import email.policy
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Protocol

import aiosmtplib
import structlog
from prometheus_client import Counter
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.models import OutboxEmail
from app.notifications.outbox import header_names_itself

log = structlog.get_logger()

EMAILS_SENT = Counter("billing_emails_sent_total", "Emails accepted by the SMTP relay")
EMAILS_FAILED = Counter(
    "billing_emails_failed_total",
    "Email delivery attempts that did not send: retry (will try again), "
    "failed (parked after the last attempt or a permanent refusal), uncertain (parked unsent-or-not)",
    ["reason"],
)

UNCERTAIN = "delivery_uncertain"


class DeliveryRefused(Exception):
    """The relay certainly did not accept the message; `permanent` for a 5xx refusal."""

    def __init__(self, detail: str, *, permanent: bool, relay_down: bool = False) -> None:
        super().__init__(detail)
        self.permanent = permanent
        self.relay_down = relay_down


class DeliveryUncertain(Exception):
    """The message may or may not have been accepted (no reply after DATA)."""


class Mailer(Protocol):
    async def send(self, message: EmailMessage) -> None:
        """Hand one message to the relay; raise DeliveryRefused or DeliveryUncertain."""

    async def close(self) -> None: ...


def message_id(outbox_id: uuid.UUID, sender: str) -> str:
    """The stable Message-ID of an outbox row (the same whenever and wherever it is built)."""
    domain = parseaddr(sender)[1].rpartition("@")[2] or "billing.1msg.io"
    return f"<outbox.{outbox_id}@{domain}>"


def build_message(row: OutboxEmail, settings: Settings) -> EmailMessage:
    """The message of a row; ValueError when no email can carry it. The address must be ASCII:
    the envelope is sent without SMTPUTF8, so a non-ASCII one could never be handed over; and
    one mailbox as a `To:` header (the envelope's recipient is read from it), never a list or
    another mailbox than the row's."""
    if not row.to_address.isascii():
        raise ValueError("the address is not ASCII (SMTPUTF8 is not used)")
    if not header_names_itself(row.to_address):
        raise ValueError("the address is not one mailbox as a To: header")
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = settings.email_from
    message["To"] = row.to_address
    message["Subject"] = row.subject
    message["Message-ID"] = message_id(row.id, settings.email_from)
    message["Date"] = format_datetime(row.created_at or datetime.now(UTC))
    message.set_content(row.body)
    return message


class SmtpMailer:
    """One SMTP connection, opened on first use and reused for the round (aiosmtplib)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._smtp: aiosmtplib.SMTP | None = None

    async def _connection(self) -> aiosmtplib.SMTP:
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp
        s = self.settings
        password = s.smtp_password.get_secret_value() if s.smtp_password else None
        smtp = aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            username=s.smtp_username or None,
            password=password if s.smtp_username else None,
            use_tls=s.smtp_tls == "tls",
            start_tls=s.smtp_tls == "starttls",
            timeout=s.smtp_timeout_seconds,
        )
        try:
            await smtp.connect()
        except aiosmtplib.SMTPResponseException as exc:
            raise DeliveryRefused(
                f"connect: {exc.code} {exc.message}", permanent=False, relay_down=True
            ) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise DeliveryRefused(
                f"connect: {type(exc).__name__}", permanent=False, relay_down=True
            ) from None
        self._smtp = smtp
        return smtp

    async def send(self, message: EmailMessage) -> None:
        smtp = await self._connection()
        sender = parseaddr(self.settings.email_from)[1]
        recipient = parseaddr(str(message["To"]))[1]
        try:
            await smtp.mail(sender)
            await smtp.rcpt(recipient)
        except aiosmtplib.SMTPResponseException as exc:
            await self._reset(smtp)
            raise DeliveryRefused(f"{exc.code} {exc.message}", permanent=exc.code >= 500) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            self._drop()
            raise DeliveryRefused(f"envelope: {type(exc).__name__}", permanent=False) from None
        try:
            await smtp.data(message.as_bytes(policy=email.policy.SMTP))
        except aiosmtplib.SMTPResponseException as exc:
            # The server answered DATA with an error code: it did not take the message.
            await self._reset(smtp)
            raise DeliveryRefused(f"{exc.code} {exc.message}", permanent=exc.code >= 500) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            self._drop()
            raise DeliveryUncertain(f"no reply to DATA: {type(exc).__name__}") from None

    async def _reset(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.rset()
        except (aiosmtplib.SMTPException, OSError):
            self._drop()

    def _drop(self) -> None:
        if self._smtp is not None:
            self._smtp.close()
        self._smtp = None

    async def close(self) -> None:
        if self._smtp is not None and self._smtp.is_connected:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await self._smtp.quit()
        self._drop()


@dataclass
class RoundResult:
    sent: list[uuid.UUID] = field(default_factory=list)
    retrying: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    uncertain: list[uuid.UUID] = field(default_factory=list)

    @property
    def handled(self) -> int:
        return len(self.sent) + len(self.retrying) + len(self.failed) + len(self.uncertain)


def retry_delay(settings: Settings, attempts: int) -> timedelta:
    """Exponential backoff after the `attempts`-th failed attempt."""
    seconds = settings.email_retry_base_seconds * 2 ** max(0, attempts - 1)
    return timedelta(seconds=min(seconds, settings.email_retry_max_seconds))


async def claim_next(session: AsyncSession, now: datetime) -> OutboxEmail | None:
    """Mark the next due `pending` row `sending` (caller commits before sending)."""
    row = (
        await session.execute(
            select(OutboxEmail)
            .where(OutboxEmail.status == "pending", OutboxEmail.next_attempt_at <= now)
            .order_by(OutboxEmail.next_attempt_at, OutboxEmail.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
    ).scalar_one_or_none()
    if row is None:
        return None
    row.status = "sending"
    row.claimed_at = now
    row.attempts += 1
    await session.flush()
    return row


async def park_stale_sending(
    session_factory: async_sessionmaker[AsyncSession], settings: Settings, now: datetime
) -> list[uuid.UUID]:
    """Rows a worker claimed and never confirmed: park them, never resend (at-most-once)."""
    cutoff = now - timedelta(seconds=settings.email_sending_stale_seconds)
    async with session_factory() as session, session.begin():
        parked = list(
            (
                await session.execute(
                    update(OutboxEmail)
                    .where(OutboxEmail.status == "sending", OutboxEmail.claimed_at <= cutoff)
                    .values(
                        status="failed",
                        last_error=f"{UNCERTAIN}: the worker stopped after claiming it; "
                        "not resent automatically",
                    )
                    .returning(OutboxEmail.id)
                )
            ).scalars()
        )
    for outbox_id in parked:
        EMAILS_FAILED.labels("uncertain").inc()
        log.warning("email.delivery_uncertain", outbox_id=str(outbox_id), cause="stale_sending")
    return parked


async def deliver_round(
    session_factory: async_sessionmaker[AsyncSession],
    settings: Settings,
    *,
    mailer: Mailer | None = None,
    now: datetime | None = None,
    limit: int | None = None,
    stop: asyncio.Event | None = None,
) -> RoundResult:
    """One delivery round: park stale `sending` rows, then claim and send due rows one by one
    (at most `limit`, default `EMAIL_BATCH_SIZE`), claiming none once `stop` is set (a
    shutdown finishes the message in flight only). `now` is injectable for tests; otherwise
    each claim is stamped with the time it is made, not the round's start (a long round must
    not make the message it is sending look stale to another worker)."""
    result = RoundResult()
    result.uncertain += await park_stale_sending(
        session_factory, settings, now or datetime.now(UTC)
    )
    own_mailer = mailer is None
    active: Mailer = mailer or SmtpMailer(settings)
    try:
        for _ in range(limit or settings.email_batch_size):
            if stop is not None and stop.is_set():
                break
            moment = now or datetime.now(UTC)
            async with session_factory() as session, session.begin():
                row = await claim_next(session, moment)
            if row is None:
                break
            relay_down = await _send_one(session_factory, settings, active, row, moment, result)
            if relay_down:  # the rest waits for the next round instead of burning attempts
                break
    finally:
        if own_mailer:
            await active.close()
    return result


async def _send_one(
    session_factory: async_sessionmaker[AsyncSession],
    settings: Settings,
    mailer: Mailer,
    row: OutboxEmail,
    now: datetime,
    result: RoundResult,
) -> bool:
    """Send one claimed row and record the outcome; True when the relay could not be reached."""
    values: dict[str, object]
    relay_down = False
    try:
        try:
            message = build_message(row, settings)
        except (ValueError, email.errors.MessageError) as exc:  # e.g. a line break in `to`
            raise DeliveryRefused(f"the message cannot be built: {exc}", permanent=True) from None
        await mailer.send(message)
    except DeliveryUncertain as exc:
        values = {"status": "failed", "last_error": f"{UNCERTAIN}: {exc}"[:2000]}
        result.uncertain.append(row.id)
        EMAILS_FAILED.labels("uncertain").inc()
        log.warning("email.delivery_uncertain", outbox_id=str(row.id), cause="no_data_reply")
    except DeliveryRefused as exc:
        relay_down = exc.relay_down
        # An unreachable relay says nothing about the message: it waits for the relay (the
        # backoff still grows, to EMAIL_RETRY_MAX_SECONDS) and is never parked for it.
        refusals = row.refusals + (0 if relay_down else 1)
        if exc.permanent or refusals >= settings.email_max_attempts:
            values = {"status": "failed", "last_error": str(exc)[:2000], "refusals": refusals}
            result.failed.append(row.id)
            EMAILS_FAILED.labels("failed").inc()
            log.error("email.failed", outbox_id=str(row.id), attempts=row.attempts)
        else:
            values = {
                "status": "pending",
                "refusals": refusals,
                "last_error": str(exc)[:2000],
                "next_attempt_at": now + retry_delay(settings, row.attempts),
            }
            result.retrying.append(row.id)
            EMAILS_FAILED.labels("retry").inc()
            log.info("email.retry_scheduled", outbox_id=str(row.id), attempts=row.attempts)
    else:
        values = {"status": "sent", "sent_at": datetime.now(UTC), "last_error": None}
        result.sent.append(row.id)
        EMAILS_SENT.inc()
        log.info("email.sent", outbox_id=str(row.id), attempts=row.attempts)
    async with session_factory() as session, session.begin():
        await session.execute(
            update(OutboxEmail)
            .where(OutboxEmail.id == row.id, OutboxEmail.status == "sending")
            .values(**values)
        )
    return relay_down


class EmailWorker:
    """Runs `deliver_round` in a loop, sleeping `EMAIL_POLL_SECONDS` when the outbox is idle."""

    def __init__(
        self, session_factory: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        self.session_factory = session_factory
        self.settings = settings
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while not self._stop.is_set():
            busy = False
            try:
                result = await deliver_round(self.session_factory, self.settings, stop=self._stop)
                busy = result.handled >= self.settings.email_batch_size
            except Exception as exc:  # keep the loop alive; the database may be briefly away
                log.error("email.round_failed", error_type=type(exc).__name__)
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.settings.email_poll_seconds)

    def request_stop(self) -> None:
        """`run` returns once the message in flight is done (a signal handler's call)."""
        self._stop.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="email-worker")

    async def stop(self) -> None:
        """Finish the message in flight (bounded by the SMTP timeout), then stop. A message cut
        off mid-conversation stays `sending` and is parked as uncertain, never resent."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 2 * self.settings.smtp_timeout_seconds)
            self._task = None
