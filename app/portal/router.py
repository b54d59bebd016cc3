"""Stripe Customer Portal sessions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.accounts.params import AccountId, IdempotencyKeyHeader
from app.auth import AccountWriter
from app.db import SessionDep
from app.errors import (
    Forbidden,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    PortalUnavailable,
    RateLimited,
    RedirectNotAllowed,
    StripeUnavailable,
    Unauthorized,
    Unprocessable,
    error_responses,
)
from app.idempotency import Outcome, idempotent
from app.portal import service
from app.portal.schemas import PortalSessionIn, PortalSessionOut

router = APIRouter(tags=["portal"])


@router.post(
    "/v1/accounts/{account_id}/portal-sessions",
    summary="Create a Stripe Customer Portal session",
    status_code=201,
    response_model=PortalSessionOut,
    responses=error_responses(
        Unauthorized,
        Forbidden,
        PortalUnavailable,
        IdempotencyKeyReused,
        IdempotencyKeyInUse,
        Unprocessable,
        RedirectNotAllowed,
        RateLimited,
        StripeUnavailable,
    ),
)
async def create_portal_session(
    account_id: AccountId,
    body: PortalSessionIn,
    request: Request,
    session: SessionDep,
    principal: AccountWriter,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    state = request.app.state

    async def run() -> Outcome:
        out = await service.create_portal_session(
            session,
            state.session_factory,
            state.stripe,
            state.settings,
            principal,
            account_id,
            body,
        )
        return Outcome(201, out)

    return await idempotent(request, session, principal, account_id, idempotency_key, body, run)
