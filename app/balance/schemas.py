"""Balance, ledger, usage charges and activity: the HTTP contract."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from app.calendar import Moment

ExternalId = Field(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")
Currency = Field(min_length=3, max_length=3, pattern=r"^[A-Za-z]{3}$")


class BalanceOut(BaseModel):
    balance: int = Field(description="Prepaid balance in minor units (>= 0).")
    debt: int = Field(description="Usage beyond the prepaid balance, in minor units (>= 0).")
    currency: str = Field(description="The account's currency (lowercase ISO 4217).")


class LedgerEntryOut(BaseModel):
    id: int = Field(description="Entry id; also the pagination cursor.")
    kind: str = Field(
        description="top_up, debt_repayment, balance_credit, refund_reversal, "
        "dispute_reinstatement (credits); conversation, meta_fee, refund or dispute_withdrawal "
        "(debits)."
    )
    source_id: str = Field(description="What caused it: a Checkout session id, a usage id...")
    amount: int = Field(description="Signed minor units: positive credits, negative debits.")
    currency: str
    description: str | None = None
    occurred_at: datetime
    created_at: datetime


class LedgerPage(BaseModel):
    data: list[LedgerEntryOut] = Field(description="Entries, newest first.")
    next_cursor: int | None = Field(
        description="Pass as `cursor` for the next (older) page; null on the last page."
    )


class UsageChargeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = ExternalId
    amount: StrictInt = Field(gt=0, le=10**12, description="Minor units to debit.")
    currency: str = Currency
    kind: Literal["conversation", "meta_fee"]
    occurred_at: Moment


class UsageChargeOut(BaseModel):
    id: str = Field(description="The caller's id of the charge.")
    amount: int = Field(description="Minor units debited.")
    currency: str
    kind: str
    occurred_at: datetime
    ledger_entry_id: int
    balance: int = Field(description="Balance after the charge (now, on a replay).")
    debt: int = Field(description="Debt after the charge (now, on a replay).")


class ActivityIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = ExternalId
    kind: Literal["message_sent", "template_created", "number_connected", "other"]
    occurred_at: Moment


class ActivityOut(BaseModel):
    id: str
    kind: str
    occurred_at: datetime
    recorded_at: datetime
