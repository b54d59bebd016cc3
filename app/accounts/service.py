"""Accounts and channels: created on first use, one Stripe customer per account, one owner per
channel, one currency per account.

- `ensure_account` inserts the account row if missing (`ON CONFLICT`), keeping the token's email
  as billing contact.
- `claim_channel`: a channel belongs to the account whose checkout first named it; the database
  decides races (`INSERT ... ON CONFLICT DO NOTHING`), and any other account gets 404
  `channel_not_found`, indistinguishable from a channel that does not exist.
- `ensure_stripe_customer` creates the account's Stripe customer exactly once: it locks the
  account row (`SELECT ... FOR UPDATE`) in its own short transaction, so concurrent first
  requests wait for the first one and then reuse its customer; the Stripe idempotency key is
  derived from the account id, so a retry after a crash between Stripe's answer and our commit
  returns the same customer instead of a second one.
- `effective_currency`: the account's currency once a payment set it; before that the currency
  of its existing ledger entries (usage reported before any payment); else None (any supported
  currency may be the first).
"""

from __future__ import annotations

import structlog
from sqlalchemy import event, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from app.errors import ChannelNotFound, CurrencyMismatch
from app.models import Account, Channel, LedgerEntry
from app.stripe_gateway import StripeGateway, idempotency_key

log = structlog.get_logger()


ENSURED_ACCOUNTS = "ensured_accounts"
"""`session.info` key: accounts this transaction already made sure of (dropped on rollback)."""


@event.listens_for(Session, "after_soft_rollback")
def _forget_ensured_accounts(session: Session, previous_transaction: object) -> None:
    session.info.pop(ENSURED_ACCOUNTS, None)


async def ensure_account(session: AsyncSession, account_id: str, email: str | None = None) -> None:
    """Create the account row on first use; a user token's email becomes the billing contact.
    Without an email, an account already ensured in this transaction costs no statement (the
    event processor ensures the same accounts many times in one batch)."""
    ensured: set[str] = session.info.setdefault(ENSURED_ACCOUNTS, set())
    if email is None and account_id in ensured:
        return
    statement = insert(Account).values(id=account_id, email=email)
    if email:
        statement = statement.on_conflict_do_update(
            index_elements=[Account.id],
            set_={"email": email},
            where=Account.email.is_distinct_from(email),
        )
    else:
        statement = statement.on_conflict_do_nothing(index_elements=[Account.id])
    await session.execute(statement)
    ensured.add(account_id)


async def claim_channel(session: AsyncSession, account_id: str, channel_id: str) -> None:
    """Make `account_id` the channel's owner if nobody is; 404 when another account owns it."""
    await session.execute(
        insert(Channel)
        .values(id=channel_id, account_id=account_id)
        .on_conflict_do_nothing(index_elements=[Channel.id])
    )
    owner = await session.scalar(select(Channel.account_id).where(Channel.id == channel_id))
    if owner != account_id:
        log.info("channel.foreign_claim_refused", account_id=account_id)
        raise ChannelNotFound(f"No channel {channel_id!r} on this account")


async def owns_channel(session: AsyncSession, account_id: str, channel_id: str) -> bool:
    owner = await session.scalar(select(Channel.account_id).where(Channel.id == channel_id))
    return owner == account_id


async def ensure_stripe_customer(
    factory: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    account_id: str,
) -> str:
    """The account's Stripe customer id, created once (see module docstring)."""
    async with factory() as session, session.begin():
        account = await session.scalar(
            select(Account).where(Account.id == account_id).with_for_update()
        )
        if account is None:  # pragma: no cover - callers ensure the account first
            raise RuntimeError("account row missing")
        if account.stripe_customer_id:
            return account.stripe_customer_id
        customer = await gateway.create_customer(
            account_id=account_id,
            email=account.email,
            key=idempotency_key("customer", account_id),
        )
        account.stripe_customer_id = str(customer["id"])
        log.info("stripe_customer.created", account_id=account_id, customer=customer["id"])
        return account.stripe_customer_id


async def effective_currency(session: AsyncSession, account_id: str) -> str | None:
    """The currency the account is bound to, or None while any may be the first."""
    currency = await session.scalar(select(Account.currency).where(Account.id == account_id))
    if currency:
        return currency.lower()
    ledger_currency = await session.scalar(
        select(LedgerEntry.currency).where(LedgerEntry.account_id == account_id).limit(1)
    )
    return ledger_currency.lower() if ledger_currency else None


async def check_currency(session: AsyncSession, account_id: str, currency: str) -> None:
    """422 `currency_mismatch` when money in `currency` cannot move on this account."""
    bound = await effective_currency(session, account_id)
    if bound is not None and bound != currency.lower():
        raise CurrencyMismatch(f"This account uses {bound.upper()}, not {currency.upper()}")
