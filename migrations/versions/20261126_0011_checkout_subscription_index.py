"""index checkout sessions by their Stripe subscription

The event processor fulfils a subscription's checkout sessions by the subscription's id
(app/webhooks/handlers.py `FULFIL_SUBSCRIPTION_CHECKOUTS`); without an index each batch read
every checkout session.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-26 19:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column(
        "checkout_sessions",
        "stripe_subscription_id",
        comment="Found by it when a subscription event fulfils it.",
        existing_comment=None,
    )
    op.create_index(
        "ix_checkout_sessions_stripe_subscription_id",
        "checkout_sessions",
        ["stripe_subscription_id"],
    )


def downgrade() -> None:
    op.drop_index("ix_checkout_sessions_stripe_subscription_id", table_name="checkout_sessions")
    op.alter_column(
        "checkout_sessions",
        "stripe_subscription_id",
        comment=None,
        existing_comment="Found by it when a subscription event fulfils it.",
    )
