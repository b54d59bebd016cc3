"""dispute payment intent index

disputes.stripe_payment_intent_id is how the webhook consumer finds a payment's disputes (with
stripe_charge_id, already indexed); without an index each look-up scanned the table.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26 09:20:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_disputes_stripe_payment_intent_id"),
        "disputes",
        ["stripe_payment_intent_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_disputes_stripe_payment_intent_id"), table_name="disputes")
