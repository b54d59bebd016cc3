"""outbox_emails.refusals: the attempts the relay refused, which alone lead to parking

`attempts` counts every try, also those that found the relay unreachable (they set the
backoff); EMAIL_MAX_ATTEMPTS is compared with the refusals of the message only, so an email
that waited out a long relay outage is not parked at its first refusal afterwards.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-27 06:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | Sequence[str] | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "outbox_emails",
        sa.Column(
            "refusals",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="Attempts the relay refused (an unreachable relay is not one); "
            "parked as failed at EMAIL_MAX_ATTEMPTS.",
        ),
    )


def downgrade() -> None:
    op.drop_column("outbox_emails", "refusals")
