"""Stripe Checkout sessions for the three purposes.

Creating one (all validation first: nothing reaches Stripe for a request we will refuse):

1. One short transaction (its own, committed): claims the request's `Idempotency-Key`
   (app/idempotency.py `idempotent_claiming_in`; a refusal below rolls the claim back with the
   rest), locks the account row, so an account's checkout requests run one at a time (creating
   the account on first use in the same statement); reads the currency, the Stripe customer,
   the billing email and the rate-limit count in one more statement; checks the rate limit,
   the channel's owner, live subscriptions, the currency and the debt; inserts a `pending` row;
   and, on the account's first checkout, creates its Stripe customer (key derived from the
   account id, app/accounts/service.py) and records its id. A Stripe failure there rolls all of
   it back: no claim, no row, no customer id.
2. Stripe is called with `idempotency_key("checkout", row.id)`; the result and the stored
   idempotent response are recorded by one statement committed on its own, the request's
   durable commit (`_record_with_answer`). A Stripe failure marks the row `failed` and answers
   502; a retry of a `pending` row (a crash, or a concurrent request for the same channel)
   reuses its key. So does a retry of the request with the same `Idempotency-Key` and body (the
   502 released the key): the row the earlier attempt left `failed` or `pending` (found by
   `request_digest`, the request's key scope and body) is reused while it asks Stripe for the
   same session, so when Stripe made the session but its answer was lost, Stripe replays that
   session rather than making a second one (`_retried_or_new`).

Both run on the asyncpg connection (`app/db.py` `driver_transaction`, `driver_connection`),
with Core statements compiled once (`DriverStatement`): SQLAlchemy's per-statement execution
work was most of a checkout's own CPU (bench/README.md). 7 round trips to Postgres for a top-up
(BEGIN with its SET LOCAL, claim, lock, facts, insert, COMMIT; the result with the response);
an account's first checkout adds the customer's id and the SET LOCAL that makes its commit
durable; a subscription adds the channel claim, its owner, the live-subscription check and the
channel's latest checkout.

Durability: one commit per request waits for the disk (fdatasync), the request's last, before
the response is sent. Transaction 1 commits with `synchronous_commit = off` (it is visible at
once and safe from a crash of this process; the WAL writer flushes it within ~0.6 s), unless it
recorded a new Stripe customer. PostgreSQL flushes WAL in order, so the final durable commit
(or any later durable commit in the cluster) makes transaction 1 durable too. Only a crash of
the database server in the window between them can lose it, and then the request has not
answered (its final commit failed): the client sees an error (or nothing) and retries. What the
retry does: its key claim and pending row are gone, so it claims again and inserts a new
pending row with a new id, hence a new Stripe key: Stripe makes a second Checkout session; the
first one's URL was never shown to anyone, nobody can pay it, and it expires (its
`checkout.session.expired` event names a row we do not have, which the event handler logs and
ignores). The Stripe customer must stay exactly-once, so the transaction that records a new
customer id commits durably: once it has committed, no later checkout creates another; if it
did not commit (a crash of either process while Stripe answered), the retry creates the
customer with the same account-derived key and Stripe returns the same customer (Stripe keeps
keys at least 24 hours; this was so before, too). A client never receives a session whose row
may still be lost. While an account's first checkout waits for Stripe to create its customer,
a second request with the same Idempotency-Key waits on the claim in the database rather than
in `IDEMPOTENCY_WAIT_SECONDS`' loop (it then replays the first answer as usual).

Subscription checkouts: an open, unexpired session for the same channel and plan is returned
again instead of a second one; one for the same channel and another plan is expired at Stripe
first (if Stripe reports it already completed, the answer is 409 `subscription_exists`), so a
channel never has two payable subscription checkouts. A channel has a live subscription while
Stripe may still bill it: `active`, `trialing`, `past_due`, `unpaid`, `paused` or `incomplete`
(a delayed payment in flight), and from the moment we know Stripe completed one of its
subscription checkouts (its event, or a read of the session) until that subscription's own
events arrive: a late or reordered `customer.subscription.created` must not let the client pay
for the channel twice.

Debt repayments likewise: an open, unexpired repayment of the same debt (amount and currency)
is returned again; one of another amount (the debt changed) is expired at Stripe first (if
Stripe reports it already completed, the answer is 409 `no_debt`: asked again, the debt less
that repayment is asked for), so an account never has two payable repayments of one debt.
A debt above Stripe's largest charge (`STRIPE_MAXIMUM_AMOUNT`, eight digits of minor units) is
asked for in parts of at most that: the next repayment, once one is paid, asks for the rest.
One Stripe cannot charge in its currency (a last digit other than 0 in the three-decimal
currencies, fractional krónur in ISK) is asked for rounded up to one it can
(`_repayment_amount`); a top-up of such an amount is 422.

Nothing here grants access or credits the balance: the Stripe payment event handlers do, and
set `fulfilled_at`. Reading a session syncs Stripe's status, payment status and subscription id
when no event has fulfilled it yet, so a browser returning from Checkout sees the truth; forward
only, as the events merge them, since Stripe's answer may predate an event applied meanwhile.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from urllib.parse import urlsplit

import structlog
from sqlalchemy import (
    String,
    Table,
    bindparam,
    case,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.accounts.service import (
    account_facts,
    claim_channel,
    create_stripe_customer,
    lock_account,
    require_currency,
)
from app.auth import Principal
from app.checkout.schemas import (
    CheckoutIn,
    CheckoutOut,
    DebtRepaymentCheckoutIn,
    SubscriptionCheckoutIn,
    TopUpCheckoutIn,
)
from app.config import STRIPE_MAXIMUM_AMOUNT, Plan, Settings, TopUpLimit
from app.db import DriverStatement, driver_connection, driver_transaction, flush_on_commit
from app.errors import (
    BillingError,
    CheckoutSessionNotFound,
    DebtBelowMinimumCharge,
    NoDebt,
    SubscriptionExists,
    Unprocessable,
)
from app.idempotency import STORE_ANSWER, Claim
from app.models import CheckoutSession, LedgerEntry, Subscription
from app.rate_limit import RecentSessions, StripeReadThrottle, enforce_stripe_rate_limit
from app.redirects import check_redirects
from app.stripe_gateway import StripeGateway, StripeObject, StripeRequestRejected, idempotency_key
from app.webhooks.fees import amount_step
from app.webhooks.handlers import CHECKOUT_PAYMENT_ORDER, CHECKOUT_STATUS_ORDER, rank_merge, ref

log = structlog.get_logger()

LIVE_SUBSCRIPTION_STATUSES = ("active", "trialing", "past_due", "unpaid", "paused", "incomplete")
REUSE_MARGIN = timedelta(minutes=10)
PENDING_REPLAY_WINDOW = timedelta(hours=23)
SESSION_ID_PLACEHOLDER = "{CHECKOUT_SESSION_ID}"
PRODUCT_NAMES = {"top_up": "Balance top-up", "debt_repayment": "Debt repayment"}
STRIPE_MINIMUM_CHARGE: dict[str, int] = {
    "usd": 50, "aed": 200, "aud": 50, "bgn": 100, "brl": 50, "cad": 50, "chf": 50,
    "czk": 1500, "dkk": 250, "eur": 50, "gbp": 30, "hkd": 400, "huf": 17500, "inr": 50,
    "jpy": 50, "mxn": 1000, "myr": 200, "nok": 300, "nzd": 50, "pln": 200, "ron": 200,
    "sek": 300, "sgd": 50, "thb": 1000,
}  # fmt: skip
"""The smallest amount Stripe charges per presentment currency, in minor units
(docs.stripe.com/currencies#minimum-and-maximum-charge-amounts). Stripe also refuses a charge
that converts to less than its settlement currency's minimum (`amount_too_small`), which no
table can know: that refusal is answered like a debt below this table's minimum."""


@dataclass(kw_only=True, slots=True)
class CheckoutRow:
    """A `checkout_sessions` row as plain data: what the checkout's own transactions read and
    write through asyncpg (building an ORM instance costs more CPU than the statement that
    stores it; bench/README.md)."""

    id: uuid.UUID
    account_id: str
    purpose: str
    channel_id: str | None = None
    plan_code: str | None = None
    amount: int | None = None
    currency: str
    status: str
    payment_status: str | None = None
    stripe_id: str | None = None
    url: str | None = None
    success_url: str
    cancel_url: str
    expires_at: datetime | None = None
    stripe_subscription_id: str | None = None
    stripe_payment_intent_id: str | None = None
    fulfilled_at: datetime | None = None
    request_digest: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


AnyCheckoutRow = CheckoutSession | CheckoutRow


async def create_checkout_session(
    factory: async_sessionmaker[AsyncSession],
    engine: AsyncEngine,
    gateway: StripeGateway,
    settings: Settings,
    principal: Principal,
    account_id: str,
    body: CheckoutIn,
    claim: Claim | None = None,
) -> CheckoutOut:
    check_redirects(
        settings.redirect_allowed_origins, success_url=body.success_url, cancel_url=body.cancel_url
    )
    plan = _validate(settings, body)

    stale: CheckoutRow | None = None
    limit = settings.stripe_sessions_per_account_per_minute
    digest = claim.request_digest if claim is not None else None
    async with driver_transaction(engine, wait_for_flush=False) as conn:
        if claim is not None:
            await claim(conn)
        await lock_account(conn, account_id, principal.email)
        facts = await account_facts(conn, account_id)
        row: CheckoutRow | None = None
        new = True
        if isinstance(body, SubscriptionCheckoutIn):
            assert plan is not None
            await claim_channel(conn, account_id, body.channel_id)
            require_currency(facts.currency, plan.currency)
            live, paid = await _CHANNEL_SUBSCRIBED.fetchrow(conn, channel_id=body.channel_id)
            if live:
                raise SubscriptionExists(f"Channel {body.channel_id!r} already has a subscription")
            if paid:
                raise SubscriptionExists(
                    f"Channel {body.channel_id!r} has a completed checkout whose subscription"
                    " Stripe's events have not brought yet"
                )
            found = await _LATEST_SUBSCRIPTION_CHECKOUT.fetchrow(conn, channel_id=body.channel_id)
            existing = _detached(found)
            now = found["now"] if found is not None else None
            if existing is not None and existing.plan_code == plan.code:
                if existing.status == "open" and now is not None and _open_for(existing, now):
                    log.info("checkout.reused", checkout_id=str(existing.id))
                    return to_out(existing)
                if existing.status == "pending":
                    row, new = existing, False
                elif existing.status == "open":
                    stale = existing
            else:
                stale = existing
            if row is None:
                fresh = _new_row(account_id, body, plan.amount, plan.currency.lower(), plan, digest)
                row, new = await _retried_or_new(conn, fresh, facts.recent, limit)
        elif isinstance(body, TopUpCheckoutIn):
            currency = body.currency.lower()
            require_currency(facts.currency, currency)
            fresh = _new_row(account_id, body, body.amount, currency, None, digest)
            row, new = await _retried_or_new(conn, fresh, facts.recent, limit)
        else:
            debt = max(0, -int(await _LEDGER_TOTAL.fetchval(conn, account_id=account_id)))
            debt -= int(await _PAID_REPAYMENTS.fetchval(conn, account_id=account_id))
            if debt <= 0:
                raise NoDebt("The account has no debt to repay")
            currency = facts.currency or settings.default_currency
            if debt < STRIPE_MINIMUM_CHARGE.get(currency, 0):
                raise _debt_below_minimum(settings, debt, currency)
            debt = _repayment_amount(debt, currency)
            found = await _OPEN_REPAYMENT.fetchrow(conn, account_id=account_id)
            existing = _detached(found)
            if existing is not None and (existing.amount, existing.currency) == (debt, currency):
                if existing.status == "open" and _open_for(existing, found["now"]):
                    log.info("checkout.reused", checkout_id=str(existing.id))
                    return to_out(existing)
                if existing.status == "pending":
                    row, new = existing, False
                else:
                    stale = existing
            elif existing is not None:
                stale = existing
            if row is None:
                fresh = _new_row(account_id, body, debt, currency, None, digest)
                row, new = await _retried_or_new(conn, fresh, facts.recent, limit)
        if new:
            await _INSERT_PENDING.execute(conn, **_pending_values(row))
        customer = facts.stripe_customer_id
        if customer is None:
            # A Stripe failure here rolls everything back (the key claim included): nothing
            # half-made. This commit stays durable: it records the customer (module docstring).
            customer = await create_stripe_customer(conn, gateway, account_id, facts.email)
            await flush_on_commit(conn)

    try:
        if stale is not None:
            await _retire(factory, gateway, settings, stale, customer)
        created = await gateway.create_checkout_session(
            stripe_params(row, customer, settings), key=idempotency_key("checkout", row.id)
        )
    except BillingError as exc:
        await _mark_failed(factory, row.id)
        if (
            row.purpose == "debt_repayment"
            and isinstance(exc, StripeRequestRejected)
            and exc.stripe_code == "amount_too_small"
        ):
            raise _debt_below_minimum(settings, int(row.amount or 0), row.currency) from None
        raise
    out = await _record_with_answer(engine, row, created, claim or Claim())
    log.info(
        "checkout.created",
        checkout_id=str(row.id),
        account_id=account_id,
        purpose=row.purpose,
        stripe_id=created.get("id"),
    )
    return out


async def get_checkout_session(
    factory: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    throttle: StripeReadThrottle,
    account_id: str,
    checkout_id: str,
) -> CheckoutOut:
    """The account's session, by our id or by Stripe's (the `session_id` a client back from
    Checkout has in its success URL); synced from Stripe while no payment event has fulfilled it, at
    most once a second per account (`throttle`; in between, the stored state). No
    transaction is open (no pooled connection held) while Stripe answers: a client polling its
    checkout while Stripe is slow would otherwise take the pool from every other request."""
    try:
        which = CheckoutSession.id == uuid.UUID(checkout_id)
    except ValueError:
        if not checkout_id.startswith("cs_"):
            raise CheckoutSessionNotFound("No such checkout session") from None
        # Stripe's id, as the success URL's `session_id` brings it back (`with_session_id`)
        which = CheckoutSession.stripe_id == checkout_id
    async with factory() as session:
        row = await session.scalar(
            select(CheckoutSession).where(which, CheckoutSession.account_id == account_id)
        )
    if row is None or row.stripe_id is None:
        raise CheckoutSessionNotFound("No such checkout session")
    if row.fulfilled_at is None and row.status != "expired" and throttle.allow(account_id):
        try:
            stripe_session = await gateway.retrieve_checkout_session(row.stripe_id)
        except BillingError:
            log.warning("checkout.sync_failed", checkout_id=str(row.id))
        else:
            async with factory() as session, session.begin():
                row = await _apply_stripe_state(session, row.id, stripe_session)
    return to_out(row)


def stripe_params(row: AnyCheckoutRow, customer: str, settings: Settings) -> dict[str, Any]:
    """The Checkout session parameters, a pure function of our row (so a retry with the row's
    idempotency key sends the same request)."""
    metadata: dict[str, str] = {
        "account_id": row.account_id,
        "purpose": row.purpose,
        "checkout_session_id": str(row.id),
    }
    params: dict[str, Any] = {
        "customer": customer,
        "client_reference_id": row.account_id,
        "success_url": with_session_id(row.success_url),
        "cancel_url": row.cancel_url,
        "metadata": metadata,
    }
    if row.purpose == "subscription":
        plan = settings.plan(row.plan_code or "")
        if plan is None:
            raise Unprocessable(f"Plan {row.plan_code!r} is no longer on sale")
        assert row.channel_id is not None
        metadata.update({"channel_id": row.channel_id, "plan_code": plan.code})
        params.update(
            {
                "mode": "subscription",
                "line_items": [{"price": plan.stripe_price_id, "quantity": 1}],
                "subscription_data": {"metadata": dict(metadata)},
            }
        )
    else:
        assert row.amount is not None
        params.update(
            {
                "mode": "payment",
                "line_items": [
                    {
                        "price_data": {
                            "currency": row.currency,
                            "unit_amount": row.amount,
                            "product_data": {"name": PRODUCT_NAMES[row.purpose]},
                        },
                        "quantity": 1,
                    }
                ],
                "payment_intent_data": {
                    "metadata": dict(metadata),
                    "description": PRODUCT_NAMES[row.purpose],
                },
            }
        )
    return params


def with_session_id(url: str) -> str:
    """`url` with `session_id={CHECKOUT_SESSION_ID}` added to its query (before any fragment),
    unless it already carries the placeholder."""
    if SESSION_ID_PLACEHOLDER in url:
        return url
    base, hash_sign, fragment = url.partition("#")
    separator = "&" if urlsplit(base).query else ("" if base.endswith("?") else "?")
    return f"{base}{separator}session_id={SESSION_ID_PLACEHOLDER}{hash_sign}{fragment}"


def to_out(row: AnyCheckoutRow) -> CheckoutOut:
    status = row.status if row.status in ("complete", "expired") else "open"
    return CheckoutOut(
        id=str(row.id),
        url=row.url if status == "open" else None,
        purpose=row.purpose,
        status=status,
        fulfilled=row.fulfilled_at is not None,
        payment_status=row.payment_status,
        expires_at=row.expires_at,
        channel_id=row.channel_id,
        plan=row.plan_code,
        amount=row.amount,
        currency=row.currency,
        stripe_checkout_session_id=row.stripe_id,
    )


# --- helpers ---------------------------------------------------------------------------------


def _validate(settings: Settings, body: CheckoutIn) -> Plan | None:
    if isinstance(body, SubscriptionCheckoutIn):
        plan = settings.plan(body.plan)
        if plan is None:
            raise Unprocessable(f"Unknown plan {body.plan!r}; see GET /v1/plans")
        return plan
    if isinstance(body, TopUpCheckoutIn):
        currency = body.currency.lower()
        limits = settings.top_up_limits.get(currency)
        if limits is None:
            raise Unprocessable(f"Top-ups are not available in {currency.upper()}")
        smallest = _smallest_top_up(limits, currency)
        if not smallest <= body.amount <= limits.max:
            raise Unprocessable(
                f"A top-up in {currency.upper()} must be between {smallest} and {limits.max} "
                "minor units"
            )
        if body.amount % (step := amount_step(currency)):
            raise Unprocessable(
                f"A top-up in {currency.upper()} must be a multiple of {step} minor units "
                "(Stripe charges no other amounts in it)"
            )
    assert isinstance(body, SubscriptionCheckoutIn | TopUpCheckoutIn | DebtRepaymentCheckoutIn)
    return None


def _repayment_amount(debt: int, currency: str) -> int:
    """What a repayment of `debt` asks for: an amount Stripe charges. At most its largest
    charge (eight digits): a larger debt is repaid in parts, the rest asked for once this part
    is paid (asked whole, Stripe refuses it every time). And a multiple of `amount_step` (the
    last digit 0 in the three-decimal currencies, whole krónur in ISK; usage is charged to
    the minor unit): rounded up, the few minor units over stay in the prepaid balance (down
    only for a part below the largest charge)."""
    step = amount_step(currency)
    return min(-(-debt // step) * step, STRIPE_MAXIMUM_AMOUNT // step * step)


def _smallest_top_up(limits: TopUpLimit, currency: str) -> int:
    """The smallest top-up taken in `currency`: Stripe charges nothing below its minimum,
    whatever TOP_UP_LIMITS allows."""
    return max(limits.min, STRIPE_MINIMUM_CHARGE.get(currency, 0))


def _debt_below_minimum(settings: Settings, debt: int, currency: str) -> DebtBelowMinimumCharge:
    """409 for a debt Stripe will not charge by card (below its minimum charge): what a client
    can do instead is a top-up, which repays the debt first."""
    code = currency.upper()
    limits = settings.top_up_limits.get(currency)
    smallest = _smallest_top_up(limits, currency) if limits else None
    remedy = (
        f"settle it with a top-up (purpose top_up, at least {smallest} {code} minor units), "
        "which repays the debt first"
        if smallest is not None
        else "contact finance@1msg.io to settle it"
    )
    return DebtBelowMinimumCharge(
        f"The debt of {debt} {code} minor units is below the smallest card payment Stripe "
        f"accepts; {remedy}"
    )


def _new_row(
    account_id: str,
    body: CheckoutIn,
    amount: int,
    currency: str,
    plan: Plan | None,
    request_digest: str | None,
) -> CheckoutRow:
    return CheckoutRow(
        id=uuid.uuid4(),
        account_id=account_id,
        purpose=body.purpose,
        channel_id=body.channel_id if isinstance(body, SubscriptionCheckoutIn) else None,
        plan_code=plan.code if plan else None,
        amount=amount,
        currency=currency,
        status="pending",
        success_url=body.success_url,
        cancel_url=body.cancel_url,
        request_digest=request_digest,
    )


async def _retried_or_new(
    conn: Any, fresh: CheckoutRow, recent: RecentSessions, limit: int
) -> tuple[CheckoutRow, bool]:
    """(row, whether it is new). A retry of a request (same Idempotency-Key and body: the key
    was released when Stripe failed) gets the row its earlier attempt left `failed` or
    `pending`, while it asks Stripe for the same session (a debt repayment's debt may have
    changed since): its Stripe idempotency key replays the session Stripe may have made
    though its answer was lost, instead of making a second one. Otherwise `fresh`, within the
    rate limit (a reused row makes nothing new at Stripe and is not counted)."""
    if fresh.request_digest is not None:
        found = _detached(await _RETRYABLE.fetchrow(conn, request_digest=fresh.request_digest))
        if found is not None and all(
            getattr(found, column) == getattr(fresh, column) for column in _SAME_REQUEST
        ):
            if found.status != "pending":
                await _REOPEN.execute(conn, row_id=found.id)
                found.status = "pending"
            log.info("checkout.retried", checkout_id=str(found.id))
            return found, False
    enforce_stripe_rate_limit(recent, limit)
    return fresh, True


def _detached(record: Any) -> CheckoutRow | None:
    """A `CheckoutRow` from a row of `_LATEST_SUBSCRIPTION_CHECKOUT`, `_OPEN_REPAYMENT` or
    `_RETRYABLE`."""
    if record is None:
        return None
    return CheckoutRow(**{k: v for k, v in record.items() if k != "now"})


def _open_for(row: CheckoutRow, now: datetime) -> bool:
    return row.expires_at is not None and row.expires_at > now + REUSE_MARGIN


async def _retire(
    factory: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    settings: Settings,
    stale: CheckoutRow,
    customer: str,
) -> None:
    """Expire the channel's previous checkout (another plan), or the account's open debt
    repayment of another amount, so only one can be paid. What Stripe says of it is recorded
    at once, in a transaction of its own (it is true whatever happens to the new checkout)."""
    stripe_id = stale.stripe_id
    if stripe_id is None:  # never recorded: replay its creation to learn its id
        created = await gateway.create_checkout_session(
            stripe_params(stale, customer, settings), key=idempotency_key("checkout", stale.id)
        )
        stripe_id = str(created["id"])
        async with factory() as session, session.begin():
            await _record_created(session, stale.id, created)
    try:
        expired = await gateway.expire_checkout_session(stripe_id)
    except StripeRequestRejected:
        expired = await gateway.retrieve_checkout_session(stripe_id)
    async with factory() as session, session.begin():
        await _apply_stripe_state(session, stale.id, expired)
    if expired.get("status") == "complete":
        if stale.purpose == "debt_repayment":
            # It repaid (part of) the debt the new one asks for: asked again, the debt less
            # that repayment is asked for (`_PAID_REPAYMENTS`).
            raise NoDebt("The account's open debt repayment was just paid; ask again for any rest")
        raise SubscriptionExists("The channel's previous checkout was just completed")
    log.info("checkout.superseded", checkout_id=str(stale.id))


_CHECKOUTS = cast(Table, CheckoutSession.__table__)
_PENDING_COLUMNS = (
    "id",
    "account_id",
    "purpose",
    "channel_id",
    "plan_code",
    "amount",
    "currency",
    "status",
    "success_url",
    "cancel_url",
    "request_digest",
)
_SAME_REQUEST = tuple(column for column in _PENDING_COLUMNS if column not in ("id", "status"))
"""What a retry must ask of Stripe again for its earlier attempt's row to be reused."""
_INSERT_PENDING = DriverStatement(
    insert(_CHECKOUTS).values({column: bindparam(column) for column in _PENDING_COLUMNS})
)
_CHANNEL = bindparam("channel_id", type_=String)
_LIVE_SUBSCRIPTION = (
    select(Subscription.id)
    .where(
        Subscription.channel_id == _CHANNEL,
        Subscription.status.in_([literal(status) for status in LIVE_SUBSCRIPTION_STATUSES]),
        Subscription.access_revoked_at.is_(None),
    )
    .exists()
)
_PAID_CHECKOUT = (
    select(_CHECKOUTS.c.id)
    .where(
        _CHECKOUTS.c.channel_id == _CHANNEL,
        _CHECKOUTS.c.purpose == "subscription",
        _CHECKOUTS.c.status == literal("complete"),
        _CHECKOUTS.c.stripe_subscription_id.is_not(None),
        ~select(Subscription.id)
        .where(Subscription.stripe_id == _CHECKOUTS.c.stripe_subscription_id)
        .exists(),
    )
    .exists()
)
"""A subscription checkout of the channel that Stripe completed (learnt from its event or a
read of the session) whose subscription is not mirrored yet: Stripe has made that
subscription, so the channel has one (its events are late or out of order); once they
arrive, `_LIVE_SUBSCRIPTION` decides."""
_CHANNEL_SUBSCRIBED = DriverStatement(select(_LIVE_SUBSCRIPTION, _PAID_CHECKOUT))
"""(live, paid): whether the channel has a live subscription, or a paid checkout whose
subscription is not mirrored yet, in one round trip."""
_LATEST_SUBSCRIPTION_CHECKOUT = DriverStatement(
    select(*_CHECKOUTS.c, func.now().label("now"))
    .where(
        _CHECKOUTS.c.channel_id == _CHANNEL,
        _CHECKOUTS.c.purpose == "subscription",
        _CHECKOUTS.c.status.in_([literal("pending"), literal("open")]),
        _CHECKOUTS.c.fulfilled_at.is_(None),
        or_(
            _CHECKOUTS.c.created_at > func.now() - PENDING_REPLAY_WINDOW,
            _CHECKOUTS.c.expires_at > func.now(),
        ),
    )
    .order_by(_CHECKOUTS.c.created_at.desc())
    .limit(1)
)
"""The channel's newest subscription checkout that may still be paid (open until its
`expires_at`, up to Stripe's 24 hours, or pending and young enough for its Stripe
idempotency key to replay), with the database's clock."""
_RETRYABLE = DriverStatement(
    select(*_CHECKOUTS.c)
    .where(
        _CHECKOUTS.c.request_digest == bindparam("request_digest", type_=String),
        _CHECKOUTS.c.status.in_([literal("pending"), literal("failed")]),
        _CHECKOUTS.c.fulfilled_at.is_(None),
        _CHECKOUTS.c.created_at > func.now() - PENDING_REPLAY_WINDOW,
    )
    .order_by(_CHECKOUTS.c.created_at.desc())
    .limit(1)
)
"""The row an earlier attempt of the same request left without a Stripe answer, young enough
for its Stripe idempotency key to replay."""
_REOPEN = DriverStatement(
    update(_CHECKOUTS)
    .where(_CHECKOUTS.c.id == bindparam("row_id"), _CHECKOUTS.c.status == literal("failed"))
    .values(status=literal("pending"))
)
_LEDGER_TOTAL = DriverStatement(
    select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
        LedgerEntry.account_id == bindparam("account_id", type_=String)
    )
)

_OPEN_REPAYMENT = DriverStatement(
    select(*_CHECKOUTS.c, func.now().label("now"))
    .where(
        _CHECKOUTS.c.account_id == bindparam("account_id", type_=String),
        _CHECKOUTS.c.purpose == "debt_repayment",
        _CHECKOUTS.c.status.in_([literal("pending"), literal("open")]),
        _CHECKOUTS.c.payment_status.is_distinct_from(literal("paid")),
        _CHECKOUTS.c.fulfilled_at.is_(None),
        or_(
            _CHECKOUTS.c.created_at > func.now() - PENDING_REPLAY_WINDOW,
            _CHECKOUTS.c.expires_at > func.now(),
        ),
    )
    .order_by(_CHECKOUTS.c.created_at.desc())
    .limit(1)
)
"""The account's newest debt repayment that may still be paid (open until its `expires_at`,
or pending: its session being created at Stripe, young enough for its idempotency key to
replay), with the database's clock: a new repayment of the same debt returns it (a pending
one by replaying its creation with its key, so Stripe answers the same session), one of
another amount expires it first, so the account never has two payable repayments."""
_PAID_REPAYMENTS = DriverStatement(
    select(func.coalesce(func.sum(_CHECKOUTS.c.amount), 0)).where(
        _CHECKOUTS.c.account_id == bindparam("account_id", type_=String),
        _CHECKOUTS.c.purpose == literal_column("'debt_repayment'"),
        _CHECKOUTS.c.payment_status == literal_column("'paid'"),
        _CHECKOUTS.c.fulfilled_at.is_(None),
    )
)
"""The account's debt repayments Stripe reports paid (a read of the session) that no event
has credited yet: that debt is repaid, and a new repayment asks only for the rest. Read through
`ix_checkout_sessions_repayments_paid`, which holds only those (the constants are written in
the statement, not sent as parameters, so every plan of it can use that partial index), not
among every checkout the account made."""


def _pending_values(row: CheckoutRow) -> dict[str, Any]:
    return {column: getattr(row, column) for column in _PENDING_COLUMNS}


_STILL_OURS = _CHECKOUTS.c.status.in_([literal("pending"), literal("failed")])
_RECORD_CREATED = (
    update(_CHECKOUTS)
    .where(_CHECKOUTS.c.id == bindparam("row_id"))
    .values(
        stripe_id=bindparam("stripe_id"),
        url=bindparam("url"),
        expires_at=bindparam("expires_at"),
        status=case((_STILL_OURS, bindparam("new_status")), else_=_CHECKOUTS.c.status),
        payment_status=case(
            (_STILL_OURS, bindparam("new_payment_status")), else_=_CHECKOUTS.c.payment_status
        ),
    )
    .returning(*_CHECKOUTS.c)
)


async def _record_created(session: AsyncSession, row_id: uuid.UUID, created: StripeObject) -> None:
    """Store Stripe's id, URL and expiry; the status only while ours is still `pending` or
    `failed` (an event may already have moved it on)."""
    await session.execute(_RECORD_CREATED, _created_values(row_id, created))


_RECORDED = _RECORD_CREATED.cte("recorded")
_ANSWER_STORED = (
    STORE_ANSWER.where(
        select(_RECORDED.c.id)
        .where(
            _RECORDED.c.status == bindparam("new_status"),
            _RECORDED.c.payment_status.is_not_distinct_from(bindparam("new_payment_status")),
            _RECORDED.c.fulfilled_at.is_(None),
        )
        .exists()
    )
    .returning(literal(1))
    .cte("answer_stored")
)
_RECORD_WITH_ANSWER = DriverStatement(
    select(
        _RECORDED,
        select(func.count()).select_from(_ANSWER_STORED).scalar_subquery().label("answered"),
    )
)
"""`_RECORD_CREATED` and the request's answer stored under its Idempotency-Key, in one
statement; the answer only when the recorded row is as the answer says (`status`,
`payment_status`, not fulfilled), which it is unless a Stripe event moved the row on first."""


async def _record_with_answer(
    engine: AsyncEngine, row: CheckoutRow, created: StripeObject, claim: Claim
) -> CheckoutOut:
    """Record Stripe's answer and store the request's under its key: one statement, committed
    on its own, the request's one durable commit. The answer is rendered from the row as
    recording makes it while it is still ours; should an event have moved the row on first
    (it is then not stored), it is rendered from the recorded row and stored by one more."""
    values = _created_values(row.id, created)
    expected = to_out(
        replace(
            row,
            stripe_id=values["stripe_id"],
            url=values["url"],
            expires_at=values["expires_at"],
            status=values["new_status"],
            payment_status=values["new_payment_status"],
        )
    )
    async with driver_connection(engine) as conn:
        record = dict(
            await _RECORD_WITH_ANSWER.fetchrow(conn, **values, **claim.answer_params(201, expected))
        )
        if record.pop("answered"):
            claim.answered_as_given()
            return expected
        out = to_out(CheckoutRow(**record))
        await claim.answer(conn, 201, out)
        return out


def _created_values(row_id: uuid.UUID, created: StripeObject) -> dict[str, Any]:
    status = created.get("status") if created.get("status") in ("complete", "expired") else "open"
    return {
        "row_id": row_id,
        "stripe_id": created["id"],
        "url": created.get("url"),
        "expires_at": _timestamp(created.get("expires_at")),
        "new_status": status,
        "new_payment_status": created.get("payment_status"),
    }


async def _apply_stripe_state(
    session: AsyncSession, row_id: uuid.UUID, stripe_session: StripeObject
) -> CheckoutSession:
    """Merge Stripe's view of the session into the row by the event consumer's rules: the
    status and payment status only move forward, ids are kept once known (never
    `fulfilled_at`: only payment events set it). Stripe's answer may predate an event applied
    while it was in flight; a plain copy would move the session back to `open` for good."""
    row = await session.scalar(
        select(CheckoutSession)
        .where(CheckoutSession.id == row_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    assert row is not None
    theirs = stripe_session.get("status")
    if theirs in ("open", "complete", "expired"):
        row.status = rank_merge(CHECKOUT_STATUS_ORDER, row.status, theirs) or row.status
    row.payment_status = rank_merge(
        CHECKOUT_PAYMENT_ORDER, row.payment_status, stripe_session.get("payment_status")
    )
    row.stripe_subscription_id = row.stripe_subscription_id or ref(
        stripe_session.get("subscription")
    )
    row.stripe_payment_intent_id = row.stripe_payment_intent_id or ref(
        stripe_session.get("payment_intent")
    )
    await session.flush()
    return row


async def _mark_failed(factory: async_sessionmaker[AsyncSession], row_id: uuid.UUID) -> None:
    async with factory() as tx, tx.begin():
        await tx.execute(
            update(CheckoutSession)
            .where(CheckoutSession.id == row_id, CheckoutSession.status == "pending")
            .values(status="failed")
        )


def _timestamp(value: object) -> datetime | None:
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    return None
