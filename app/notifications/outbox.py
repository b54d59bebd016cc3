"""Queue an email in the caller's transaction; the delivery worker sends it after commit."""

from __future__ import annotations

from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import OutboxEmail


async def enqueue_email(
    session: AsyncSession, *, dedupe_key: str, to: str, subject: str, body: str
) -> bool:
    """Queue one email unless `dedupe_key` was queued before; True when newly queued."""
    statement = (
        insert(OutboxEmail)
        .values(dedupe_key=dedupe_key, to_address=to, subject=subject, body=body)
        .on_conflict_do_nothing(index_elements=[OutboxEmail.dedupe_key])
        .returning(OutboxEmail.id)
    )
    return (await session.execute(statement)).scalar_one_or_none() is not None
