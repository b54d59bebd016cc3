"""Stripe Checkout sessions (subscription, top-up, debt repayment)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Request
from fastapi.responses import Response

from app.accounts.params import AccountId, IdempotencyKeyHeader
from app.auth import AccountReader, AccountWriter
from app.checkout import service
from app.checkout.schemas import CheckoutIn, CheckoutOut
from app.errors import (
    ChannelNotFound,
    CheckoutSessionNotFound,
    CurrencyMismatch,
    DebtBelowMinimumCharge,
    Forbidden,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    NoDebt,
    RateLimited,
    RedirectNotAllowed,
    StripeUnavailable,
    SubscriptionExists,
    Unauthorized,
    Unprocessable,
    error_responses,
)
from app.idempotency import Claim, Outcome, idempotent_claiming_in

router = APIRouter(tags=["checkout"])


@router.post(
    "/v1/accounts/{account_id}/checkout-sessions",
    summary="Create a Stripe Checkout session (subscription, top-up or debt repayment)",
    status_code=201,
    response_model=CheckoutOut,
    responses=error_responses(
        Unauthorized,
        Forbidden,
        ChannelNotFound,
        SubscriptionExists,
        NoDebt,
        DebtBelowMinimumCharge,
        IdempotencyKeyReused,
        IdempotencyKeyInUse,
        Unprocessable,
        RedirectNotAllowed,
        CurrencyMismatch,
        RateLimited,
        StripeUnavailable,
    ),
)
async def create_checkout_session(
    account_id: AccountId,
    body: Annotated[CheckoutIn, Body()],
    request: Request,
    principal: AccountWriter,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    state = request.app.state

    async def run(claim: Claim) -> Outcome:
        out = await service.create_checkout_session(
            state.session_factory,
            state.engine,
            state.stripe,
            state.settings,
            principal,
            account_id,
            body,
            claim,
        )
        return Outcome(201, out)

    return await idempotent_claiming_in(request, principal, account_id, idempotency_key, body, run)


@router.get(
    "/v1/accounts/{account_id}/checkout-sessions/{session_id}",
    summary="A checkout session's status, synced from Stripe until a payment event fulfils it",
    response_model=CheckoutOut,
    responses=error_responses(Unauthorized, Forbidden, CheckoutSessionNotFound),
)
async def get_checkout_session(
    account_id: AccountId,
    session_id: Annotated[
        str,
        Path(
            max_length=255,
            description="Our checkout session id, or Stripe's (`cs_...`, the `session_id` the "
            "success URL brings back).",
        ),
    ],
    request: Request,
    _: AccountReader,
) -> CheckoutOut:
    # No request session: no connection is held while Stripe is asked (the service's docstring).
    state = request.app.state
    return await service.get_checkout_session(
        state.session_factory, state.stripe, state.stripe_reads, account_id, session_id
    )
