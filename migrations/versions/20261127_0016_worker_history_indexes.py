"""indexes for the background workers' reads, so they do not grow with the history

Every email delivery round parks the rows a worker claimed and never confirmed
(app/notifications/worker.py `park_stale_sending`: `status = 'sending'` claimed before the
cutoff). Without an index that read every email ever sent, each round of every worker.
`ix_outbox_emails_sending` holds only the rows in flight (a handful).

The access-expiry sweep (every minute) and the feed's writers (every event that changes
access) read each channel's last access_changes entry (`ORDER BY id DESC LIMIT 1`); the sweep
sorted the whole feed (DISTINCT ON) and each writer read all of a channel's entries.
`ix_access_changes_channel_id_id` (channel_id, id) gives the last entry in one probe; it
replaces `ix_access_changes_channel_id`, whose look-ups it also serves.

The retry of maintenance extensions still pending at Stripe (every minute) looked for them
among every extension ever granted (each window extends every subscription it touches):
`ix_maintenance_extensions_pending` holds the pending ones only.

Each /metrics scrape counts the overdue refund and appeal requests, which only open requests
can be: `ix_refund_requests_open` holds those (not decided, not closed), so the count no
longer reads every request ever filed. Finance's list (GET /v1/finance/refund-requests,
newest first) sorted them all for each page: `ix_refund_requests_received_at_id` is its order.

The hourly payload pruning looked for applied events older than EVENT_RETENTION_DAYS that
still hold a payload by reading every event ever received (a sequential scan; the
(status, received_at) index covers every applied event older than the cutoff):
`ix_stripe_events_payload_kept` holds only the applied events whose payload is still kept.

Built (and dropped) CONCURRENTLY: these tables take writes in the transactions of replies,
refunds and events, which a plain CREATE INDEX would block while it reads the whole table.
Outside a transaction, so a run cut short leaves the indexes built so far (or an INVALID one
from a failed build) behind: each index is dropped if present before it is built, so running
the migration again completes it.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-27 07:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | Sequence[str] | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES: list[tuple[str, str, list[str | sa.TextClause], sa.TextClause | None]] = [
    ("ix_outbox_emails_sending", "outbox_emails", ["claimed_at"], sa.text("status = 'sending'")),
    ("ix_access_changes_channel_id_id", "access_changes", ["channel_id", "id"], None),
    (
        "ix_maintenance_extensions_pending",
        "maintenance_extensions",
        ["subscription_id", "id"],
        sa.text("stripe_status = 'pending'"),
    ),
    (
        "ix_refund_requests_open",
        "refund_requests",
        ["received_at"],
        sa.text("decided_at IS NULL AND status <> 'closed'"),
    ),
    (
        "ix_refund_requests_received_at_id",
        "refund_requests",
        [sa.text("received_at DESC"), "id"],
        None,
    ),
    (
        "ix_stripe_events_payload_kept",
        "stripe_events",
        ["received_at"],
        sa.text("payload IS NOT NULL AND status IN ('processed', 'ignored')"),
    ),
]
REPLACED = ("ix_access_changes_channel_id", "access_changes", ["channel_id"], None)


def _build(
    name: str, table: str, columns: list[str | sa.TextClause], where: sa.TextClause | None
) -> None:
    op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
    op.create_index(name, table, columns, postgresql_where=where, postgresql_concurrently=True)


def upgrade() -> None:
    with op.get_context().autocommit_block():
        for index in INDEXES:
            _build(*index)
        op.drop_index(
            REPLACED[0], table_name=REPLACED[1], postgresql_concurrently=True, if_exists=True
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        _build(*REPLACED)
        for name, table, _columns, _where in reversed(INDEXES):
            op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
