"""Balance, ledger, usage charges and activity reports."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from app.accounts.params import AccountId, IdempotencyKeyHeader
from app.auth import AccountReader, UsageWriter
from app.balance import service
from app.balance.schemas import (
    ActivityIn,
    ActivityOut,
    BalanceOut,
    LedgerEntryOut,
    LedgerPage,
    UsageChargeIn,
    UsageChargeOut,
)
from app.config import Settings
from app.db import BIGINT_MAX, SessionDep
from app.errors import (
    ActivityConflict,
    CurrencyMismatch,
    Forbidden,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    Unauthorized,
    Unprocessable,
    UsageChargeConflict,
    error_responses,
)
from app.idempotency import Outcome, idempotent

router = APIRouter(tags=["balance"])


@router.get(
    "/v1/accounts/{account_id}/balance",
    summary="Prepaid balance and debt",
    response_model=BalanceOut,
    responses=error_responses(Unauthorized, Forbidden),
)
async def get_balance(
    account_id: AccountId, request: Request, session: SessionDep, _: AccountReader
) -> BalanceOut:
    settings: Settings = request.app.state.settings
    result = await service.get_balance(session, settings, account_id)
    return BalanceOut(balance=result.balance, debt=result.debt, currency=result.currency)


@router.get(
    "/v1/accounts/{account_id}/ledger",
    summary="Ledger entries behind the balance, newest first",
    response_model=LedgerPage,
    responses=error_responses(Unauthorized, Forbidden),
)
async def get_ledger(
    account_id: AccountId,
    session: SessionDep,
    _: AccountReader,
    cursor: Annotated[
        int | None, Query(ge=1, le=BIGINT_MAX, description="`next_cursor` of the page before.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> LedgerPage:
    rows, next_cursor = await service.list_ledger(session, account_id, before=cursor, limit=limit)
    return LedgerPage(
        data=[LedgerEntryOut.model_validate(row, from_attributes=True) for row in rows],
        next_cursor=next_cursor,
    )


@router.post(
    "/v1/accounts/{account_id}/usage-charges",
    summary="Debit a usage charge (idempotent by id)",
    status_code=201,
    response_model=UsageChargeOut,
    responses={
        200: {"model": UsageChargeOut, "description": "A replay: the charge already recorded."},
        **error_responses(
            Unauthorized,
            Forbidden,
            CurrencyMismatch,
            Unprocessable,
            UsageChargeConflict,
            IdempotencyKeyReused,
            IdempotencyKeyInUse,
        ),
    },
)
async def create_usage_charge(
    account_id: AccountId,
    body: UsageChargeIn,
    request: Request,
    session: SessionDep,
    principal: UsageWriter,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    settings: Settings = request.app.state.settings

    async def run() -> Outcome:
        entry, created = await service.record_usage_charge(
            session,
            settings,
            account_id,
            charge_id=body.id,
            kind=body.kind,
            amount=body.amount,
            currency=body.currency,
            occurred_at=body.occurred_at,
        )
        balance, debt, _ = await service.account_balance(session, account_id)
        out = UsageChargeOut(
            id=entry.source_id,
            amount=-entry.amount,
            currency=entry.currency,
            kind=entry.kind,
            occurred_at=entry.occurred_at,
            ledger_entry_id=entry.id,
            balance=balance,
            debt=debt,
        )
        return Outcome(201 if created else 200, out)

    return await idempotent(request, session, principal, account_id, idempotency_key, body, run)


@router.post(
    "/v1/accounts/{account_id}/activity",
    summary="Report product activity (idempotent by id)",
    status_code=201,
    response_model=ActivityOut,
    responses={
        200: {"model": ActivityOut, "description": "A replay: the activity already recorded."},
        **error_responses(
            Unauthorized, Forbidden, ActivityConflict, IdempotencyKeyReused, IdempotencyKeyInUse
        ),
    },
)
async def create_activity(
    account_id: AccountId,
    body: ActivityIn,
    request: Request,
    session: SessionDep,
    principal: UsageWriter,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    async def run() -> Outcome:
        activity, created = await service.record_activity(
            session,
            account_id,
            activity_id=body.id,
            kind=body.kind,
            occurred_at=body.occurred_at,
        )
        out = ActivityOut(
            id=activity.external_id,
            kind=activity.kind,
            occurred_at=activity.occurred_at,
            recorded_at=activity.created_at,
        )
        return Outcome(201 if created else 200, out)

    return await idempotent(request, session, principal, account_id, idempotency_key, body, run)
