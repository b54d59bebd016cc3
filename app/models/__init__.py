"""ORM models; importing this package registers every table on `Base.metadata`."""

from app.db import Base
from app.models.accounts import Account, Channel
from app.models.billing import (
    AccessChange,
    Activity,
    CheckoutSession,
    IdempotencyRecord,
    LedgerEntry,
)
from app.models.maintenance import MaintenanceExtension, MaintenanceWindow
from app.models.notifications import OutboxEmail
from app.models.portal import PortalSession
from app.models.refunds import (
    DisputeEffect,
    RefundExecution,
    RefundRequest,
    RefundRequestAudit,
    RefundRequestResponse,
)
from app.models.stripe_mirror import (
    Dispute,
    Invoice,
    Payment,
    Refund,
    StripeEvent,
    Subscription,
)

__all__ = [
    "AccessChange",
    "Account",
    "Activity",
    "Base",
    "Channel",
    "CheckoutSession",
    "Dispute",
    "DisputeEffect",
    "IdempotencyRecord",
    "Invoice",
    "LedgerEntry",
    "MaintenanceExtension",
    "MaintenanceWindow",
    "OutboxEmail",
    "Payment",
    "PortalSession",
    "Refund",
    "RefundExecution",
    "RefundRequest",
    "RefundRequestAudit",
    "RefundRequestResponse",
    "StripeEvent",
    "Subscription",
]
