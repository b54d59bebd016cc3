"""refund_executions.cancel_subscription_id: the subscription an approved refund ended, to be
cancelled at Stripe after the refund's events are applied (not inside their transaction)

A Stripe outage used to fail the refund's events with the cancellation: the request stayed
`refund_pending` and the refunded channel kept its access until Stripe answered, or for good
once the events were parked. Now the events end the access and record the subscription here;
the event processor's follow-ups send the cancellation (`subscription_cancelled_at` once
Stripe accepts it).

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-27 08:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | Sequence[str] | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "refund_executions",
        sa.Column(
            "cancel_subscription_id",
            sa.String(length=255),
            nullable=True,
            comment="The Stripe subscription this refund ended, to be cancelled at Stripe "
            "(sent when subscription_cancelled_at is set).",
        ),
    )
    op.create_index(
        "ix_refund_executions_cancel_unsent",
        "refund_executions",
        ["id"],
        postgresql_where=sa.text(
            "cancel_subscription_id IS NOT NULL AND subscription_cancelled_at IS NULL"
        ),
    )


def downgrade() -> None:
    op.drop_index("ix_refund_executions_cancel_unsent", table_name="refund_executions")
    op.drop_column("refund_executions", "cancel_subscription_id")
