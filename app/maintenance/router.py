"""Operations: maintenance windows (scope `ops`)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import JSONResponse

from app.accounts.params import IdempotencyKeyHeader
from app.auth import OpsStaff
from app.db import SessionDep
from app.errors import (
    Forbidden,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    MaintenanceAlreadyCompleted,
    MaintenanceTooLong,
    Unauthorized,
    Unprocessable,
    error_responses,
)
from app.idempotency import Outcome, idempotent
from app.maintenance import service
from app.maintenance.schemas import (
    MaintenanceWindowComplete,
    MaintenanceWindowCreate,
    MaintenanceWindowList,
    MaintenanceWindowOut,
)

router = APIRouter(prefix="/v1/ops/maintenance-windows", tags=["operations"])
AUTH_ERRORS = (Unauthorized, Forbidden)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Record a maintenance window",
    response_model=MaintenanceWindowOut,
    responses=error_responses(
        *AUTH_ERRORS, MaintenanceTooLong, IdempotencyKeyReused, IdempotencyKeyInUse
    ),
)
async def create_maintenance_window(
    body: MaintenanceWindowCreate,
    request: Request,
    session: SessionDep,
    principal: OpsStaff,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    """A retried POST with the same `Idempotency-Key` replays the window it created instead of
    recording a second one (whose completion would email its clients a second time)."""

    async def run() -> Outcome:
        settings = request.app.state.settings
        return Outcome(201, await service.create_window(session, settings, body, principal.sub))

    # A route of no account: the key is the ops user's (sub, method, path, key).
    return await idempotent(request, session, principal, "", idempotency_key, body, run)


@router.get(
    "",
    summary="List maintenance windows",
    response_model=MaintenanceWindowList,
    responses=error_responses(*AUTH_ERRORS),
)
async def list_maintenance_windows(
    session: SessionDep,
    _: OpsStaff,
    limit: int = Query(100, ge=1, le=500, description="At most this many, newest first."),
) -> MaintenanceWindowList:
    return await service.list_windows(session, limit)


@router.get(
    "/{window_id}",
    summary="Show a maintenance window",
    response_model=MaintenanceWindowOut,
    responses=error_responses(*AUTH_ERRORS, service.MaintenanceWindowNotFound),
)
async def get_maintenance_window(
    window_id: uuid.UUID, session: SessionDep, _: OpsStaff
) -> MaintenanceWindowOut:
    return await service.get_window(session, window_id)


@router.post(
    "/{window_id}/complete",
    summary="Complete a maintenance window: extend access, notify clients, update Stripe",
    description="Idempotent: repeating it with the same `ended_at` changes nothing and retries "
    "Stripe updates still pending. Runs its own transactions (Stripe is called between them).",
    response_model=MaintenanceWindowOut,
    responses=error_responses(
        *AUTH_ERRORS,
        service.MaintenanceWindowNotFound,
        MaintenanceAlreadyCompleted,
        Unprocessable,
    ),
)
async def complete_maintenance_window(
    window_id: uuid.UUID, body: MaintenanceWindowComplete, request: Request, principal: OpsStaff
) -> MaintenanceWindowOut:
    return await service.complete_window(
        request.app.state.session_factory,
        request.app.state.stripe,
        request.app.state.settings,
        window_id,
        body,
        principal.sub,
    )
