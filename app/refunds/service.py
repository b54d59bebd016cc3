"""Refund eligibility, refund and appeal requests, and the finance workflow (policy 3 and 4).

Requests: a request is *about a payment* when its type is `refund` or it names any payment
detail. Such a request is matched to one of the account's payments by `payment_reference` (our
payment id, or a Stripe payment intent, charge, invoice or checkout session id) or else by
`payment_date` + `amount` + `currency` (exactly one payment that day, in BUSINESS_TIMEZONE, or
exactly one of them that succeeded).
Until it matches it is `needs_information` with `missing_information`, and its clock has not
started; a PATCH that makes it match starts the clock at that moment, and so does the arrival
of its payment through Stripe's events (`identify_waiting_requests`; from receipt when the
payment was made at Stripe before the request arrived). Other requests (an access
suspension, say) start their clock at receipt. Due dates are business days in the configured
calendar after the clock start.

Statuses: needs_information -> received -> acknowledged (initial reply) -> in_review (interim
reply) -> approved | rejected | refund_pending -> refunded | refund_failed. From
refund_failed finance may retry the refund (-> refund_pending, a new attempt; see
`retry_refund`). `closed` ends a request with nothing left to do: finance closes it
(`close_request`: withdrawn by the client, resolved after the final reply or by other means, a
duplicate, or details that never came), or a chargeback on its payment closes it while it is
still open (a disputed payment is never also refunded), also one filed or identified after the
chargeback's events (`_close_if_under_chargeback`). A closed request is never overdue.

Refunds run through Stripe exactly once per attempt: the approval first commits a `pending`
RefundExecution (attempt 1) in its own transaction, then calls Stripe with
`billing:refund:<execution id>` as idempotency key and the execution id in the refund's
metadata, then records the decision. A retry, a double click or a crash between the steps
reuses the same row and key, so Stripe creates one refund. A chargeback that closes the
request while its attempt is still `pending` ends that path: repeating the approval then
releases the attempt if Stripe has no refund for it (`_release_unsent_refund`). `refund_pending` lasts until
Stripe's refund event arrives (app/refunds/events.py). When Stripe reports the refund failed,
finance may retry it: a new attempt row (new id, so a new key) for the decided amount, bounded
again by what was paid less what is already refunded; the database allows one attempt that is
not `failed` per request, so one decision never has two live or successful refunds.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import structlog
from sqlalchemy import Row
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.accounts.service import (
    effective_currency,
    ensure_account,
    ledger_entries_in_account_currency,
)
from app.auth import Principal
from app.balance.service import account_balance
from app.config import Settings
from app.db import Reader
from app.errors import (
    CurrencyMismatch,
    PaymentDisputed,
    RefundExceedsLimit,
    RefundInProgress,
    RefundNotFailed,
    RefundRequestNotFound,
    RemedyNotApplicable,
    RequestAlreadyDecided,
    RequestNotClosable,
    RequestNotReady,
    Unprocessable,
)
from app.models import (
    Payment,
    RefundExecution,
    RefundRequest,
    RefundRequestAudit,
    RefundRequestResponse,
)
from app.notifications.outbox import enqueue_email, format_amount
from app.refunds import repository as repo
from app.refunds.eligibility import PaymentFacts, quote
from app.refunds.schemas import (
    AuditOut,
    FinanceRefundRequestOut,
    RefundEligibility,
    RefundOut,
    RefundQuote,
    RefundRequestCreate,
    RefundRequestOut,
    RefundRequestUpdate,
    RefundRetryCreate,
    RequestClose,
    ResponseCreate,
    ResponseOut,
)
from app.stripe_gateway import StripeGateway, StripeRequestRejected, idempotency_key
from app.subscriptions.access import subscription_access
from app.subscriptions.service import record_access_change
from app.webhooks.fees import amount_step

log = structlog.get_logger()

OPEN_STATUSES = repo.OPEN_STATUSES
PAYMENT_FIELDS = repo.PAYMENT_FIELDS
ENDED = ("canceled", "incomplete_expired")  # Stripe's subscription statuses of no return


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- eligibility ---------------------------------------------------------------------------


async def refund_eligibility(
    reader: Reader, account_id: str, settings: Settings, now: datetime
) -> RefundEligibility:
    """One quote per subscription payment; the facts come from one statement
    (`repo.ELIGIBILITY_FACTS`, shared with the quotes asked at the same moment), the rules
    from `app/refunds/eligibility.py`."""
    rows = await reader.by_key(repo.ELIGIBILITY_FACTS, account_id)
    period_ends = _paid_period_ends(rows)
    quotes = []
    for row in rows:
        facts = PaymentFacts(
            payment_id=row.id,
            amount_paid=row.amount,
            currency=row.currency,
            status=row.status,
            processing_fee=row.fee,
            already_refunded=repo.refunded_total(
                row.amount_refunded,
                int(row.failed_refunds),
                int(row.mirrored_refunds),
                int(row.unmirrored_refunds),
            ),
            disputed=row.disputed,
            period_end=period_ends.get(row.id),
        )
        result = quote(
            facts,
            usage_detected=row.usage_detected,
            setup_fees=settings.waba_setup_fees,
            now=now,
        )
        quotes.append(RefundQuote.model_validate(result, from_attributes=True))
    return RefundEligibility(quotes=quotes)


def _paid_period_ends(payments: Sequence[Row[Any]]) -> dict[uuid.UUID, datetime | None]:
    """When each payment's paid period ends. Stripe's invoice `period_*` fields describe the
    previous period (zero-length on a first invoice), so they cannot decide: the newest
    payment of a subscription pays for its current period (`current_period_end`); an older
    one's period ended when the next payment renewed it. Maintenance extension days pushed to
    Stripe move its period end but were never paid for: the paid period ends that many days
    before it (a maintenance window never creates a refund right). And a period ends no later
    than the next billed period starts (`next_billed_from`), paid or not: a renewal that was
    declined moves Stripe's period on (`past_due`) without further payment, so the period
    paid before it is over, deemed fully rendered (policy section 1). Likewise when Stripe
    has moved the subscription into a period the newest payment did not bill (its current
    period starts after that payment and after the period its invoice billed from, and holds
    no extension days) before the renewal's invoice is finalized and charged, about an hour
    later: that payment's period ended where the current one starts."""
    ends: dict[uuid.UUID, datetime | None] = {}
    by_subscription: dict[str, list[Row[Any]]] = {}
    for payment in payments:
        if payment.subscription_id and payment.paid_at is not None:
            by_subscription.setdefault(payment.subscription_id, []).append(payment)
    for paid in by_subscription.values():
        paid.sort(key=lambda p: p.paid_at)
        for current, following in itertools.pairwise(paid):
            ends[current.id] = following.paid_at
        newest = paid[-1]
        period_end = newest.current_period_end
        if period_end is not None and newest.maintenance_days > 0:
            period_end -= timedelta(days=newest.maintenance_days)
        elif (
            newest.current_period_start is not None
            and newest.billed_from is not None
            # after the payment too: a second between an invoice's period and Stripe's
            # subscription never ends a period that was just paid
            and newest.current_period_start > max(newest.billed_from, newest.paid_at)
        ):
            period_end = newest.current_period_start
        ends[newest.id] = period_end
    for payment in payments:
        billed = payment.next_billed_from
        if billed is not None and payment.id in ends:
            ends[payment.id] = min(filter(None, (ends[payment.id], billed)))
    return ends


# --- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Match:
    payment: Payment | None
    missing: list[str]


async def _match_payment(
    session: AsyncSession, request: RefundRequest, settings: Settings
) -> _Match:
    if request.payment_reference:
        payment = await repo.find_payment_by_reference(
            session, request.account_id, request.payment_reference
        )
        if payment is not None:
            return _Match(payment, [])
    if request.payment_date and request.amount and request.currency:
        candidates = await repo.find_payments_by_details(
            session,
            request.account_id,
            amount=request.amount,
            currency=request.currency,
            day=request.payment_date,
            zone=settings.calendar.zone,
        )
        # The money the client paid: a declined attempt of the same amount that day does not
        # make the request ambiguous, but two payments that both went through do.
        succeeded = [payment for payment in candidates if payment.status == "succeeded"]
        if len(candidates) == 1 or len(succeeded) == 1:
            return _Match(candidates[0] if len(candidates) == 1 else succeeded[0], [])
    missing = [field for field in PAYMENT_FIELDS if getattr(request, field) is None]
    if request.payment_reference and "payment_reference" not in missing:
        # Named, but not a payment of this account: ask for it again.
        missing.insert(0, "payment_reference")
    if not missing:
        missing = ["payment_reference"]
    return _Match(None, missing)


def _identify(
    request: RefundRequest, payment: Payment, clock_start: datetime, settings: Settings
) -> None:
    """The request is about `payment`; one still waiting for it leaves `needs_information`
    and its clock starts at `clock_start` (a request whose clock runs keeps it). Its status is
    that of the replies it already had while waiting (an interim one → `in_review`, an
    initial one → `acknowledged`, none → `received`), never one as if none had been sent."""
    request.payment_id = payment.id
    request.missing_information = []
    if request.clock_started_at is None:
        if request.interim_responded_at is not None:
            request.status = "in_review"
        elif request.first_responded_at is not None:
            request.status = "acknowledged"
        else:
            request.status = "received"
        _start_clock(request, clock_start, settings)


async def close_by_chargeback(
    session: AsyncSession,
    request: RefundRequest,
    dispute_id: str | None,
    *,
    inquiry: bool = False,
) -> None:
    """A refund request about a payment under a chargeback is `closed`, the client emailed: a
    disputed payment is never also refunded, so the bank's decision replaces the request.
    Under an `inquiry` (a dispute `warning_*`: the bank asking, no chargeback yet) the email
    says so, and that a request filed once it closes without one is considered."""
    request.status = "closed"
    audit_step(session, request, "closed_by_chargeback", "stripe", dispute_id=dispute_id)
    to = await repo.account_email(session, request.account_id)
    if to is not None:
        body = (
            "Your bank has opened an inquiry about this payment, the first step of a "
            "chargeback. While it is open the payment cannot also be refunded, so this refund "
            "request is closed; if the inquiry closes without a chargeback, you may file a new "
            "request."
            if inquiry
            else "The payment is now disputed with your bank (a chargeback). A disputed "
            "payment cannot also be refunded, so the bank's decision replaces this "
            "refund request."
        )
        await enqueue_email(
            session,
            dedupe_key=f"refund-request-closed:{request.id}",
            to=to,
            subject=f"Your refund request is closed [{request.id}]",
            body=f"{body}\nRequest reference: {request.id}",
        )


async def _close_if_under_chargeback(
    session: AsyncSession, request: RefundRequest, payment: Payment
) -> None:
    """A refund request identified as about a payment already under a chargeback (open, or
    lost: its events applied before the request was filed or matched) is closed at once, as
    those events close one filed before them (app/disputes/events.py), and as that dispute's
    next event would close it; one settled for us (`won`, `warning_closed`) is not."""
    if request.type != "refund" or request.status not in OPEN_STATUSES:
        return
    if not await repo.is_under_chargeback(session, payment):
        return
    await session.flush()
    dispute_id, status = await repo.chargeback_of(session, payment)
    await close_by_chargeback(session, request, dispute_id, inquiry=repo.is_inquiry(status))


def _start_clock(request: RefundRequest, start: datetime, settings: Settings) -> None:
    calendar = settings.calendar
    request.clock_started_at = start
    # Stored and shown in UTC (the same instant as the end of the local business day).
    request.first_response_due = calendar.add_business_days(
        start, settings.refund_first_response_business_days
    ).astimezone(UTC)
    request.decision_due = calendar.add_business_days(
        start, settings.refund_decision_business_days
    ).astimezone(UTC)


def audit_step(
    session: AsyncSession,
    request: RefundRequest,
    action: str,
    actor: str,
    **details: Any,
) -> None:
    session.add(
        RefundRequestAudit(
            request_id=request.id,
            action=action,
            actor=actor,
            status_after=request.status,
            details={k: _jsonable(v) for k, v in details.items()},
        )
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


async def create_request(
    session: AsyncSession,
    *,
    account_id: str,
    body: RefundRequestCreate,
    principal: Principal,
    settings: Settings,
    channel: str,
    received_at: datetime,
) -> RefundRequestOut:
    await ensure_account(session, account_id, principal.email if principal.is_user else None)
    about_payment = body.type == "refund" or any(
        getattr(body, field) is not None for field in PAYMENT_FIELDS
    )
    if about_payment:
        # Not missed by the events of a payment being applied at this moment (they would
        # identify it): see `repo.waiting_requests`.
        await repo.announce_matching(session, account_id)
    request = RefundRequest(
        id=uuid.uuid4(),
        account_id=account_id,
        type=body.type,
        description=body.description,
        about_payment=about_payment,
        payment_reference=body.payment_reference,
        payment_date=body.payment_date,
        amount=body.amount,
        currency=body.currency,
        channel=channel,
        filed_by=principal.sub,
        received_at=received_at,
        missing_information=[],
        status="received",
    )
    if about_payment:
        match = await _match_payment(session, request, settings)
        if match.payment is None:
            request.status = "needs_information"
            request.missing_information = match.missing
        else:
            request.payment_id = match.payment.id
    if request.status == "received":
        _start_clock(request, received_at, settings)
    session.add(request)
    await session.flush()
    audit_step(
        session,
        request,
        "filed",
        principal.sub,
        channel=channel,
        received_at=received_at,
        payment_id=request.payment_id,
        missing_information=request.missing_information,
    )
    if about_payment and match.payment is not None:
        await _close_if_under_chargeback(session, request, match.payment)
    await session.flush()
    log.info("refund_request.filed", request_id=str(request.id), status=request.status)
    return (await _render(session, [request]))[0]


async def update_request(
    session: AsyncSession,
    *,
    account_id: str,
    request_id: uuid.UUID,
    body: RefundRequestUpdate,
    principal: Principal,
    settings: Settings,
    now: datetime,
) -> RefundRequestOut:
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    announced = await _announce_if_waiting(
        session, request_id, account_id, details=any(field in changes for field in PAYMENT_FIELDS)
    )
    request = await repo.get_request(session, request_id, account_id=account_id, lock=True)
    if request is None:
        raise RefundRequestNotFound()
    if not changes:
        raise Unprocessable("Nothing to update")
    if request.payment_id is not None:
        # Details an identified request has already change nothing: the PATCH that identified
        # it sent again (its answer lost, a double submit) answers the request as it is.
        changes = {field: v for field, v in changes.items() if getattr(request, field) != v}
        if not changes:
            return (await _render(session, [request]))[0]
    if request.status not in OPEN_STATUSES:
        raise RequestAlreadyDecided("A decided request can no longer be changed")
    if request.payment_id is not None and any(field in changes for field in PAYMENT_FIELDS):
        raise Unprocessable("The payment of this request is already identified")
    for field, value in changes.items():
        setattr(request, field, value)
    if any(field in changes for field in PAYMENT_FIELDS):
        request.about_payment = True
    identified: Payment | None = None
    if request.about_payment and request.payment_id is None:
        # Not missed by the events of its payment, or of its chargeback, being applied at
        # this moment: see `repo.waiting_requests`.
        if not announced:
            await repo.announce_matching(session, account_id)
        match = await _match_payment(session, request, settings)
        if match.payment is None:
            request.missing_information = match.missing
            if request.clock_started_at is None:
                request.status = "needs_information"
        else:
            _identify(request, match.payment, now, settings)
            identified = match.payment
    await session.flush()
    audit_step(
        session,
        request,
        "details_added",
        principal.sub,
        fields=sorted(changes),
        payment_id=request.payment_id,
        missing_information=request.missing_information,
    )
    if identified is not None:
        await _close_if_under_chargeback(session, request, identified)
    await session.flush()
    return (await _render(session, [request]))[0]


async def _announce_if_waiting(
    session: AsyncSession, request_id: uuid.UUID, account_id: str, *, details: bool
) -> bool:
    """Before a request still waiting for its payment is locked, its account's row is
    written (`repo.announce_matching`) and so held, when the request may be matched now
    (it is about a payment, or `details` about one come): the events' transaction takes the
    account, then its waiting requests (`repo.waiting_requests`), and locking the request
    first could deadlock with it (the PATCH failing with 503). True when announced."""
    unlocked = await repo.get_request(session, request_id, account_id=account_id)
    if unlocked is None or unlocked.payment_id is not None:
        return False
    if not (unlocked.about_payment or details):
        return False
    await repo.announce_matching(session, account_id)
    return True


async def _lock_account_first(session: AsyncSession, request_id: uuid.UUID) -> None:
    """A balance credit locks the request's account (the ledger); it is locked before the
    request, as the events' transaction takes them (an account locked by a top-up's credit or
    a first payment, then the requests waiting for a payment it identifies, or the open ones
    about a payment a chargeback closes): the other order could deadlock with it (the reply
    failing with 503)."""
    unlocked = await repo.get_request(session, request_id)
    if unlocked is not None:
        await repo.lock_account(session, unlocked.account_id)


async def _lock_subscription_first(session: AsyncSession, request_id: uuid.UUID) -> None:
    """An access extension locks the subscription of the request's payment; it is locked
    before the request, as the events' transaction takes them (a subscription's events, or a
    lost chargeback ending its access, then the open requests the chargeback closes): the
    other order could deadlock with it (the decision failing with 503)."""
    unlocked = await repo.get_request(session, request_id)
    if unlocked is None or unlocked.payment_id is None:
        return
    payment = await repo.get_payment(session, unlocked.payment_id)
    if payment is not None:
        await repo.subscription_of_payment(session, payment, lock=True)


async def identify_waiting_requests(
    session: AsyncSession,
    settings: Settings,
    *,
    account_ids: list[str],
    known_at: dict[uuid.UUID, datetime],
    now: datetime,
    since: dict[str, datetime] | None = None,
) -> None:
    """Called by the webhook consumer when payments of these accounts become known (new, or
    newly linked to their account): their open requests about a payment not yet matched are
    matched again; one waiting in `needs_information` that matches now is `received` and its
    clock starts (the contract: "its clock starts only when it can be matched"), one whose
    clock already runs (filed about no payment, then naming one not yet mirrored) keeps it. `known_at`: when Stripe made each payment known
    (its event's time); a request that named a payment already made at Stripe when the request
    arrived had what identifies it from the start, so its clock runs from receipt; one that
    named it only in a later PATCH, from that PATCH. A payment
    not in `known_at` became known at `since[account]`, else `now`."""
    for request in await repo.waiting_requests(session, account_ids):
        match = await _match_payment(session, request, settings)
        if match.payment is None:
            continue
        became_known = (since or {}).get(request.account_id, now)
        clock_start = max(request.received_at, known_at.get(match.payment.id, became_known))
        if request.clock_started_at is None:
            # Matchable only once it had the details: those the client added later (PATCH)
            # start the clock no earlier than they came.
            added = await repo.payment_details_added_at(session, request.id)
            if added is not None:
                clock_start = max(clock_start, added)
        _identify(request, match.payment, clock_start, settings)
        await session.flush()
        audit_step(session, request, "payment_identified", "stripe", payment_id=request.payment_id)
        await _close_if_under_chargeback(session, request, match.payment)
        log.info("refund_request.identified", request_id=str(request.id))
    await session.flush()


async def get_request(
    session: AsyncSession, *, account_id: str, request_id: uuid.UUID
) -> RefundRequestOut:
    request = await repo.get_request(session, request_id, account_id=account_id)
    if request is None:
        raise RefundRequestNotFound()
    return (await _render(session, [request]))[0]


async def list_requests(session: AsyncSession, *, account_id: str) -> list[RefundRequestOut]:
    requests = await repo.list_requests(session, account_id=account_id, limit=500)
    return await _render(session, requests)


async def finance_list(
    session: AsyncSession,
    *,
    status: str | None,
    overdue: bool,
    account_id: str | None,
    limit: int,
    offset: int,
    now: datetime,
) -> list[FinanceRefundRequestOut]:
    requests = await repo.list_requests(
        session,
        account_id=account_id,
        status=status,
        overdue_at=now if overdue else None,
        limit=limit,
        offset=offset,
    )
    return await _render_finance(session, requests, now)


async def finance_get(
    session: AsyncSession, *, request_id: uuid.UUID, now: datetime
) -> FinanceRefundRequestOut:
    request = await repo.get_request(session, request_id)
    if request is None:
        raise RefundRequestNotFound()
    return (await _render_finance(session, [request], now))[0]


def is_overdue(request: RefundRequest, now: datetime) -> bool:
    """Python twin of `repository.overdue_condition`."""
    if request.decided_at is not None or request.status == "closed":
        return False
    return bool(
        (request.first_responded_at is None and _passed(request.first_response_due, now))
        or (request.interim_responded_at is None and _passed(request.decision_due, now))
        or _passed(request.next_step_due, now)
    )


def _passed(due: datetime | None, now: datetime) -> bool:
    return due is not None and due < now


async def _render(session: AsyncSession, requests: list[RefundRequest]) -> list[RefundRequestOut]:
    ids = [r.id for r in requests]
    responses = await repo.responses_for_requests(session, ids)
    executions = await repo.executions_for_requests(session, ids)
    out = []
    for request in requests:
        execution = executions.get(request.id)
        out.append(
            RefundRequestOut(
                id=request.id,
                account_id=request.account_id,
                type=request.type,
                status=request.status,
                description=request.description,
                payment_reference=request.payment_reference,
                payment_date=request.payment_date,
                amount=request.amount,
                currency=request.currency,
                payment_id=request.payment_id,
                missing_information=list(request.missing_information),
                channel=request.channel,
                received_at=request.received_at,
                clock_started_at=request.clock_started_at,
                first_response_due=request.first_response_due,
                decision_due=request.decision_due,
                next_step_due=request.next_step_due,
                outcome=request.outcome,
                remedy=request.remedy,
                remedy_amount=request.remedy_amount,
                remedy_days=request.remedy_days,
                responses=[
                    ResponseOut.model_validate(r, from_attributes=True)
                    for r in responses[request.id]
                ],
                refund=RefundOut.model_validate(execution, from_attributes=True)
                if execution
                else None,
            )
        )
    return out


async def _render_finance(
    session: AsyncSession, requests: list[RefundRequest], now: datetime
) -> list[FinanceRefundRequestOut]:
    out = []
    for request, rendered in zip(requests, await _render(session, requests), strict=True):
        audit = await repo.audit_for_request(session, request.id)
        out.append(
            FinanceRefundRequestOut(
                **rendered.model_dump(),
                overdue=is_overdue(request, now),
                audit=[AuditOut.model_validate(a, from_attributes=True) for a in audit],
            )
        )
    return out


# --- replies and decisions -----------------------------------------------------------------

SUBJECTS = {
    "initial": "We have received your billing request",
    "interim": "An update on your billing request",
    "decision": "A decision on your billing request",
    "closing": "Your billing request is closed",
}


async def _email_reply(
    session: AsyncSession,
    request: RefundRequest,
    response: RefundRequestResponse,
    settings: Settings | None = None,
) -> None:
    """Queue the reply's email. Dates are written in `BUSINESS_TIMEZONE` (`settings`, given
    with every interim reply), amounts from minor units (`format_amount`)."""
    to = await repo.account_email(session, request.account_id)
    if to is None:
        log.warning("refund_request.no_billing_contact", request_id=str(request.id))
        return
    lines = [response.message, ""]
    if response.kind == "interim" and response.next_step_due is not None:
        due = response.next_step_due
        if settings is not None:
            local = due.astimezone(settings.calendar.zone).strftime("%Y-%m-%d %H:%M")
            lines.append(f"Next step by: {local} ({settings.business_timezone})")
        else:
            lines.append(f"Next step by: {due.isoformat()}")
    if response.kind == "decision":
        payment = (
            await repo.get_payment(session, request.payment_id) if request.payment_id else None
        )
        # a request about no payment has no currency of its own: a credit is in the ledger's
        currency = (
            payment.currency
            if payment
            else (await effective_currency(session, request.account_id) or "")
        )
        lines.append(f"Decision: {response.outcome}")
        amount = format_amount(response.amount or 0, currency)
        remedy = {
            "refund": f"a refund of {amount} to your original payment method",
            "balance_credit": f"a credit of {amount} to your prepaid balance",
            "access_extension": f"your channel's access is extended by {response.days} days",
        }
        if response.remedy:
            lines.append(f"Remedy: {remedy.get(response.remedy, response.remedy)}")
    lines.append(f"Request reference: {request.id}")
    await enqueue_email(
        session,
        dedupe_key=f"refund-reply:{response.id}",
        to=to,
        subject=f"{SUBJECTS[response.kind]} [{request.id}]",
        body="\n".join(lines),
    )


def _add_response(
    session: AsyncSession, request: RefundRequest, body: ResponseCreate, author: str
) -> RefundRequestResponse:
    response = RefundRequestResponse(
        id=uuid.uuid4(),
        request_id=request.id,
        kind=body.kind,
        message=body.message,
        next_step_due=body.next_step_due,
        outcome=body.outcome,
        remedy=body.remedy,
        amount=body.amount,
        days=body.days,
        author=author,
    )
    session.add(response)
    return response


async def respond(
    factory: async_sessionmaker[AsyncSession],
    stripe: StripeGateway,
    settings: Settings,
    *,
    request_id: uuid.UUID,
    body: ResponseCreate,
    principal: Principal,
) -> FinanceRefundRequestOut:
    """Record a finance reply (and apply a decision's remedy), email it, audit it."""
    if body.kind == "decision" and body.outcome == "approved" and body.remedy == "refund":
        await _approve_refund(
            factory, stripe, request_id=request_id, body=body, principal=principal
        )
    else:
        async with factory() as session, session.begin():
            if body.kind == "decision" and body.remedy == "balance_credit":
                await _lock_account_first(session, request_id)
            if body.kind == "decision" and body.remedy == "access_extension":
                await _lock_subscription_first(session, request_id)
            request = await repo.get_request(session, request_id, lock=True)
            if request is None:
                raise RefundRequestNotFound()
            await _reply(session, request, body, principal, settings)
    async with factory() as session:
        return await finance_get(session, request_id=request_id, now=utcnow())


async def _reply(
    session: AsyncSession,
    request: RefundRequest,
    body: ResponseCreate,
    principal: Principal,
    settings: Settings,
) -> None:
    now = utcnow()
    if request.decided_at is not None or request.status not in OPEN_STATUSES:
        raise RequestAlreadyDecided(f"The request is {request.status}")
    if body.kind == "interim" and body.next_step_due is not None and body.next_step_due <= now:
        raise Unprocessable("next_step_due must be in the future")
    details: dict[str, Any] = {}
    if body.kind == "decision":
        # An approval whose Stripe answer was lost (502, a crash) left its refund attempt
        # pending: Stripe may have made the refund, so only that approval may be repeated.
        execution = await repo.execution_for_request(session, request.id, lock=True)
        if execution is not None and execution.status != "failed":
            raise RefundInProgress(
                f"A refund of {execution.amount} is already {execution.status} for this "
                "request; repeat its approval to complete it"
            )
        await _apply_remedy(session, request, body, principal, settings, now)
        request.decided_at = now
        request.outcome = body.outcome
        request.remedy = body.remedy
        request.remedy_amount = body.amount
        request.remedy_days = body.days
        request.status = "rejected" if body.outcome == "rejected" else "approved"
        details = {"outcome": body.outcome, "remedy": body.remedy, "amount": body.amount}
        details["days"] = body.days
    elif body.kind == "interim":
        request.interim_responded_at = request.interim_responded_at or now
        request.next_step_due = body.next_step_due
        if request.status in ("received", "acknowledged"):
            request.status = "in_review"
        details = {"next_step_due": body.next_step_due}
    elif request.status == "received":
        request.status = "acknowledged"
    request.first_responded_at = request.first_responded_at or now
    response = _add_response(session, request, body, principal.sub)
    await session.flush()
    audit_step(
        session, request, f"reply_{body.kind}", principal.sub, response_id=response.id, **details
    )
    await _email_reply(session, request, response, settings)
    await session.flush()


async def _apply_remedy(
    session: AsyncSession,
    request: RefundRequest,
    body: ResponseCreate,
    principal: Principal,
    settings: Settings,
    now: datetime,
) -> None:
    if body.outcome != "approved":
        return
    if body.remedy == "balance_credit":
        assert body.amount is not None
        payment = (
            await repo.get_payment(session, request.payment_id) if request.payment_id else None
        )
        currency = (
            payment.currency
            if payment is not None
            else (await effective_currency(session, request.account_id))
            or settings.default_currency
        )
        entry: dict[str, Any] = {
            "account_id": request.account_id,
            "kind": "balance_credit",
            "source_id": f"refund_request:{request.id}",
            "amount": body.amount,
            "currency": currency,
            "description": "Balance credit granted on a billing request",
            "occurred_at": now,
        }
        # One account's ledger holds one currency (locks the account, binds it if unbound):
        # a credit about a payment in another currency (a top-up refused for its currency)
        # is refused, changing nothing; finance refunds that payment instead.
        if not (await ledger_entries_in_account_currency(session, [entry]))[0]:
            bound = await effective_currency(session, request.account_id)
            raise CurrencyMismatch(
                f"This account's balance is in {str(bound).upper()}; the payment was in "
                f"{currency.upper()} and cannot be credited to it (refund it instead)"
            )
        await repo.add_ledger_entry(session, **entry)
        audit_step(session, request, "balance_credited", principal.sub, amount=body.amount)
    elif body.remedy == "access_extension":
        assert body.days is not None
        payment = (
            await repo.get_payment(session, request.payment_id) if request.payment_id else None
        )
        # A request identified as about a top-up or debt repayment has no subscription to
        # extend, and no detail the client adds changes that: the remedy does not fit (422),
        # unlike a request not yet matched to a payment (409 request_needs_information).
        if payment is not None and payment.purpose in repo.BALANCE_PURPOSES:
            raise RemedyNotApplicable(
                f"An access extension applies to a subscription payment; this request is "
                f"about a {payment.purpose} payment (grant a balance_credit or a refund instead)"
            )
        subscription = (
            await repo.subscription_of_payment(session, payment, lock=True) if payment else None
        )
        if subscription is None:
            raise RequestNotReady(
                "An access extension needs the request matched to a subscription payment"
            )
        subscription.extension_days += body.days
        # Extra days count from the end of its paid period: a subscription whose access has
        # ended for good (revoked by a refund or chargeback, ended by Stripe before its period
        # end, or so long ago that the days are already over) gets nothing from them, and an
        # approval would tell the client days are coming that never do. One Stripe may still
        # bring back (`past_due`, `unpaid`, `paused`, `incomplete`) keeps them for then.
        extended = subscription_access(subscription, now, past_due_keeps_access=True)
        ended = subscription.access_revoked_at is not None or subscription.status in ENDED
        if ended and not extended.has_access:
            raise RemedyNotApplicable(
                f"The subscription's access has ended ({extended.reason}); {body.days} extra "
                "days would not give the channel access (grant a balance_credit or a refund "
                "instead)"
            )
        await session.flush()
        await record_access_change(session, subscription.channel_id, settings, now)
        audit_step(
            session,
            request,
            "access_extended",
            principal.sub,
            subscription_id=subscription.id,
            days=body.days,
        )


async def _approve_refund(
    factory: async_sessionmaker[AsyncSession],
    stripe: StripeGateway,
    *,
    request_id: uuid.UUID,
    body: ResponseCreate,
    principal: Principal,
) -> None:
    assert body.amount is not None
    try:
        await _approve_refund_steps(
            factory, stripe, request_id=request_id, body=body, principal=principal
        )
    except _UnsentRefund as unsent:
        await _release_unsent_refund(factory, stripe, unsent)
        raise unsent.error from None


@dataclass
class _UnsentRefund(Exception):
    """A refund attempt still `pending` (`execution_id`; of the payment `payment_intent`)
    that can no longer be completed: its request was closed by a chargeback, or its payment
    is under one. `error`: what the repeat that found it answers."""

    execution_id: uuid.UUID
    payment_intent: str
    actor: str
    error: Exception


async def _refuse_unsent(
    session: AsyncSession,
    request: RefundRequest,
    payment: Payment,
    actor: str,
    error: Exception,
) -> NoReturn:
    """Raise `error`, as `_UnsentRefund` when the request's latest attempt is still
    `pending` without a refund Stripe named (to be released if Stripe has none)."""
    latest = await repo.execution_for_request(session, request.id)
    if latest is not None and latest.status == "pending" and latest.stripe_refund_id is None:
        raise _UnsentRefund(latest.id, payment.stripe_id, actor, error)
    raise error


IN_FLIGHT_BOUND = timedelta(minutes=5)
"""Longer than a Stripe call of ours can last (`STRIPE_TIMEOUT_SECONDS`, 10 s, for each of its
attempts, with the SDK's backoff between them): an attempt sent (or repeated) more recently may
still be in flight, so `_release_unsent_refund` keeps it (repeating the action later releases
it). Each send writes the attempt's `updated_at`."""


async def _release_unsent_refund(
    factory: async_sessionmaker[AsyncSession], stripe: StripeGateway, unsent: _UnsentRefund
) -> None:
    """A chargeback closed the request, or disputes its payment, while a refund attempt was
    `pending` (its Stripe call failed or went unanswered), so it can no longer be repeated to
    complete it. If Stripe has no refund for the attempt (looked for by the attempt id in its
    metadata), none was made and none will be: the attempt is deleted, so an unsent refund does
    not hold back what may still be refunded of the payment (or the account's unspent balance)
    for ever. One Stripe did make is left for its events to complete."""
    found = await stripe.find_refund(
        payment_intent=unsent.payment_intent, execution_id=str(unsent.execution_id)
    )
    if found is not None:
        return
    async with factory() as session, session.begin():
        execution = await repo.lock_execution(session, unsent.execution_id)
        if execution is None or execution.status != "pending" or execution.stripe_refund_id:
            return
        if execution.updated_at > datetime.now(UTC) - IN_FLIGHT_BOUND:
            return  # its latest send may still be waiting for Stripe, which may yet make it
        request = await repo.get_request(session, execution.request_id)
        await session.delete(execution)
        if request is not None:
            audit_step(
                session,
                request,
                "refund_execution_released",
                unsent.actor,
                refund_id=unsent.execution_id,
                amount=execution.amount,
            )
    log.info("refund.unsent_released", refund_id=str(unsent.execution_id))


async def _approve_refund_steps(
    factory: async_sessionmaker[AsyncSession],
    stripe: StripeGateway,
    *,
    request_id: uuid.UUID,
    body: ResponseCreate,
    principal: Principal,
) -> None:
    assert body.amount is not None
    # 1. Commit the pending execution (its id is the idempotency key) before calling Stripe.
    async with factory() as session, session.begin():
        unlocked = await repo.get_request(session, request_id)
        if unlocked is None:
            raise RefundRequestNotFound()
        if unlocked.payment_id is None:
            raise RequestNotReady("A refund needs the request matched to a payment")
        # Lock order everywhere: payment, then request, then refund execution (the dispute
        # hook holds the payment while it closes requests).
        payment = await repo.get_payment(session, unlocked.payment_id, lock=True)
        assert payment is not None
        if payment.purpose in repo.BALANCE_PURPOSES and payment.account_id is not None:
            # its account (`_check_refund_bound`) before the request, as the events take them
            await repo.lock_account(session, payment.account_id)
        request = await repo.get_request(session, request_id, lock=True)
        assert request is not None
        if request.decided_at is not None or request.status not in OPEN_STATUSES:
            decided = RequestAlreadyDecided(f"The request is {request.status}")
            if request.decided_at is None:  # closed by a chargeback
                await _refuse_unsent(session, request, payment, principal.sub, decided)
            raise decided
        if await repo.is_under_chargeback(session, payment):
            await _refuse_unsent(session, request, payment, principal.sub, PaymentDisputed())
        execution = await repo.execution_for_request(session, request.id, lock=True)
        sent_before = execution is not None
        if execution is not None:
            # The same approval repeated after its answer was lost completes with the refund
            # Stripe made, even one Stripe's events have since reported failed (the request is
            # then `refund_failed`, so finance can retry it).
            failed_unknown = execution.status == "failed" and execution.stripe_refund_id is None
            if execution.amount != body.amount or failed_unknown:
                raise RefundInProgress(
                    f"A refund of {execution.amount} is already {execution.status} for this request"
                )
            execution.updated_at = datetime.now(UTC)  # sent again now (`IN_FLIGHT_BOUND`)
        else:
            await _check_refund_bound(session, payment, body.amount)
            execution = RefundExecution(
                id=uuid.uuid4(),
                request_id=request.id,
                payment_id=payment.id,
                account_id=request.account_id,
                amount=body.amount,
                currency=payment.currency,
                status="pending",
                requested_by=principal.sub,
            )
            statement = (
                insert(RefundExecution)
                .values(
                    id=execution.id,
                    request_id=execution.request_id,
                    payment_id=execution.payment_id,
                    account_id=execution.account_id,
                    amount=execution.amount,
                    currency=execution.currency,
                    status="pending",
                    requested_by=principal.sub,
                )
                .on_conflict_do_nothing()  # one live attempt per request (unique index)
            )
            await session.execute(statement)
            audit_step(
                session,
                request,
                "refund_execution_created",
                principal.sub,
                refund_id=execution.id,
                amount=body.amount,
            )
        execution_id, amount = execution.id, execution.amount
        known_refund = execution.stripe_refund_id
        payment_intent, account_id = payment.stripe_id, request.account_id

    # 2. Ask Stripe, with our own row id as the idempotency key.
    refund = await _submit_refund(
        factory,
        stripe,
        execution_id,
        known_refund=known_refund,
        sent_before=sent_before,
        payment_intent=payment_intent,
        amount=amount,
        metadata={"refund_request_id": str(request_id), "account_id": account_id},
    )

    # 3. Record Stripe's answer and the decision.
    async with factory() as session, session.begin():
        request = await repo.get_request(session, request_id, lock=True)
        assert request is not None
        if request.decided_at is not None:
            raise RequestAlreadyDecided()
        execution = await repo.execution_for_request(session, request_id, lock=True)
        assert execution is not None
        if execution.stripe_refund_id is None:
            execution.stripe_refund_id = refund["id"]
        if execution.status == "pending":
            execution.status = "submitted"
        now = utcnow()
        request.decided_at = now
        request.first_responded_at = request.first_responded_at or now
        request.outcome, request.remedy, request.remedy_amount = "approved", "refund", amount
        request.status = {"succeeded": "refunded", "failed": "refund_failed"}.get(
            execution.status, "refund_pending"
        )
        response = _add_response(session, request, body, principal.sub)
        await session.flush()
        audit_step(
            session,
            request,
            "reply_decision",
            principal.sub,
            response_id=response.id,
            outcome="approved",
            remedy="refund",
            amount=amount,
            refund_id=execution.id,
            stripe_refund_id=execution.stripe_refund_id,
        )
        await _email_reply(session, request, response)
    log.info("refund.requested", request_id=str(request_id), refund_id=str(execution_id))


async def _submit_refund(
    factory: async_sessionmaker[AsyncSession],
    stripe: StripeGateway,
    execution_id: uuid.UUID,
    *,
    known_refund: str | None,
    sent_before: bool,
    payment_intent: str,
    amount: int,
    metadata: dict[str, str],
) -> dict[str, Any]:
    """Create the refund at Stripe, keyed by our execution row (a retry after a crash gets the
    same refund back). If Stripe rejects it, Stripe created nothing: the pending row is
    forgotten so a corrected request starts afresh. An execution whose refund Stripe's events
    already named (`known_refund`: the answer was lost, the events were not) is not sent
    again: Stripe keeps idempotency keys only 24 hours, after which the same key would make a
    second refund. For the same reason an execution sent before (`sent_before`: a repeat after
    a lost answer) whose refund no event has named yet is first looked for at Stripe, by the
    execution id in its metadata."""
    if known_refund is not None:
        return {"id": known_refund}
    if sent_before:
        found = await stripe.find_refund(
            payment_intent=payment_intent, execution_id=str(execution_id)
        )
        if found is not None:
            return found
    try:
        return await stripe.create_refund(
            payment_intent=payment_intent,
            amount=amount,
            metadata={"refund_execution_id": str(execution_id), **metadata},
            key=idempotency_key("refund", execution_id),
        )
    except StripeRequestRejected:
        async with factory() as session, session.begin():
            execution = await repo.lock_execution(session, execution_id)
            if execution is not None and execution.status == "pending":
                await session.delete(execution)
        raise


async def _check_refund_bound(session: AsyncSession, payment: Payment, amount: int) -> None:
    """422 for a refund of `payment` that may not, or cannot, be made: above the limits below,
    or an amount Stripe refuses in the payment's currency (`amount_step`: the last digit 0 in
    the three-decimal currencies, whole krónur in ISK), refused here rather than by Stripe
    as a 502 that reads as Stripe failing."""
    if payment.status != "succeeded":
        raise RefundExceedsLimit("Only a succeeded payment can be refunded")
    if amount % (step := amount_step(payment.currency)):
        raise Unprocessable(
            f"Stripe refunds {payment.currency.upper()} only in multiples of {step} minor units"
        )
    limit = payment.amount - await repo.already_refunded(session, payment)
    # A debt repayment paid for usage already consumed (conversations, Meta fees: never
    # refundable): like a top-up, only what is left unspent in the balance may go back.
    if payment.purpose in repo.BALANCE_PURPOSES and payment.account_id is not None:
        # Serialise with other money movements of the account (usage charges lock it too).
        await repo.lock_account(session, payment.account_id)
        unspent, _debt, currency = await account_balance(session, payment.account_id)
        # A payment in another currency than the balance's was never credited (refused for its
        # currency): none of it was spent, so only what was paid bounds its refund.
        if currency is None or currency == payment.currency:
            # Refunds approved but not yet confirmed by Stripe are not debited in the ledger yet.
            unspent -= await repo.unconfirmed_balance_refunds(
                session, payment.account_id, payment.currency
            )
            # Goodwill balance credits are spent last: what is left of them is no money the
            # client paid, so it never goes back to a card.
            unspent -= await repo.goodwill_credits(session, payment.account_id, payment.currency)
            limit = min(limit, unspent)
    if amount > limit:
        raise RefundExceedsLimit(f"At most {max(0, limit)} {payment.currency} can be refunded")


# --- refund retries and closing ------------------------------------------------------------

CLOSABLE_STATUSES = (*OPEN_STATUSES, "approved", "rejected", "refunded", "refund_failed")


async def retry_refund(
    factory: async_sessionmaker[AsyncSession],
    stripe: StripeGateway,
    *,
    request_id: uuid.UUID,
    body: RefundRetryCreate,
    principal: Principal,
) -> FinanceRefundRequestOut:
    """`_retry_refund_steps`; a retry attempt left `pending` whose payment has since come
    under a chargeback is released if Stripe has no refund for it (`_release_unsent_refund`),
    and the repeat answers 409 `payment_disputed` as before."""
    try:
        return await _retry_refund_steps(
            factory, stripe, request_id=request_id, body=body, principal=principal
        )
    except _UnsentRefund as unsent:
        await _release_unsent_refund(factory, stripe, unsent)
        raise unsent.error from None


async def _retry_refund_steps(
    factory: async_sessionmaker[AsyncSession],
    stripe: StripeGateway,
    *,
    request_id: uuid.UUID,
    body: RefundRetryCreate,
    principal: Principal,
) -> FinanceRefundRequestOut:
    """Execute an approved refund again after Stripe reported it failed (`refund_failed`).

    The same three steps as the approval: commit a `pending` attempt (attempt n+1, a new id, so
    a new idempotency key) for the decided amount, still at most what was paid less what is
    already refunded; call Stripe; record its answer (`refund_pending` until Stripe's event).
    A retry of the retry (Stripe down: 502, or a crash) finds that attempt still `pending` and
    reuses it and its key. The partial unique index on live attempts makes a second live refund
    for one decision impossible, whatever runs concurrently."""
    # 1. Commit the new attempt before calling Stripe.
    async with factory() as session, session.begin():
        unlocked = await repo.get_request(session, request_id)
        if unlocked is None:
            raise RefundRequestNotFound()
        if unlocked.status != "refund_failed" or unlocked.payment_id is None:
            raise RefundNotFailed(f"The request is {unlocked.status}")
        # Lock order everywhere: payment, then request, then refund execution.
        payment = await repo.get_payment(session, unlocked.payment_id, lock=True)
        assert payment is not None
        if payment.purpose in repo.BALANCE_PURPOSES and payment.account_id is not None:
            # The account its unspent balance is read from (`_check_refund_bound`) before the
            # request: the events of the failed refund lock the account (its ledger reversal)
            # and then our request and attempt, so the other order could deadlock with them.
            await repo.lock_account(session, payment.account_id)
        request = await repo.get_request(session, request_id, lock=True)
        assert request is not None
        if request.status != "refund_failed":
            raise RefundNotFailed(f"The request is {request.status}")
        if await repo.is_under_chargeback(session, payment):
            await _refuse_unsent(session, request, payment, principal.sub, PaymentDisputed())
        latest = await repo.execution_for_request(session, request.id, lock=True)
        if latest is None or latest.status in ("submitted", "succeeded"):
            raise RefundInProgress("The request's refund is not failed at Stripe")
        sent_before = latest.status != "failed"  # a pending attempt repeated
        if sent_before:
            latest.updated_at = datetime.now(UTC)  # sent again now (`IN_FLIGHT_BOUND`)
        if latest.status == "failed":
            amount = request.remedy_amount or latest.amount
            await _check_refund_bound(session, payment, amount)
            attempt = RefundExecution(
                id=uuid.uuid4(),
                request_id=request.id,
                attempt=latest.attempt + 1,
                payment_id=payment.id,
                account_id=request.account_id,
                amount=amount,
                currency=payment.currency,
                status="pending",
                requested_by=principal.sub,
            )
            session.add(attempt)
            await session.flush()
            audit_step(
                session,
                request,
                "refund_retry_created",
                principal.sub,
                refund_id=attempt.id,
                attempt=attempt.attempt,
                amount=amount,
                note=body.note,
            )
            latest = attempt
        execution_id, amount, number = latest.id, latest.amount, latest.attempt
        known_refund = latest.stripe_refund_id
        payment_intent, account_id = payment.stripe_id, request.account_id

    # 2. Ask Stripe, with the attempt's id as the idempotency key.
    refund = await _submit_refund(
        factory,
        stripe,
        execution_id,
        known_refund=known_refund,
        sent_before=sent_before,
        payment_intent=payment_intent,
        amount=amount,
        metadata={
            "refund_request_id": str(request_id),
            "account_id": account_id,
            "attempt": str(number),
        },
    )

    # 3. Record Stripe's answer.
    async with factory() as session, session.begin():
        request = await repo.get_request(session, request_id, lock=True)
        assert request is not None
        execution = await repo.lock_execution(session, execution_id)
        assert execution is not None
        if execution.stripe_refund_id is None:
            execution.stripe_refund_id = refund["id"]
        if execution.status == "pending":
            execution.status = "submitted"
        if request.status == "refund_failed":
            request.status = {"succeeded": "refunded", "failed": "refund_failed"}.get(
                execution.status, "refund_pending"
            )
            audit_step(
                session,
                request,
                "refund_retried",
                principal.sub,
                refund_id=execution.id,
                attempt=execution.attempt,
                amount=execution.amount,
                stripe_refund_id=execution.stripe_refund_id,
            )
            await _email_retry(session, request, execution)
    log.info(
        "refund.retried", request_id=str(request_id), refund_id=str(execution_id), attempt=number
    )
    async with factory() as session:
        return await finance_get(session, request_id=request_id, now=utcnow())


async def _email_retry(
    session: AsyncSession, request: RefundRequest, execution: RefundExecution
) -> None:
    to = await repo.account_email(session, request.account_id)
    if to is None:
        log.warning("refund_request.no_billing_contact", request_id=str(request.id))
        return
    await enqueue_email(
        session,
        dedupe_key=f"refund-retried:{execution.id}",
        to=to,
        subject=f"Your refund has been submitted again [{request.id}]",
        body="The payment provider could not complete your refund of "
        f"{format_amount(execution.amount, execution.currency)}, so we have submitted it again. Your bank decides when it "
        f"appears.\nRequest reference: {request.id}",
    )


async def close_request(
    session: AsyncSession,
    *,
    request_id: uuid.UUID,
    body: RequestClose,
    principal: Principal,
    now: datetime,
) -> FinanceRefundRequestOut:
    """Close a request with nothing left to do, with a closing reply emailed to the client.

    Closable: an open request (withdrawn, duplicate, details that never came, or settled by
    other means), or one with its final reply (`approved`, `rejected`, `refunded`, or
    `refund_failed` that finance settles without another attempt). Not while a refund is on
    its way (`refund_pending`, or a retry not yet answered by Stripe), and not twice: 409
    `request_not_closable`."""
    request = await repo.get_request(session, request_id, lock=True)
    if request is None:
        raise RefundRequestNotFound()
    if request.status not in CLOSABLE_STATUSES:
        raise RequestNotClosable(f"The request is {request.status}")
    latest = await repo.execution_for_request(session, request.id, lock=True)
    if latest is not None and latest.status in ("pending", "submitted"):
        raise RequestNotClosable(f"A refund ({latest.status} at Stripe) is on its way")
    status_before = request.status
    request.status = "closed"
    request.first_responded_at = request.first_responded_at or now
    response = RefundRequestResponse(
        id=uuid.uuid4(),
        request_id=request.id,
        kind="closing",
        message=body.message,
        author=principal.sub,
    )
    session.add(response)
    await session.flush()
    audit_step(
        session,
        request,
        "closed",
        principal.sub,
        reason=body.reason,
        status_before=status_before,
        response_id=response.id,
    )
    await _email_reply(session, request, response)
    await session.flush()
    log.info("refund_request.closed", request_id=str(request.id), reason=body.reason)
    return (await _render_finance(session, [request], now))[0]
