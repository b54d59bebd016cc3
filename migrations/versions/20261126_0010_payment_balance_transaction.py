"""the payment's balance transaction, for fees looked up after its events are applied

- `payments.stripe_balance_transaction_id`: the charge's balance transaction, as its events
  name it. The fee is no longer fetched from Stripe inside the transaction that applies the
  events: app/webhooks/fees.py looks it up afterwards and fills `payments.fee`.
- `ix_payments_fee_unsettled`: the payments whose fee is still to be looked up.

Payments stored before this revision whose fee is still unknown get their balance
transaction from the charge's next event.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-26 18:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNSETTLED = sa.text("fee IS NULL AND stripe_balance_transaction_id IS NOT NULL")


def upgrade() -> None:
    op.add_column(
        "payments",
        sa.Column(
            "stripe_balance_transaction_id",
            sa.String(length=255),
            nullable=True,
            comment="The charge's balance transaction, where its fee is read.",
        ),
    )
    op.create_index(
        "ix_payments_fee_unsettled", "payments", ["id"], postgresql_where=UNSETTLED
    )


def downgrade() -> None:
    op.drop_index("ix_payments_fee_unsettled", table_name="payments", postgresql_where=UNSETTLED)
    op.drop_column("payments", "stripe_balance_transaction_id")
