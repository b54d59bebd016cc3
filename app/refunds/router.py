"""Refund eligibility, refund and appeal requests, and the finance workflow."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from app.accounts.params import AccountFilter, AccountId, BlankIsNone, IdempotencyKeyHeader
from app.auth import AccountOwner, AccountReader, FinanceStaff, Principal, account_access
from app.db import SessionDep
from app.errors import (
    CurrencyMismatch,
    Forbidden,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    PaymentDisputed,
    RefundExceedsLimit,
    RefundInProgress,
    RefundNotFailed,
    RefundRequestNotFound,
    RemedyNotApplicable,
    RequestAlreadyDecided,
    RequestNotClosable,
    RequestNotReady,
    StripeUnavailable,
    Unauthorized,
    Unprocessable,
    error_responses,
)
from app.idempotency import Outcome, idempotent
from app.refunds import service
from app.refunds.schemas import (
    FinanceRefundRequestCreate,
    FinanceRefundRequestOut,
    RefundEligibility,
    RefundRequestCreate,
    RefundRequestOut,
    RefundRequestUpdate,
    RefundRetryCreate,
    RequestClose,
    RequestStatus,
    ResponseCreate,
)
from app.stripe_gateway import StripeRequestRejected

router = APIRouter(tags=["refunds"])

# The client, or finance adding the details a client gave by email or phone (policy section 4).
AccountOwnerOrFinance = Annotated[Principal, Depends(account_access("finance"))]

ACCOUNT = "/v1/accounts/{account_id}"


@router.get(
    f"{ACCOUNT}/refund-eligibility",
    summary="Zero-usage refund quotes, one per subscription payment",
    response_model=RefundEligibility,
    responses=error_responses(Unauthorized, Forbidden),
)
async def refund_eligibility(
    account_id: AccountId, request: Request, _: AccountReader
) -> RefundEligibility:
    state = request.app.state  # the reader as an attribute, not one more dependency to solve
    return await service.refund_eligibility(
        state.reader, account_id, state.settings, service.utcnow()
    )


@router.post(
    f"{ACCOUNT}/refund-requests",
    summary="File a refund, appeal, compensation or other billing request",
    status_code=201,
    response_model=RefundRequestOut,
    responses=error_responses(
        Unauthorized, Forbidden, Unprocessable, IdempotencyKeyReused, IdempotencyKeyInUse
    ),
)
async def create_refund_request(
    account_id: AccountId,
    body: RefundRequestCreate,
    request: Request,
    session: SessionDep,
    principal: AccountOwner,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    async def run() -> Outcome:
        out = await service.create_request(
            session,
            account_id=account_id,
            body=body,
            principal=principal,
            settings=request.app.state.settings,
            channel="api",
            received_at=service.utcnow(),
        )
        return Outcome(201, out)

    return await idempotent(request, session, principal, account_id, idempotency_key, body, run)


@router.get(
    f"{ACCOUNT}/refund-requests",
    summary="The account's requests with every reply",
    response_model=list[RefundRequestOut],
    responses=error_responses(Unauthorized, Forbidden),
)
async def list_refund_requests(
    account_id: AccountId, session: SessionDep, _: AccountReader
) -> list[RefundRequestOut]:
    return await service.list_requests(session, account_id=account_id)


@router.get(
    f"{ACCOUNT}/refund-requests/{{request_id}}",
    summary="One request with every reply",
    response_model=RefundRequestOut,
    responses=error_responses(Unauthorized, Forbidden, RefundRequestNotFound),
)
async def get_refund_request(
    account_id: AccountId, request_id: uuid.UUID, session: SessionDep, _: AccountReader
) -> RefundRequestOut:
    return await service.get_request(session, account_id=account_id, request_id=request_id)


@router.patch(
    f"{ACCOUNT}/refund-requests/{{request_id}}",
    summary="Add the missing details of a request",
    description="The account's own token, or finance (scope `finance`) recording the details "
    "a client gave by email or phone.",
    response_model=RefundRequestOut,
    responses=error_responses(
        Unauthorized, Forbidden, RefundRequestNotFound, RequestAlreadyDecided, Unprocessable
    ),
)
async def update_refund_request(
    account_id: AccountId,
    request_id: uuid.UUID,
    body: RefundRequestUpdate,
    request: Request,
    session: SessionDep,
    principal: AccountOwnerOrFinance,
) -> RefundRequestOut:
    return await service.update_request(
        session,
        account_id=account_id,
        request_id=request_id,
        body=body,
        principal=principal,
        settings=request.app.state.settings,
        now=service.utcnow(),
    )


@router.post(
    "/v1/finance/refund-requests",
    summary="File a request that arrived by email or phone, with its true receipt time",
    status_code=201,
    response_model=RefundRequestOut,
    responses=error_responses(
        Unauthorized, Forbidden, Unprocessable, IdempotencyKeyReused, IdempotencyKeyInUse
    ),
)
async def file_refund_request(
    body: FinanceRefundRequestCreate,
    request: Request,
    session: SessionDep,
    principal: FinanceStaff,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    if body.received_at > service.utcnow():
        raise Unprocessable("received_at cannot be in the future")
    fields = body.model_dump(exclude={"account_id", "received_at", "channel"})

    async def run() -> Outcome:
        out = await service.create_request(
            session,
            account_id=body.account_id,
            body=RefundRequestCreate(**fields),
            principal=principal,
            settings=request.app.state.settings,
            channel=body.channel,
            received_at=body.received_at,
        )
        return Outcome(201, out)

    # A route of no account: the key is the finance user's (sub, method, path, key).
    return await idempotent(request, session, principal, "", idempotency_key, body, run)


@router.get(
    "/v1/finance/refund-requests",
    summary="Requests for finance, filtered by status, account or overdue",
    response_model=list[FinanceRefundRequestOut],
    responses=error_responses(Unauthorized, Forbidden),
)
async def finance_list_refund_requests(
    session: SessionDep,
    _: FinanceStaff,
    status: Annotated[RequestStatus | None, BlankIsNone] = None,
    overdue: bool = False,
    account_id: AccountFilter = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> list[FinanceRefundRequestOut]:
    return await service.finance_list(
        session,
        status=status,
        overdue=overdue,
        account_id=account_id,
        limit=limit,
        offset=offset,
        now=service.utcnow(),
    )


@router.get(
    "/v1/finance/refund-requests/{request_id}",
    summary="One request with its replies and audit trail",
    response_model=FinanceRefundRequestOut,
    responses=error_responses(Unauthorized, Forbidden, RefundRequestNotFound),
)
async def finance_get_refund_request(
    request_id: uuid.UUID, session: SessionDep, _: FinanceStaff
) -> FinanceRefundRequestOut:
    return await service.finance_get(session, request_id=request_id, now=service.utcnow())


@router.post(
    "/v1/finance/refund-requests/{request_id}/responses",
    summary="Reply to a request: initial, interim (with the next step's date) or decision",
    status_code=201,
    response_model=FinanceRefundRequestOut,
    responses=error_responses(
        Unauthorized,
        Forbidden,
        RefundRequestNotFound,
        RequestAlreadyDecided,
        RequestNotReady,
        PaymentDisputed,
        RefundInProgress,
        RefundExceedsLimit,
        CurrencyMismatch,
        RemedyNotApplicable,
        StripeUnavailable,
        StripeRequestRejected,
        IdempotencyKeyReused,
        IdempotencyKeyInUse,
    ),
)
async def respond_to_refund_request(
    request_id: uuid.UUID,
    body: ResponseCreate,
    request: Request,
    session: SessionDep,
    principal: FinanceStaff,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    async def run() -> Outcome:
        # The reply runs in sessions of its own (a refund approval commits in steps around
        # the Stripe call); the request's session only stores the answer under the key.
        out = await service.respond(
            request.app.state.session_factory,
            request.app.state.stripe,
            request.app.state.settings,
            request_id=request_id,
            body=body,
            principal=principal,
        )
        return Outcome(201, out)

    # A reply sent again with its key (a lost answer, a double click) replays the first:
    # one reply, one email. The key is the finance user's (sub, method, path, key).
    return await idempotent(request, session, principal, "", idempotency_key, body, run)


@router.post(
    "/v1/finance/refund-requests/{request_id}/refund-attempts",
    summary="Retry a refund Stripe reported failed (a new attempt with its own idempotency key)",
    description="Only for a request in `refund_failed`: the decided amount is executed again "
    "through Stripe as a new attempt (`refund.attempt`), still at most what was paid less what "
    "is already refunded; the request is `refund_pending` until Stripe's refund event. One "
    "decision never has two live or successful refunds. 409 `refund_not_failed` for any other "
    "status.",
    status_code=201,
    response_model=FinanceRefundRequestOut,
    responses=error_responses(
        Unauthorized,
        Forbidden,
        RefundRequestNotFound,
        RefundNotFailed,
        RefundInProgress,
        PaymentDisputed,
        RefundExceedsLimit,
        StripeUnavailable,
        StripeRequestRejected,
    ),
)
async def retry_refund(
    request_id: uuid.UUID, body: RefundRetryCreate, request: Request, principal: FinanceStaff
) -> FinanceRefundRequestOut:
    # No request session: like an approval, a retry commits in steps around the Stripe call.
    return await service.retry_refund(
        request.app.state.session_factory,
        request.app.state.stripe,
        request_id=request_id,
        body=body,
        principal=principal,
    )


@router.post(
    "/v1/finance/refund-requests/{request_id}/close",
    summary="Close a request with nothing left to do, with a closing reply to the client",
    description="Closable while open (withdrawn, duplicate, details never came) or after the "
    "final reply (`approved`, `rejected`, `refunded`, `refund_failed` settled otherwise). "
    "409 `request_not_closable` while a refund is on its way (`refund_pending`) or when "
    "already `closed`.",
    response_model=FinanceRefundRequestOut,
    responses=error_responses(Unauthorized, Forbidden, RefundRequestNotFound, RequestNotClosable),
)
async def close_refund_request(
    request_id: uuid.UUID, body: RequestClose, session: SessionDep, principal: FinanceStaff
) -> FinanceRefundRequestOut:
    return await service.close_request(
        session, request_id=request_id, body=body, principal=principal, now=service.utcnow()
    )
