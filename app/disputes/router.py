"""Finance view of chargebacks."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import StringConstraints

from app.accounts.params import AccountFilter, BlankIsNone
from app.auth import FinanceStaff
from app.db import SessionDep
from app.disputes import service
from app.disputes.schemas import DisputeOut
from app.errors import Forbidden, Unauthorized, error_responses

router = APIRouter(tags=["disputes"])


@router.get(
    "/v1/finance/disputes",
    summary="Chargebacks and what they changed (balance, access)",
    response_model=list[DisputeOut],
    responses=error_responses(Unauthorized, Forbidden),
)
async def list_disputes(
    session: SessionDep,
    _: FinanceStaff,
    account_id: AccountFilter = None,
    status: Annotated[Annotated[str, StringConstraints(max_length=32)] | None, BlankIsNone] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> list[DisputeOut]:
    return await service.list_disputes(
        session, account_id=account_id, status=status, limit=limit, offset=offset
    )
