"""subscriptions: when the cancellation a lost chargeback asked for was sent to Stripe

A lost chargeback that ends a subscription's access also cancels it at Stripe. That call is
made after the events are applied (app/disputes/cancels.py), not inside their transaction;
this column records that Stripe accepted it, so it is sent once.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-26 22:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "subscriptions",
        sa.Column(
            "dispute_cancel_sent_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="When Stripe accepted the cancellation a lost chargeback asked for.",
        ),
    )


def downgrade() -> None:
    op.drop_column("subscriptions", "dispute_cancel_sent_at")
