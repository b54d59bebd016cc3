"""checkout sessions: the request that made each one

A client retrying a checkout with the same Idempotency-Key after a 502 (Stripe failed, or its
answer was lost after it made the session) reuses the row its first attempt left, hence the
same Stripe idempotency key, so Stripe replays the session it made instead of making a second
one (app/checkout/service.py). The row is found by this digest of the request.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-26 23:12:41
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "checkout_sessions",
        sa.Column(
            "request_digest",
            sa.String(length=64),
            nullable=True,
            comment="The request that made it (its Idempotency-Key scope and body); a retry of "
            "that request after Stripe failed reuses the row, hence its Stripe idempotency key.",
        ),
    )
    op.create_index(
        op.f("ix_checkout_sessions_request_digest"),
        "checkout_sessions",
        ["request_digest"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_checkout_sessions_request_digest"), table_name="checkout_sessions")
    op.drop_column("checkout_sessions", "request_digest")
