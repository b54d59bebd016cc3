"""Queue an email in the caller's transaction; the delivery worker sends it after commit. And
which addresses an email can carry (`plausible_email`), the rule for a billing contact."""

from __future__ import annotations

import email.policy
import functools
from email.errors import MessageError
from email.message import EmailMessage
from email.utils import parseaddr
from typing import TypeGuard

from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import OutboxEmail
from app.webhooks.fees import minor_unit_digits

MAX_EMAIL_LENGTH = 320  # accounts.email


def plausible_email(email: object) -> TypeGuard[str]:
    """Whether an email can carry this as its recipient, so it may become an account's billing
    contact (a user token's `email`, the email entered at Stripe Checkout): one address
    (`local@domain`) of at most 320 ASCII characters (what a relay takes without SMTPUTF8),
    without spaces or control characters (a line break in a header is an injection), that a
    `To:` header carries as this one mailbox (`header_names_itself`: not `a;b@x.com`, whose
    header is the bare mailbox `a`). Any other value is ignored, as a missing one is: the
    contact on file stays."""
    if not isinstance(email, str) or len(email) > MAX_EMAIL_LENGTH:
        return False
    local, at, domain = email.rpartition("@")
    return (
        bool(local and at and domain)
        and email.isascii()  # the relay cannot be given another address without SMTPUTF8
        and email.isprintable()
        and " " not in email
        and header_names_itself(email)
    )


@functools.lru_cache(maxsize=4096)  # every request with a user token asks (~70 µs uncached)
def header_names_itself(address: str) -> bool:
    """Whether `address` as a `To:` header is exactly this one mailbox, the one the envelope
    is then sent to: a list (`a,b@x.com`), a comment (`a(b)@x.com`) or a route
    (`x@y.com<a@b.c>`) typed as one address is not (the relay would be handed another
    recipient, such as the bare mailbox `a`)."""
    message = EmailMessage(policy=email.policy.SMTP)
    try:
        message["To"] = address
        header = str(message["To"])
    except (ValueError, MessageError):
        return False
    return header == address and parseaddr(address) == ("", address)


def format_amount(amount: int, currency: str) -> str:
    """An amount in minor units as a client reads it: with its currency's exponent (2257 usd is
    `22.57 USD`, 1500 jpy `1,500 JPY`, 1500 kwd `1.500 KWD`), never the raw integer."""
    digits = minor_unit_digits(currency)
    major, minor = divmod(abs(amount), 10**digits)
    text = f"{major:,}" + (f".{minor:0{digits}d}" if digits else "")
    return f"{'-' if amount < 0 else ''}{text} {currency.upper()}".strip()


async def enqueue_email(
    session: AsyncSession, *, dedupe_key: str, to: str, subject: str, body: str
) -> bool:
    """Queue one email unless `dedupe_key` was queued before; True when newly queued."""
    statement = (
        insert(OutboxEmail)
        .values(dedupe_key=dedupe_key, to_address=to, subject=subject, body=body)
        .on_conflict_do_nothing(index_elements=[OutboxEmail.dedupe_key])
        .returning(OutboxEmail.id)
    )
    return (await session.execute(statement)).scalar_one_or_none() is not None
