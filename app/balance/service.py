"""The prepaid balance as a ledger.

Balance and debt are never stored: `account_balance` derives them from the sum of the
account's ledger entries (balance = max(0, sum), debt = max(0, -sum)), the one place this rule
is written. Credits (top-ups, debt repayments) are written by the Stripe payment event handlers,
keyed by the Checkout session; debits here are usage charges reported by other services, keyed
by the caller's id. Every entry is unique per (account, kind, source_id).

Replaying a usage charge with the same id and the same amount, currency and occurred_at
returns the recorded charge (200) and debits nothing; the same id with different values is
409 `usage_charge_conflict` (the caller has two different facts under one id). Activity reports
behave the same way (409 `activity_conflict`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.accounts.service import check_currency, effective_currency, ensure_account
from app.config import Settings
from app.errors import ActivityConflict, Unprocessable, UsageChargeConflict
from app.models import Account, Activity, LedgerEntry

USAGE_KINDS = ("conversation", "meta_fee")


@dataclass(frozen=True)
class Balance:
    balance: int
    debt: int
    currency: str


async def account_balance(session: AsyncSession, account_id: str) -> tuple[int, int, str | None]:
    """(balance, debt, currency) derived from the ledger; currency is None when the account is
    not bound to one yet (no payment, no ledger entry)."""
    total = await session.scalar(
        select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
            LedgerEntry.account_id == account_id
        )
    )
    total = int(total or 0)
    currency = await effective_currency(session, account_id)
    return max(0, total), max(0, -total), currency


async def get_balance(session: AsyncSession, settings: Settings, account_id: str) -> Balance:
    balance, debt, currency = await account_balance(session, account_id)
    return Balance(balance, debt, currency or settings.default_currency)


async def list_ledger(
    session: AsyncSession, account_id: str, *, before: int | None, limit: int
) -> tuple[list[LedgerEntry], int | None]:
    """Entries newest first; the cursor is the id of the last entry returned."""
    query = select(LedgerEntry).where(LedgerEntry.account_id == account_id)
    if before is not None:
        query = query.where(LedgerEntry.id < before)
    rows = list(
        (await session.scalars(query.order_by(LedgerEntry.id.desc()).limit(limit + 1))).all()
    )
    next_cursor = rows[limit - 1].id if len(rows) > limit else None
    return rows[:limit], next_cursor


async def record_usage_charge(
    session: AsyncSession,
    settings: Settings,
    account_id: str,
    *,
    charge_id: str,
    kind: str,
    amount: int,
    currency: str,
    occurred_at: datetime,
) -> tuple[LedgerEntry, bool]:
    """Debit the balance once per (account, id); returns (entry, created). The account row
    lock serialises usage charges of one account, so the id check and insert cannot race."""
    currency = currency.lower()
    if currency not in settings.supported_currencies:
        raise Unprocessable(f"Unsupported currency {currency!r}")
    await ensure_account(session, account_id)
    # Serialise money movements of one account so the currency binding cannot race.
    await session.execute(
        select(Account.id).where(Account.id == account_id).with_for_update(key_share=True)
    )
    await check_currency(session, account_id, currency)
    # The first usage charge binds the account's currency in its row, a row version written:
    # an event transaction (SERIALIZABLE) whose snapshot predates this commit then fails to
    # serialize when it locks the account, and runs again seeing this charge, instead of
    # binding another currency from a ledger it sees empty. A lock alone would not stop it.
    await session.execute(
        update(Account)
        .where(Account.id == account_id, func.nullif(Account.currency, "").is_(None))
        .values(currency=currency)
    )
    existing = await session.scalar(
        select(LedgerEntry).where(
            LedgerEntry.account_id == account_id,
            LedgerEntry.kind.in_(USAGE_KINDS),
            LedgerEntry.source_id == charge_id,
        )
    )
    if existing is not None:
        if (
            existing.kind != kind
            or existing.amount != -amount
            or existing.currency != currency
            or existing.occurred_at != occurred_at
        ):
            raise UsageChargeConflict(
                f"Usage charge {charge_id!r} was already recorded with other values"
            )
        return existing, False
    entry = LedgerEntry(
        account_id=account_id,
        kind=kind,
        source_id=charge_id,
        amount=-amount,
        currency=currency,
        description=f"{kind} usage charge",
        occurred_at=occurred_at,
    )
    session.add(entry)
    await session.flush()
    return entry, True


async def record_activity(
    session: AsyncSession,
    account_id: str,
    *,
    activity_id: str,
    kind: str,
    occurred_at: datetime,
) -> tuple[Activity, bool]:
    """Store an activity report once per (account, id); returns (activity, created)."""
    await ensure_account(session, account_id)
    inserted = await session.scalar(
        insert(Activity)
        .values(account_id=account_id, external_id=activity_id, kind=kind, occurred_at=occurred_at)
        .on_conflict_do_nothing()
        .returning(Activity.id)
    )
    activity = await session.scalar(
        select(Activity).where(
            Activity.account_id == account_id, Activity.external_id == activity_id
        )
    )
    assert activity is not None
    if inserted is None and (activity.kind != kind or activity.occurred_at != occurred_at):
        raise ActivityConflict(f"Activity {activity_id!r} was already reported with other values")
    return activity, inserted is not None
