"""Migrations: upgrade to head, no drift between models and migrations, downgrade to base."""

from __future__ import annotations

import os
import secrets

import asyncpg

from tests.conftest import alembic, create_database, drop_database, plain_dsn


async def test_upgrade_check_downgrade_upgrade_round_trip() -> None:
    name = f"billing_test_migrations_{os.getpid()}_{secrets.token_hex(3)}"
    url = await create_database(name)
    try:
        upgraded = alembic(url, "upgrade", "head")
        assert upgraded.returncode == 0, upgraded.stderr
        check = alembic(url, "check")
        assert check.returncode == 0, check.stdout + check.stderr
        assert "No new upgrade operations detected" in check.stdout + check.stderr

        downgraded = alembic(url, "downgrade", "base")
        assert downgraded.returncode == 0, downgraded.stderr
        conn = await asyncpg.connect(plain_dsn(url))
        try:
            tables = await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                " AND tablename <> 'alembic_version'"
            )
        finally:
            await conn.close()
        assert tables == []

        again = alembic(url, "upgrade", "head")
        assert again.returncode == 0, again.stderr
    finally:
        await drop_database(name)


async def test_the_concurrent_index_migration_completes_when_run_again_after_a_cut_short_run() -> (
    None
):
    """0016 builds its indexes CONCURRENTLY, outside a transaction: a run cut short (a killed
    job, a failed build) leaves some behind without recording the revision. Running it again
    must complete it, not stop at the first index that already exists."""
    name = f"billing_test_migrations_{os.getpid()}_{secrets.token_hex(3)}"
    url = await create_database(name)
    try:
        assert alembic(url, "upgrade", "0015").returncode == 0
        conn = await asyncpg.connect(plain_dsn(url))
        try:  # what the cut-short run had built
            await conn.execute(
                "CREATE INDEX ix_outbox_emails_sending ON outbox_emails (claimed_at)"
                " WHERE status = 'sending'"
            )
        finally:
            await conn.close()
        upgraded = alembic(url, "upgrade", "head")
        assert upgraded.returncode == 0, upgraded.stderr
        check = alembic(url, "check")
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        await drop_database(name)
