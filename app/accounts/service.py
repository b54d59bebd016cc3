"""Accounts and channels: created on first use, one Stripe customer per account, one owner per
channel, one currency per account.

- `ensure_account` inserts the account row if missing (`ON CONFLICT`), keeping the token's email
  as billing contact.
- `claim_channel`: a channel belongs to the account whose checkout first named it; the database
  decides races (`INSERT ... ON CONFLICT DO NOTHING`), and any other account gets 404
  `channel_not_found`, indistinguishable from a channel that does not exist.
- `create_stripe_customer` creates the account's Stripe customer exactly once: its caller holds
  the account row lock (`lock_account`) and found no customer, so concurrent first requests
  wait for the first one and then reuse its customer; the Stripe idempotency key is derived
  from the account id, so a retry after a crash between Stripe's answer and our commit returns
  the same customer instead of a second one. The transaction that records the id must commit
  durably (never with `synchronous_commit = off`): the record, not Stripe's 24-hour key memory,
  is what keeps a later checkout from making a second customer.
- `effective_currency`: the account's currency once a payment set it; before that the currency
  of its existing ledger entries (usage reported before any payment); else None (any supported
  currency may be the first).
- `lock_account` = `ensure_account` + the account row lock in one statement, and
  `account_facts` what a checkout decides on (bound currency, Stripe customer, recent Stripe
  sessions, email) in one more: the checkout path's round trips to Postgres. These, with
  `claim_channel` and `create_stripe_customer`, run on the checkout's `driver_transaction`
  (app/db.py): Core statements compiled once, executed by asyncpg.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import structlog
from sqlalchemy import String, Table, bindparam, event, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from app.db import DriverStatement, session_driver
from app.errors import ChannelNotFound, CurrencyMismatch
from app.models import Account, Channel, LedgerEntry
from app.rate_limit import RecentSessions, recent_stripe_sessions
from app.stripe_gateway import StripeGateway, StripeRequestRejected, idempotency_key

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


async def ensure_accounts(session: AsyncSession, account_ids: Iterable[str]) -> None:
    """`ensure_account` (no email) for many accounts in one statement: the event processor
    ensures every account a batch of events names up front."""
    ensured: set[str] = session.info.setdefault(ENSURED_ACCOUNTS, set())
    missing = sorted(set(account_ids) - ensured)
    if not missing:
        return
    await _ENSURE_ACCOUNTS.execute(await session_driver(session), ids=missing)
    ensured.update(missing)


_ENSURE_ACCOUNTS = DriverStatement(
    insert(cast(Table, Account.__table__))
    .from_select(["id"], select(func.unnest(bindparam("ids", type_=ARRAY(String)))))
    .on_conflict_do_nothing(index_elements=[Account.id])
)


def _lock_account_statement() -> Any:
    accounts = cast(Table, Account.__table__)
    statement = insert(accounts).values(id=bindparam("account_id"), email=bindparam("email"))
    new_email = statement.excluded.email
    return statement.on_conflict_do_update(
        index_elements=[accounts.c.id],
        set_={"email": new_email},
        where=accounts.c.email.is_distinct_from(new_email) & (func.coalesce(new_email, "") != ""),
    )


_LOCK_ACCOUNT = _lock_account_statement()


_LOCK_ACCOUNT_SQL = DriverStatement(_LOCK_ACCOUNT)


async def lock_account(conn: Any, account_id: str, email: str | None = None) -> None:
    """`ensure_account` and `SELECT ... FOR UPDATE` of the row in one statement, on a
    `driver_transaction`: `ON CONFLICT DO UPDATE` locks the existing row even when its `WHERE`
    leaves it unchanged (PostgreSQL locks every conflicting row it considers), and a row just
    inserted is ours until commit. The email is updated as `ensure_account` does (only to a
    non-empty, different one)."""
    await _LOCK_ACCOUNT_SQL.execute(conn, account_id=account_id, email=email)


BOUND_CURRENCY = func.coalesce(
    func.nullif(Account.currency, ""),
    select(LedgerEntry.currency)
    .where(LedgerEntry.account_id == Account.id)
    .limit(1)
    .scalar_subquery(),
)
"""An `accounts` row's bound currency: its own, else its ledger's (NULL while any may be the
first)."""


@dataclass(frozen=True)
class AccountFacts:
    currency: str | None
    """The bound currency (`effective_currency`), lowercase, or None while any may be first."""
    stripe_customer_id: str | None
    recent: RecentSessions
    email: str | None = None
    """The billing contact (for a Stripe customer made now)."""


def _account_facts_statement() -> Any:
    account_id = bindparam("account_id", type_=String)
    count, seconds_left = recent_stripe_sessions(account_id)
    return select(
        BOUND_CURRENCY,
        Account.stripe_customer_id,
        count,
        seconds_left,
        Account.email,
    ).where(Account.id == account_id)


_ACCOUNT_FACTS = _account_facts_statement()


_ACCOUNT_FACTS_SQL = DriverStatement(_ACCOUNT_FACTS)


async def account_facts(conn: Any, account_id: str) -> AccountFacts:
    """One statement (run it after `lock_account`, so it sees every committed checkout of the
    account): its bound currency, Stripe customer, Stripe sessions of the last minute and
    billing email."""
    row = await _ACCOUNT_FACTS_SQL.fetchrow(conn, account_id=account_id)
    currency, customer, recent_count, recent_seconds, email = row
    return AccountFacts(
        currency=currency.lower() if currency else None,
        stripe_customer_id=customer or None,
        recent=RecentSessions(int(recent_count), recent_seconds),
        email=email,
    )


def require_currency(bound: str | None, currency: str) -> None:
    """422 `currency_mismatch` when money in `currency` cannot move on an account bound to
    `bound` (see `check_currency`)."""
    if bound is not None and bound != currency.lower():
        raise CurrencyMismatch(f"This account uses {bound.upper()}, not {currency.upper()}")


_CLAIM_CHANNEL = DriverStatement(
    insert(Channel)
    .values(id=bindparam("channel_id"), account_id=bindparam("account_id"))
    .on_conflict_do_nothing(index_elements=[Channel.id])
)
_CHANNEL_OWNER = DriverStatement(
    select(Channel.account_id).where(Channel.id == bindparam("channel_id", type_=String))
)


async def claim_channel(conn: Any, account_id: str, channel_id: str) -> None:
    """Make `account_id` the channel's owner if nobody is; 404 when another account owns it
    (on a `driver_transaction`). A channel that exists is only read: the insert would wait
    for a transaction that wrote its row (an event batch recording its access, which may then
    want the account this checkout has locked: a deadlock)."""
    owner = await _CHANNEL_OWNER.fetchval(conn, channel_id=channel_id)
    if owner is None:
        await _CLAIM_CHANNEL.execute(conn, channel_id=channel_id, account_id=account_id)
        owner = await _CHANNEL_OWNER.fetchval(conn, channel_id=channel_id)
    if owner != account_id:
        log.info("channel.foreign_claim_refused", account_id=account_id)
        raise ChannelNotFound(f"No channel {channel_id!r} on this account")


_RECORD_CUSTOMER = DriverStatement(
    update(Account)
    .where(Account.id == bindparam("account_id", type_=String))
    .values(stripe_customer_id=bindparam("customer_id"))
)


async def create_stripe_customer(
    conn: Any, gateway: StripeGateway, account_id: str, email: str | None
) -> str:
    """Create the account's Stripe customer and record its id, in the caller's
    `driver_transaction`, which holds the account row lock and found no customer (see module
    docstring). What is sent under the account-derived key never depends on who asks: Stripe
    refuses a key sent again with other parameters (400 `idempotency_error`), so after a lost
    answer a retry by another member of the account, or a service token, would get 502 for the
    24 hours Stripe keeps the key. The billing email is set by an update after it; an address
    Stripe refuses (`email_invalid`: our plausibility check is looser than Stripe's) is left
    off the customer, which is only where Stripe sends receipts, rather than failing every
    checkout of the account."""
    customer = await gateway.create_customer(
        account_id=account_id, key=idempotency_key("customer", account_id)
    )
    customer_id = str(customer["id"])
    if email and customer.get("email") != email:
        try:
            await gateway.update_customer_email(customer_id, email)
        except StripeRequestRejected as exc:
            if exc.param != "email" and exc.stripe_code != "email_invalid":
                raise
            log.warning("stripe_customer.email_refused", account_id=account_id)
    await _RECORD_CUSTOMER.execute(conn, account_id=account_id, customer_id=customer_id)
    log.info("stripe_customer.created", account_id=account_id, customer=customer_id)
    return customer_id


async def effective_currency(session: AsyncSession, account_id: str) -> str | None:
    """The currency the account is bound to, or None while any may be the first."""
    currency = await session.scalar(select(BOUND_CURRENCY).where(Account.id == account_id))
    return currency.lower() if currency else None


async def check_currency(session: AsyncSession, account_id: str, currency: str) -> None:
    """422 `currency_mismatch` when money in `currency` cannot move on this account."""
    require_currency(await effective_currency(session, account_id), currency)


async def ledger_entries_in_account_currency(
    session: AsyncSession, entries: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, refused) of these new ledger entries: one account's ledger holds one currency.

    Locks the accounts (`FOR NO KEY UPDATE`, in id order: serialised with usage charges and
    other event batches of the account, not with rows that merely reference it) and reads
    their bound currency (`BOUND_CURRENCY`); an account with none is bound by its first
    entry here. An entry in another currency is refused: never written, so the balance never
    adds two currencies. The caller decides what a refused entry means (a top-up paid in
    another currency is recorded as a payment but not credited, see `on_checkout_events`)."""
    if not entries:
        return [], []
    accounts = sorted({str(entry["account_id"]) for entry in entries})
    rows = await session.execute(
        select(Account.id, BOUND_CURRENCY)
        .where(Account.id.in_(accounts))
        .order_by(Account.id)
        .with_for_update(key_share=True, of=Account)
    )
    bound = {account_id: currency.lower() for account_id, currency in rows if currency}
    kept: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    for entry in entries:
        currency = str(entry["currency"]).lower()
        if bound.setdefault(str(entry["account_id"]), currency) == currency:
            kept.append(entry)
        else:
            refused.append(entry)
            log.warning(
                "ledger.currency_mismatch",
                account_id=entry["account_id"],
                kind=entry["kind"],
                source_id=entry["source_id"],
                currency=currency,
                account_currency=bound[str(entry["account_id"])],
            )
    return kept, refused
