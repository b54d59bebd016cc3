"""Stripe Customer Portal sessions and the portal configuration the policy implies.

A portal session is offered once the account has had its first successful Stripe payment
(`accounts.first_paid_at`, set by the payment event handlers); before that 409
`portal_unavailable`. Sessions use `STRIPE_PORTAL_CONFIGURATION_ID` when set (made by
`billing portal-config`), else the account's default configuration at Stripe.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import structlog
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.accounts.service import ensure_account
from app.auth import Principal
from app.config import Settings
from app.errors import BillingError, PortalUnavailable
from app.models import Account, PortalSession
from app.portal.schemas import PortalSessionIn, PortalSessionOut
from app.rate_limit import check_stripe_rate_limit
from app.redirects import check_redirects
from app.stripe_gateway import StripeGateway, StripeObject, idempotency_key

log = structlog.get_logger()


async def create_portal_session(
    session: AsyncSession,
    factory: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    settings: Settings,
    principal: Principal,
    account_id: str,
    body: PortalSessionIn,
) -> PortalSessionOut:
    check_redirects(settings.redirect_allowed_origins, return_url=body.return_url)
    async with factory() as tx, tx.begin():
        await ensure_account(tx, account_id, principal.email)
        account = await tx.scalar(select(Account).where(Account.id == account_id).with_for_update())
        assert account is not None
        if account.first_paid_at is None or not account.stripe_customer_id:
            raise PortalUnavailable(
                "The Customer Portal is available after the first successful payment"
            )
        customer = account.stripe_customer_id
        await check_stripe_rate_limit(
            tx, account_id, settings.stripe_sessions_per_account_per_minute
        )
        row = PortalSession(
            id=uuid.uuid4(),
            account_id=account_id,
            principal_sub=principal.sub,
            status="pending",
            return_url=body.return_url,
        )
        tx.add(row)
    try:
        created = await gateway.create_portal_session(
            customer=customer,
            return_url=body.return_url,
            configuration=settings.stripe_portal_configuration_id,
            key=idempotency_key("portal", row.id),
        )
    except BillingError:
        async with factory() as tx, tx.begin():
            await tx.execute(
                update(PortalSession).where(PortalSession.id == row.id).values(status="failed")
            )
        raise
    await session.execute(
        update(PortalSession)
        .where(PortalSession.id == row.id)
        .values(status="created", stripe_id=created["id"], url=created["url"])
    )
    log.info("portal_session.created", account_id=account_id, portal_session_id=str(row.id))
    return PortalSessionOut(id=str(row.id), url=str(created["url"]), return_url=body.return_url)


# --- the portal configuration (`billing portal-config`) ---------------------------------------


async def portal_configuration_params(
    gateway: StripeGateway, settings: Settings, *, headline: str | None = None
) -> dict[str, Any]:
    """What policy section 2 allows in the portal: update the payment method, see invoices,
    cancel at the period end without proration, switch among the catalog's plans with proration.
    Resuming a subscription set to cancel is built into the portal. The portal offers no
    one-off payments (top-ups and debt repayments go through Checkout)."""
    products: dict[str, list[str]] = {}
    for plan in settings.plans:
        price = await gateway.retrieve_price(plan.stripe_price_id)
        product = price["product"]
        product_id = product["id"] if isinstance(product, dict) else str(product)
        products.setdefault(product_id, []).append(plan.stripe_price_id)
    params: dict[str, Any] = {
        "features": {
            "customer_update": {"enabled": True, "allowed_updates": ["email", "address"]},
            "payment_method_update": {"enabled": True},
            "invoice_history": {"enabled": True},
            "subscription_cancel": {
                "enabled": True,
                "mode": "at_period_end",
                "proration_behavior": "none",
            },
            "subscription_update": {
                "enabled": True,
                "default_allowed_updates": ["price"],
                "proration_behavior": "create_prorations",
                "products": [
                    {"product": product_id, "prices": prices}
                    for product_id, prices in products.items()
                ],
            },
        },
        "metadata": {"managed_by": "1msg-billing"},
    }
    if headline:
        params["business_profile"] = {"headline": headline}
    if settings.redirect_allowed_origins:
        params["default_return_url"] = settings.redirect_allowed_origins[0]
    return params


async def apply_portal_configuration(
    gateway: StripeGateway,
    settings: Settings,
    *,
    configuration_id: str | None = None,
    headline: str | None = None,
) -> StripeObject:
    """Create the portal configuration, or update `configuration_id` (default:
    `STRIPE_PORTAL_CONFIGURATION_ID`) to match the policy."""
    params = await portal_configuration_params(gateway, settings, headline=headline)
    target = configuration_id or settings.stripe_portal_configuration_id
    if target:
        return await gateway.update_portal_configuration(target, params)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:32]
    return await gateway.create_portal_configuration(
        params, key=idempotency_key("portal-configuration", digest)
    )
