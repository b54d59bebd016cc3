"""accounts.currency: also set by the first usage charge

The first usage charge of an unbound account now writes its currency into the account row
(app/balance/service.py `record_usage_charge`), so an event transaction whose snapshot predates
it fails to serialize instead of binding another currency. Only the column's comment changes.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-26 23:58:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column(
        "accounts",
        "currency",
        existing_type=sa.String(length=3),
        existing_nullable=True,
        comment="Set by the first payment or usage charge; afterwards all money must match.",
        existing_comment="Set by the first payment; afterwards every payment must match.",
    )


def downgrade() -> None:
    op.alter_column(
        "accounts",
        "currency",
        existing_type=sa.String(length=3),
        existing_nullable=True,
        comment="Set by the first payment; afterwards every payment must match.",
        existing_comment="Set by the first payment or usage charge; afterwards all money must match.",
    )
