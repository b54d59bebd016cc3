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

Built (and dropped) CONCURRENTLY: these tables take inserts in the transactions of replies, refunds and
events, which a plain CREATE INDEX would block while it reads the whole table.

Revision ID: 0020
Revises: 0015
Create Date: 2026-11-27 07:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | Sequence[str] | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SENDING = sa.text("status = 'sending'")
PENDING = sa.text("stripe_status = 'pending'")
OPEN = sa.text("decided_at IS NULL AND status <> 'closed'")


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_outbox_emails_sending",
            "outbox_emails",
            ["claimed_at"],
            postgresql_where=SENDING,
            postgresql_concurrently=True,
        )
        op.create_index(
            "ix_access_changes_channel_id_id",
            "access_changes",
            ["channel_id", "id"],
            postgresql_concurrently=True,
        )
        op.create_index(
            "ix_maintenance_extensions_pending",
            "maintenance_extensions",
            ["subscription_id", "id"],
            postgresql_where=PENDING,
            postgresql_concurrently=True,
        )
        op.create_index(
            "ix_refund_requests_open",
            "refund_requests",
            ["received_at"],
            postgresql_where=OPEN,
            postgresql_concurrently=True,
        )
        op.create_index(
            "ix_refund_requests_received_at_id",
            "refund_requests",
            [sa.text("received_at DESC"), "id"],
            postgresql_concurrently=True,
        )
        op.drop_index(
            "ix_access_changes_channel_id",
            table_name="access_changes",
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_refund_requests_received_at_id",
            table_name="refund_requests",
            postgresql_concurrently=True,
        )
        op.drop_index(
            "ix_refund_requests_open",
            table_name="refund_requests",
            postgresql_concurrently=True,
        )
        op.drop_index(
            "ix_maintenance_extensions_pending",
            table_name="maintenance_extensions",
            postgresql_concurrently=True,
        )
        op.create_index(
            "ix_access_changes_channel_id",
            "access_changes",
            ["channel_id"],
            postgresql_concurrently=True,
        )
        op.drop_index(
            "ix_access_changes_channel_id_id",
            table_name="access_changes",
            postgresql_concurrently=True,
        )
        op.drop_index(
            "ix_outbox_emails_sending",
            table_name="outbox_emails",
            postgresql_concurrently=True,
        )
