"""indexes for per-account and per-window reads, so they do not grow with the history

Every checkout counts the account's Stripe sessions of the last minute (app/rate_limit.py
`recent_stripe_sessions`, in `account_facts`): with only `ix_checkout_sessions_account_id` it
read every checkout the account ever made and filtered them by age.
`ix_checkout_sessions_account_id_created_at` (account_id, created_at) reads the last minute's
only; it replaces `ix_checkout_sessions_account_id`, whose look-ups it also serves.

A debt repayment subtracts the account's repayments Stripe reports paid that no event has
credited yet (app/checkout/service.py `_PAID_REPAYMENTS`), which it also looked for among every
checkout of the account: `ix_checkout_sessions_repayments_paid` holds only those (a handful).

Completing a maintenance window locked every subscription ever made (and asked for their
invoices and payments with one parameter each, past Postgres's 32767 once there were that
many). It now reads the subscriptions whose `access_until` reaches past the window's start:
those whose period ends after it (`ix_subscriptions_current_period_end`) and those still
holding extension days outside Stripe's period (`ix_subscriptions_days_outside_period`).

The balance (GET .../balance, and a debt repayment's debt) sums the account's ledger on every
read, by design: `ix_ledger_entries_account_id_id` found the entries but the sum read each
entry's row from the table (a page per entry: an account's entries are spread over the whole
table). `ix_ledger_entries_account_id_id_amount` holds the amounts too (INCLUDE), so the sum is
an index-only scan; it replaces `ix_ledger_entries_account_id_id`, whose reads (the ledger
newest first, the bound currency) it also serves.

`subscriptions.status_since`: `created` of the first applied event that showed the current
status (the webhook consumer sets it when the status changes). With PAST_DUE_KEEPS_ACCESS a
subscription `unpaid` now was `past_due`, with access, before it became so: a maintenance
window that started before that was live for it. Null for rows whose status was set before
this column (unknown: judged as before).

Built (and dropped) CONCURRENTLY, as 0016: these tables take writes in every checkout, which a
plain CREATE INDEX would block while it reads the whole table. Outside a transaction, so a run
cut short leaves the indexes built so far (or an INVALID one from a failed build) behind: each
index is dropped if present before it is built, so running the migration again completes it.

Revision ID: 0018
Revises: 0017
Create Date: 2026-11-27 08:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | Sequence[str] | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES: list[tuple[str, str, list[str | sa.TextClause], sa.TextClause | None]] = [
    (
        "ix_checkout_sessions_account_id_created_at",
        "checkout_sessions",
        ["account_id", "created_at"],
        None,
    ),
    (
        "ix_checkout_sessions_repayments_paid",
        "checkout_sessions",
        ["account_id"],
        sa.text("purpose = 'debt_repayment' AND payment_status = 'paid' AND fulfilled_at IS NULL"),
    ),
    ("ix_subscriptions_current_period_end", "subscriptions", ["current_period_end"], None),
    (
        "ix_subscriptions_days_outside_period",
        "subscriptions",
        ["current_period_end"],
        sa.text("extension_days > extension_days_in_period"),
    ),
    (
        "ix_ledger_entries_account_id_id_amount",
        "ledger_entries",
        ["account_id", sa.text("id DESC")],
        None,
    ),
]
REPLACED: list[tuple[str, str, list[str | sa.TextClause], sa.TextClause | None]] = [
    ("ix_checkout_sessions_account_id", "checkout_sessions", ["account_id"], None),
    ("ix_ledger_entries_account_id_id", "ledger_entries", ["account_id", sa.text("id DESC")], None),
]
INCLUDE = {"ix_ledger_entries_account_id_id_amount": ["amount"]}


def _build(
    name: str, table: str, columns: list[str | sa.TextClause], where: sa.TextClause | None
) -> None:
    op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
    include = {"postgresql_include": INCLUDE[name]} if name in INCLUDE else {}
    op.create_index(
        name, table, columns, postgresql_where=where, postgresql_concurrently=True, **include
    )


def upgrade() -> None:
    # IF NOT EXISTS: committed before the indexes are built, it may be there from a run cut
    # short
    op.execute("ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS status_since TIMESTAMPTZ")
    op.execute(
        "COMMENT ON COLUMN subscriptions.status_since IS '`created` of the first applied event"
        " that showed the current status (null: unknown, set before this was recorded).'"
    )
    with op.get_context().autocommit_block():
        for index in INDEXES:
            _build(*index)
        for name, table, _columns, _where in REPLACED:
            op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for index in REPLACED:
            _build(*index)
        for name, table, _columns, _where in reversed(INDEXES):
            op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
    op.drop_column("subscriptions", "status_since")
