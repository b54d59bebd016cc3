"""Domain errors and the one RFC 9457 problem+json renderer."""

from __future__ import annotations

from typing import Any

import asyncpg  # type: ignore[import-untyped]
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

log = structlog.get_logger()

PROBLEM_JSON = "application/problem+json"


class Problem(BaseModel):
    """RFC 9457 problem details, with a machine-readable `code`."""

    type: str = Field(description="URI naming the problem type.")
    title: str
    status: int
    detail: str
    code: str = Field(description="Stable snake_case error code.")
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="Per-field validation errors (422 only)."
    )


class BillingError(Exception):
    """Base of every error the service answers deliberately."""

    status = 400
    code = "bad_request"
    title = "Bad request"
    headers: dict[str, str] | None = None

    def __init__(self, detail: str | None = None, *, headers: dict[str, str] | None = None):
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        if headers:
            self.headers = headers


class Unauthorized(BillingError):
    status, code, title = 401, "unauthorized", "Authentication required"
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(BillingError):
    status, code, title = 403, "forbidden", "Not allowed"


class NotFound(BillingError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(BillingError):
    status, code, title = 409, "conflict", "Conflict"


class Unprocessable(BillingError):
    status, code, title = 422, "validation_error", "Validation error"


class MaintenanceTooLong(Unprocessable):
    code, title = "maintenance_too_long", "Scheduled maintenance over the policy limit"


class MaintenanceAlreadyCompleted(Conflict):
    code, title = "maintenance_already_completed", "Maintenance window already completed"


class RateLimited(BillingError):
    status, code, title = 429, "rate_limited", "Too many requests"


class StripeUnavailable(BillingError):
    status, code, title = 502, "stripe_unavailable", "Stripe is unavailable"


class ServiceUnavailable(BillingError):
    status, code, title = 503, "service_unavailable", "Service unavailable"


# --- checkout, portal, balance --------------------------------------------------------------


class RedirectNotAllowed(Unprocessable):
    code, title = "redirect_not_allowed", "Redirect URL not allowed"


class CurrencyMismatch(Unprocessable):
    code, title = "currency_mismatch", "Currency differs from the account's currency"


class ChannelNotFound(NotFound):
    code, title = "channel_not_found", "Channel not found"


class CheckoutSessionNotFound(NotFound):
    code, title = "checkout_session_not_found", "Checkout session not found"


class SubscriptionExists(Conflict):
    code, title = "subscription_exists", "The channel already has a live subscription"


class NoDebt(Conflict):
    code, title = "no_debt", "The account has no debt to repay"


class DebtBelowMinimumCharge(Conflict):
    code, title = (
        "debt_below_minimum_charge",
        "The debt is below the smallest card payment Stripe accepts",
    )


class PortalUnavailable(Conflict):
    code, title = "portal_unavailable", "The Customer Portal opens after the first payment"


class IdempotencyKeyReused(Conflict):
    code, title = "idempotency_key_reused", "Idempotency-Key reused with another request body"


class IdempotencyKeyInUse(Conflict):
    code, title = "idempotency_key_in_use", "A request with this Idempotency-Key is in progress"


class UsageChargeConflict(Conflict):
    code, title = "usage_charge_conflict", "A usage charge with this id differs"


class ActivityConflict(Conflict):
    code, title = "activity_conflict", "An activity with this id differs"


# --- refunds and disputes ---


class RefundRequestNotFound(NotFound):
    code, title = "refund_request_not_found", "Refund request not found"


class RequestAlreadyDecided(Conflict):
    code, title = "request_already_decided", "The request already has a decision"


class RequestNotReady(Conflict):
    code, title = (
        "request_needs_information",
        "The request cannot be answered before it is identified",
    )


class RemedyNotApplicable(Unprocessable):
    code, title = "remedy_not_applicable", "The remedy does not apply to the request's payment"


class PaymentDisputed(Conflict):
    code, title = "payment_disputed", "The payment is under a chargeback and cannot be refunded"


class RefundExceedsLimit(Unprocessable):
    code, title = "refund_exceeds_limit", "The refund exceeds what may be refunded"


class RefundInProgress(Conflict):
    code, title = "refund_in_progress", "A refund for this request is already in progress"


class RefundNotFailed(Conflict):
    code, title = "refund_not_failed", "Only a refund Stripe reported failed can be retried"


class RequestNotClosable(Conflict):
    code, title = "request_not_closable", "The request cannot be closed in its current status"


def problem_response(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    body = Problem(
        type=f"https://billing.1msg.io/problems/{code}",
        title=title,
        status=status,
        detail=detail,
        code=code,
        errors=errors,
    )
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


_HTTP_CODES = {
    400: ("bad_request", "Bad request"),
    401: ("unauthorized", "Authentication required"),
    403: ("forbidden", "Not allowed"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    413: ("payload_too_large", "Request body too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
}


# SQLSTATE classes meaning "no usable connection": 08 connection exception, 57P operator
# intervention (shutdown, crash recovery, starting up).
_UNAVAILABLE_SQLSTATES = ("08", "57P")


# Postgres aborted the transaction to break a deadlock or a serialization failure: it was
# rolled back whole, and the same request sent again succeeds.
_LOCK_CONFLICT_SQLSTATES = frozenset({"40001", "40P01"})


# SQLSTATEs meaning "this input cannot be stored" (a value the request carried): string too long,
# numeric out of range, bad datetime, NUL or untranslatable characters.
_INPUT_DATA_SQLSTATES = frozenset({"22001", "22003", "22007", "22008", "22021", "22P05"})


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error: SQLAlchemy's (its driver's error, or the asyncpg
    error behind that) or asyncpg's own (statements run on the driver, app/db.py)."""
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    for candidate in (orig, getattr(orig, "__cause__", None)):
        sqlstate = getattr(candidate, "sqlstate", None)
        if isinstance(sqlstate, str):
            return sqlstate
    return None


def unstorable_input(exc: BaseException) -> bool:
    """True when the database refused a value the request carried (see _INPUT_DATA_SQLSTATES)."""
    return sqlstate_of(exc) in _INPUT_DATA_SQLSTATES


def database_unavailable(exc: BaseException) -> bool:
    """True when `exc` means the database cannot be reached right now (connection refused or
    lost, pool exhausted, server shutting down or starting), not that the request was wrong."""
    if isinstance(exc, OSError | TimeoutError | sa_exc.TimeoutError | asyncpg.InterfaceError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return (sqlstate_of(exc) or "").startswith(_UNAVAILABLE_SQLSTATES)
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated or isinstance(exc.orig, OSError | TimeoutError):
            return True
        sqlstate = sqlstate_of(exc)
        if sqlstate is not None and sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
            return True
        return isinstance(exc, sa_exc.InterfaceError)
    return False


def _jsonable_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": [str(part) for part in error.get("loc", ())], "msg": str(error.get("msg", ""))}
        for error in exc.errors()
    ]


def _caller_refusal(request: Request) -> JSONResponse | None:
    """401/403 when the route's guard refuses the caller: who may call a route is decided
    before whether the body is valid (service-contract.md: no token is 401, a token that may
    not act 403), also for a body FastAPI refuses before it runs the guard (not JSON)."""
    from app.auth import check_route_guard  # app.auth imports this module

    try:
        check_route_guard(request)
    except BillingError as exc:
        return problem_response(exc.status, exc.code, exc.title, exc.detail, headers=exc.headers)
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BillingError)
    async def _billing_error(_: Request, exc: BillingError) -> JSONResponse:
        if isinstance(exc, ServiceUnavailable):
            # our own words (not ready and why, the access feed busy): a probe shows no body.
            # 502s are logged by the Stripe gateway (their detail can quote Stripe's message).
            log.warning(
                "request.service_unavailable",
                status=exc.status,
                code=exc.code,
                detail=exc.detail,
            )
        return problem_response(exc.status, exc.code, exc.title, exc.detail, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        if (refusal := _caller_refusal(request)) is not None:
            return refusal
        errors = _jsonable_errors(exc)
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors)[:1000]
        return problem_response(
            422, "validation_error", "Validation error", detail or "Invalid request", errors=errors
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and (refusal := _caller_refusal(request)) is not None:
            return refusal  # a body FastAPI could not parse (before any dependency ran)
        code, title = _HTTP_CODES.get(exc.status_code, ("http_error", "HTTP error"))
        detail = exc.detail if isinstance(exc.detail, str) else title
        return problem_response(
            exc.status_code, code, title, detail, headers=dict(exc.headers or {}) or None
        )

    async def _infrastructure_error(_: Request, exc: Exception) -> JSONResponse:
        if unstorable_input(exc):
            log.info("request.unstorable_input", error_type=type(exc).__name__)
            return problem_response(
                422,
                "validation_error",
                "Validation error",
                "A value in the request cannot be stored (too long, out of range, or containing "
                "characters such as NUL)",
            )
        if sqlstate_of(exc) in _LOCK_CONFLICT_SQLSTATES:
            log.warning("request.lock_conflict", sqlstate=sqlstate_of(exc))
            return problem_response(
                503,
                ServiceUnavailable.code,
                ServiceUnavailable.title,
                "A concurrent change to the same records conflicted with this request; nothing "
                "was changed, retry",
                headers={"Retry-After": "1"},
            )
        if database_unavailable(exc):
            log.warning("request.database_unavailable", error_type=type(exc).__name__)
            return problem_response(
                503,
                ServiceUnavailable.code,
                ServiceUnavailable.title,
                "The database is unavailable; retry later",
                headers={"Retry-After": "5"},
            )
        log.exception("request.unhandled_error", error_type=type(exc).__name__)
        return problem_response(500, "internal_error", "Internal error", "Unexpected error")

    database = (sa_exc.SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError)
    for infrastructure in (OSError, TimeoutError, *database):
        app.add_exception_handler(infrastructure, _infrastructure_error)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request.unhandled_error", error_type=type(exc).__name__)
        return problem_response(500, "internal_error", "Internal error", "Unexpected error")


def error_responses(*errors: type[BillingError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the domain errors a route can return."""
    responses: dict[int | str, dict[str, Any]] = {}
    for error in errors:
        entry = responses.setdefault(
            error.status,
            {"model": Problem, "content": {PROBLEM_JSON: {}}, "description": ""},
        )
        entry["description"] = (entry["description"] + " / " if entry["description"] else "") + (
            f"{error.title} (`{error.code}`)"
        )
    return responses
