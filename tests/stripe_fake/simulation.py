"""Things Stripe does on its own (customer pays, fees settle, renewals, refunds, disputes).

Every simulation method mutates state like Stripe would, appends the events Stripe would
send (in a plausible Stripe order) to ``self.events`` and returns the new events.
"""

from __future__ import annotations

import copy
from typing import Any

from .openapi import Json, load_spec
from .state import (
    _INTERVAL_SECONDS,
    RequestContext,
    StripeError,
    StripeState,
    check_amount_step,
    new_id,
)

_NULL_ADDRESS = {
    "city": None,
    "country": None,
    "line1": None,
    "line2": None,
    "postal_code": None,
    "state": None,
}


def normalize(obj: Json, schema_name: str | None = None) -> Json:
    """Fit a fixture-derived object to this API version's schema (top level).

    Drops keys the schema does not know (fixtures are a newer version) and adds required
    keys the fixture lacks (None if nullable, else a neutral value).
    """
    schema = load_spec()["components"]["schemas"].get(schema_name or obj["object"])
    if schema is None:
        return obj
    props: Json = schema.get("properties", {})
    for key in [k for k in obj if k not in props]:
        del obj[key]
    for key in schema.get("required", []):
        if key not in obj:
            prop = props.get(key, {})
            if prop.get("nullable"):
                obj[key] = None
            else:
                obj[key] = {
                    "integer": 0,
                    "number": 0,
                    "boolean": False,
                    "array": [],
                    "object": {},
                    "string": "",
                }.get(prop.get("type", ""))
    return obj


class StripeSimulation(StripeState):
    """State plus the Stripe-side lifecycle (simulation API used by tests)."""

    # ------------------------------------------------------------------ builders

    def _price(self, price_id: str) -> Json:
        return self.get("price", price_id, "price")

    def _build_payment_intent(
        self,
        *,
        amount: int,
        currency: str,
        customer: str | None,
        metadata: Json | None = None,
        status: str = "succeeded",
        description: str | None = None,
    ) -> Json:
        pi = self._new("payment_intent")
        pi.update(
            {
                "amount": amount,
                "amount_capturable": 0,
                "amount_details": {"tip": {}},
                "amount_received": amount if status == "succeeded" else 0,
                "automatic_payment_methods": None,
                "canceled_at": None,
                "cancellation_reason": None,
                "client_secret": f"{pi['id']}_secret_{new_id('event', 16)[4:]}",
                "currency": currency,
                "customer": customer,
                "description": description,
                "last_payment_error": None,
                "latest_charge": None,
                "metadata": dict(metadata or {}),
                "next_action": None,
                "payment_method": "pm_" + new_id("event", 24)[4:],
                "payment_method_configuration_details": None,
                "processing": None,
                "shipping": None,
                "status": status,
                "transfer_data": None,
                "payment_method_types": ["card"],
            }
        )
        return self._store(normalize(pi))

    def _build_charge(self, pi: Json, *, status: str = "succeeded") -> Json:
        ch = self._new("charge")
        ok = status == "succeeded"
        ch.update(
            {
                "amount": pi["amount"],
                "amount_captured": pi["amount"] if ok else 0,
                "amount_refunded": 0,
                "balance_transaction": None,
                "billing_details": {
                    "address": dict(_NULL_ADDRESS),
                    "email": None,
                    "name": None,
                    "phone": None,
                    "tax_id": None,
                },
                "captured": ok,
                "currency": pi["currency"],
                "customer": pi["customer"],
                "description": pi.get("description"),
                "disputed": False,
                "failure_code": None if status != "failed" else "card_declined",
                "failure_message": None if status != "failed" else "Your card was declined.",
                "metadata": copy.deepcopy(pi.get("metadata") or {}),
                "outcome": {
                    "advice_code": None,
                    "network_advice_code": None,
                    "network_decline_code": None,
                    "network_status": "approved_by_network" if ok else "declined_by_network",
                    "reason": None if ok else "generic_decline",
                    "risk_level": "normal",
                    "risk_score": 20,
                    "seller_message": "Payment complete."
                    if ok
                    else "The bank did not return any further details with this decline.",
                    "type": "authorized" if ok else "issuer_declined",
                },
                "paid": ok,
                "payment_intent": pi["id"],
                "payment_method": pi["payment_method"],
                "receipt_url": f"{self.public_url}/receipts/{ch['id']}",
                "refunded": False,
                "status": status,
                "transfer_data": None,
                "refunds": {
                    "object": "list",
                    "data": [],
                    "has_more": False,
                    "url": f"/v1/charges/{ch['id']}/refunds",
                },
            }
        )
        self._store(normalize(ch))
        pi["latest_charge"] = ch["id"]
        return ch

    def _build_subscription(
        self,
        customer: str,
        line_items: list[Json],
        *,
        metadata: Json,
        status: str,
        trial_days: int | None = None,
    ) -> Json:
        now = self.now()
        sub = self._new("subscription")
        items = []
        for li in line_items:
            price = self._price(li["price"])
            if not price.get("recurring"):
                continue
            si = self._new("subscription_item")
            rec = price["recurring"]
            period = _INTERVAL_SECONDS[rec["interval"]] * int(rec.get("interval_count") or 1)
            start = now
            si.update(
                {
                    "price": copy.deepcopy(price),
                    "quantity": int(li.get("quantity") or 1),
                    "subscription": sub["id"],
                    "current_period_start": start,
                    "current_period_end": now + (trial_days * 86400 if trial_days else period),
                    "billing_thresholds": None,
                    "discounts": [],
                    "tax_rates": [],
                    "created": now,
                }
            )
            si.pop("plan", None)
            items.append(si)
        trial_end = now + trial_days * 86400 if trial_days else None
        sub.update(
            {
                "billing_cycle_anchor": trial_end or now,
                "billing_cycle_anchor_config": None,
                "cancel_at": None,
                "canceled_at": None,
                "cancel_at_period_end": False,
                "cancellation_details": {"comment": None, "feedback": None, "reason": None},
                "currency": items[0]["price"]["currency"] if items else "usd",
                "customer": customer,
                "ended_at": None,
                "latest_invoice": None,
                "metadata": dict(metadata),
                "next_pending_invoice_item_invoice": None,
                "pause_collection": None,
                "pending_invoice_item_interval": None,
                "pending_update": None,
                "start_date": now,
                "status": status,
                "transfer_data": None,
                "trial_end": trial_end,
                "trial_start": now if trial_days else None,
                "billing_schedules": [],
                "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
                "items": {
                    "object": "list",
                    "data": items,
                    "has_more": False,
                    "total_count": len(items),
                    "url": f"/v1/subscription_items?subscription={sub['id']}",
                },
            }
        )
        return self._store(normalize(sub))

    def _build_invoice(
        self,
        customer: str,
        lines: list[Json],
        *,
        subscription: Json | None,
        billing_reason: str,
        status: str = "open",
        period: tuple[int, int] | None = None,
    ) -> Json:
        now = self.now()
        inv = self._new("invoice")
        cust = self.find(customer) or {}
        line_objs = []
        total = 0
        currency = "usd"
        for line in lines:
            price = self._price(line["price"])
            qty = int(line.get("quantity") or 1)
            amount = int(price.get("unit_amount") or 0) * qty
            if line.get("amount") is not None:
                amount = int(line["amount"])
            total += amount
            currency = price["currency"]
            start, end = line.get("period") or period or (now, now)
            line_objs.append(
                {
                    "id": new_id("invoice_line_item"),
                    "object": "line_item",
                    "amount": amount,
                    "currency": price["currency"],
                    "description": f"{qty} x {price['id']}",
                    "discount_amounts": [],
                    "discountable": True,
                    "discounts": [],
                    "invoice": inv["id"],
                    "livemode": False,
                    "metadata": {},
                    "period": {"start": start, "end": end},
                    "quantity": qty,
                    "subtotal": amount,
                    "pretax_credit_amounts": [],
                    "taxes": [],
                    "parent": {
                        "type": "subscription_item_details"
                        if subscription
                        else "invoice_item_details",
                        "invoice_item_details": None
                        if subscription
                        else {
                            "invoice_item": "ii_" + new_id("event", 24)[4:],
                            "proration": False,
                            "proration_details": {"credited_items": None},
                            "subscription": None,
                        },
                        "subscription_item_details": {
                            "invoice_item": None,
                            "proration": False,
                            "proration_details": {"credited_items": None},
                            "subscription": subscription["id"],
                            "subscription_item": line.get("subscription_item"),
                        }
                        if subscription
                        else None,
                    },
                    "pricing": {
                        "type": "price_details",
                        "unit_amount_decimal": str(price.get("unit_amount") or 0),
                        "price_details": {"price": price["id"], "product": price["product"]},
                    },
                }
            )
        start, end = period or (now, now)
        inv.update(
            {
                "account_name": "Fake Stripe Account",
                "account_tax_ids": None,
                "amount_due": total,
                "amount_paid": 0,
                "amount_remaining": total,
                "amount_overpaid": 0,
                "amount_paid_off_stripe": 0,
                "attempt_count": 0,
                "attempted": False,
                "auto_advance": True,
                "billing_reason": billing_reason,
                "currency": currency,
                "customer": customer,
                "customer_email": cust.get("email"),
                "customer_name": cust.get("name"),
                "customer_address": None,
                "customer_shipping": None,
                "due_date": None,
                "effective_at": now,
                "ending_balance": 0,
                "from_invoice": None,
                "hosted_invoice_url": f"{self.public_url}/invoices/{inv['id']}",
                "invoice_pdf": f"{self.public_url}/invoices/{inv['id']}/pdf",
                "last_finalization_error": None,
                "next_payment_attempt": None,
                "number": f"FAKE-{len(self.objects.get('invoice', {})) + 1:04d}",
                "period_start": start,
                "period_end": end,
                "shipping_cost": None,
                "shipping_details": None,
                "status": status,
                "status_transitions": {
                    "finalized_at": now,
                    "marked_uncollectible_at": None,
                    "paid_at": None,
                    "voided_at": None,
                },
                "subtotal": total,
                "subtotal_excluding_tax": total,
                "total": total,
                "total_excluding_tax": total,
                "total_taxes": [],
                "total_pretax_credit_amounts": [],
                "webhooks_delivered_at": now,
                "automatically_finalizes_at": None,
                "parent": {
                    "type": "subscription_details",
                    "quote_details": None,
                    "subscription_details": {
                        "metadata": copy.deepcopy(subscription["metadata"]),
                        "subscription": subscription["id"],
                    },
                }
                if subscription
                else None,
                "lines": {
                    "object": "list",
                    "data": line_objs,
                    "has_more": False,
                    "total_count": len(line_objs),
                    "url": f"/v1/invoices/{inv['id']}/lines",
                },
            }
        )
        if subscription:
            subscription["latest_invoice"] = inv["id"]
        return self._store(normalize(inv))

    def _build_invoice_payment(self, inv: Json, pi: Json) -> Json:
        ip = self._new("invoice_payment")
        ip.update(
            {
                "amount_paid": None,
                "amount_requested": inv["amount_due"],
                "currency": inv["currency"],
                "invoice": inv["id"],
                "is_default": True,
                "payment": {"type": "payment_intent", "payment_intent": pi["id"]},
                "status": "open",
                "status_transitions": {"canceled_at": None, "paid_at": None},
            }
        )
        return self._store(normalize(ip))

    def _session_lines(self, session_id: str) -> list[Json]:
        lines: list[Json] = self._session_extra.get(session_id, {}).get("line_items", [])
        return lines

    # ------------------------------------------------------------------ payments

    def _pay_invoice(self, inv: Json, pi: Json, ip: Json, ch: Json) -> list[Json]:
        now = self.now()
        events = []
        ch_prev = {"status": ch["status"], "paid": ch["paid"]}
        ch.update(
            {
                "status": "succeeded",
                "paid": True,
                "captured": True,
                "amount_captured": ch["amount"],
                "failure_code": None,
                "failure_message": None,
            }
        )
        pi.update(
            {"status": "succeeded", "amount_received": pi["amount"], "last_payment_error": None}
        )
        events.append(
            self._emit(
                "charge.succeeded", ch, ch_prev if ch_prev["status"] != "succeeded" else None
            )
        )
        ip.update({"status": "paid", "amount_paid": inv["amount_due"]})
        ip["status_transitions"]["paid_at"] = now
        events.append(self._emit("invoice_payment.paid", ip))
        inv.update(
            {
                "status": "paid",
                "amount_paid": inv["amount_due"],
                "amount_remaining": 0,
                "attempted": True,
                "attempt_count": inv["attempt_count"] + 1,
                "next_payment_attempt": None,
            }
        )
        inv["status_transitions"]["paid_at"] = now
        events.append(self._emit("invoice.paid", inv))
        return events

    def _fail_invoice(self, inv: Json, pi: Json, ch: Json) -> list[Json]:
        ch.update(
            {
                "status": "failed",
                "paid": False,
                "captured": False,
                "amount_captured": 0,
                "failure_code": "card_declined",
                "failure_message": "Your card was declined.",
            }
        )
        ch["outcome"].update(
            {
                "type": "issuer_declined",
                "reason": "generic_decline",
                "network_status": "declined_by_network",
            }
        )
        pi.update(
            {
                "status": "requires_payment_method",
                "amount_received": 0,
                "last_payment_error": {
                    "type": "card_error",
                    "code": "card_declined",
                    "decline_code": "generic_decline",
                    "message": "Your card was declined.",
                    "charge": ch["id"],
                },
            }
        )
        inv.update(
            {
                "attempted": True,
                "attempt_count": inv["attempt_count"] + 1,
                "next_payment_attempt": self.now() + 3 * 86400,
            }
        )
        return [self._emit("charge.failed", ch), self._emit("invoice.payment_failed", inv)]

    def complete_checkout(
        self,
        session_id: str,
        *,
        payment_status: str = "paid",
        subscription_status: str | None = None,
        email: str = "customer@example.com",
        name: str | None = "Jenny Rosen",
    ) -> list[Json]:
        """The customer finishes the hosted Checkout page.

        ``payment_status="unpaid"`` models a delayed payment method: the session completes
        unpaid and :meth:`async_payment_succeeded`/:meth:`async_payment_failed` follow.
        """
        with self._lock:
            start = len(self.events)
            session = self.get("checkout.session", session_id)
            if session["status"] != "open":
                raise StripeError(400, f"Checkout session {session_id} is {session['status']}")
            extra = self._session_extra.get(session_id, {})
            lines = self._session_lines(session_id)
            customer_id = session["customer"]
            if customer_id is None:
                customer_id = self.create_customer(
                    {"email": session.get("customer_email") or email, "name": name}
                )["id"]
            cust = self.get("customer", customer_id)
            if not cust.get("email"):  # Checkout sets the email entered on such a customer
                cust["email"] = email
            paid = payment_status == "paid"
            previous = {"status": "open"}
            session.update(
                {
                    "status": "complete",
                    "customer": customer_id,
                    "customer_details": {
                        "address": dict(_NULL_ADDRESS),
                        "email": cust["email"],
                        "name": cust["name"],
                        "phone": None,
                        "tax_exempt": "none",
                        "tax_ids": [],
                        "business_name": None,
                        "individual_name": None,
                    },
                    "payment_status": "paid" if paid else "unpaid",
                }
            )
            if session["mode"] == "subscription":
                sdata = extra.get("subscription_data") or {}
                trial_days = sdata.get("trial_period_days")
                status = subscription_status or (
                    "trialing" if trial_days else ("active" if paid else "incomplete")
                )
                sub = self._build_subscription(
                    customer_id,
                    lines,
                    metadata=sdata.get("metadata") or {},
                    status=status,
                    trial_days=trial_days,
                )
                session["subscription"] = sub["id"]
                inv_lines = []
                for item in sub["items"]["data"]:
                    inv_lines.append(
                        {
                            "price": item["price"]["id"],
                            "quantity": item["quantity"],
                            "subscription_item": item["id"],
                            "amount": 0 if trial_days else None,
                            "period": (item["current_period_start"], item["current_period_end"]),
                        }
                    )
                for li in lines:  # one-time prices go on the first invoice
                    if not self._price(li["price"]).get("recurring"):
                        inv_lines.append({"price": li["price"], "quantity": li.get("quantity")})
                inv = self._build_invoice(
                    customer_id,
                    inv_lines,
                    subscription=sub,
                    billing_reason="subscription_create",
                    period=(sub["start_date"], sub["start_date"]),
                )
                session["invoice"] = inv["id"]
                self._emit("customer.subscription.created", sub)
                if inv["amount_due"] == 0:
                    inv.update({"status": "paid"})
                    inv["status_transitions"]["paid_at"] = self.now()
                    self._emit("invoice.paid", inv)
                else:
                    pi = self._build_payment_intent(
                        amount=inv["amount_due"],
                        currency=inv["currency"],
                        customer=customer_id,
                        status="succeeded" if paid else "processing",
                        description="Subscription creation",
                    )
                    ch = self._build_charge(pi, status="succeeded" if paid else "pending")
                    ip = self._build_invoice_payment(inv, pi)
                    extra["payment"] = {
                        "invoice": inv["id"],
                        "payment_intent": pi["id"],
                        "invoice_payment": ip["id"],
                        "charge": ch["id"],
                    }
                    if paid:
                        self._pay_invoice(inv, pi, ip, ch)
                    else:
                        self._emit("charge.pending", ch)
            else:
                amount = int(session.get("amount_total") or 0)
                pdata = extra.get("payment_intent_data") or {}
                pi = self._build_payment_intent(
                    amount=amount,
                    currency=session["currency"] or "usd",
                    customer=customer_id,
                    metadata=pdata.get("metadata") or {},
                    status="succeeded" if paid else "processing",
                    description=pdata.get("description"),
                )
                ch = self._build_charge(pi, status="succeeded" if paid else "pending")
                session["payment_intent"] = pi["id"]
                extra["payment"] = {"payment_intent": pi["id"], "charge": ch["id"]}
                self._emit("charge.succeeded" if paid else "charge.pending", ch)
            self._session_extra.setdefault(session_id, extra)
            self._emit("checkout.session.completed", session, previous)
            return self.events_since(start)

    def _async_session(self, session_id: str) -> tuple[Json, Json]:
        session = self.get("checkout.session", session_id)
        payment = self._session_extra.get(session_id, {}).get("payment")
        if session["status"] != "complete" or session["payment_status"] != "unpaid" or not payment:
            raise StripeError(400, f"Checkout session {session_id} has no pending payment")
        return session, payment

    def async_payment_succeeded(self, session_id: str) -> list[Json]:
        """A delayed payment (e.g. SEPA) of a session completed ``unpaid`` succeeds."""
        with self._lock:
            start = len(self.events)
            session, payment = self._async_session(session_id)
            pi = self.get("payment_intent", payment["payment_intent"])
            ch = self.get("charge", payment["charge"])
            if "invoice" in payment:
                inv = self.get("invoice", payment["invoice"])
                ip = self.get("invoice_payment", payment["invoice_payment"])
                self._pay_invoice(inv, pi, ip, ch)
                sub = self.get("subscription", session["subscription"])
                if sub["status"] in {"incomplete", "past_due"}:
                    prev = {"status": sub["status"]}
                    sub["status"] = "active"
                    self._emit("customer.subscription.updated", sub, prev)
            else:
                ch.update(
                    {
                        "status": "succeeded",
                        "paid": True,
                        "captured": True,
                        "amount_captured": ch["amount"],
                    }
                )
                pi.update({"status": "succeeded", "amount_received": pi["amount"]})
                self._emit("charge.succeeded", ch, {"status": "pending"})
            session["payment_status"] = "paid"
            self._emit(
                "checkout.session.async_payment_succeeded", session, {"payment_status": "unpaid"}
            )
            return self.events_since(start)

    def async_payment_failed(self, session_id: str) -> list[Json]:
        """A delayed payment of a session completed ``unpaid`` fails."""
        with self._lock:
            start = len(self.events)
            session, payment = self._async_session(session_id)
            pi = self.get("payment_intent", payment["payment_intent"])
            ch = self.get("charge", payment["charge"])
            if "invoice" in payment:
                self._fail_invoice(self.get("invoice", payment["invoice"]), pi, ch)
            else:
                ch.update(
                    {
                        "status": "failed",
                        "paid": False,
                        "failure_code": "card_declined",
                        "failure_message": "Your card was declined.",
                    }
                )
                pi.update({"status": "requires_payment_method"})
                self._emit("charge.failed", ch, {"status": "pending"})
            self._emit("checkout.session.async_payment_failed", session)
            return self.events_since(start)

    def expire_checkout(self, session_id: str, ctx: RequestContext | None = None) -> list[Json]:
        """The session expires (or is expired through the API)."""
        with self._lock:
            start = len(self.events)
            session = self.get("checkout.session", session_id, "session")
            if session["status"] != "open":
                raise StripeError(
                    400,
                    f'Only Checkout Sessions with a status in ["open"] can be expired. '
                    f'This Checkout Session has a status of "{session["status"]}".',
                    param="session",
                )
            session.update({"status": "expired", "url": None})
            self._emit("checkout.session.expired", session, {"status": "open"}, ctx=ctx)
            return self.events_since(start)

    def decline_checkout(
        self, session_id: str, *, authentication_required: bool = False
    ) -> list[Json]:
        """The customer's card is declined on the hosted Checkout page; the session stays open.

        A plain decline emits ``payment_intent.created``, ``charge.failed`` and
        ``payment_intent.payment_failed``. With ``authentication_required`` the bank asks for
        3-D Secure and the customer fails it: ``payment_intent.created``,
        ``payment_intent.requires_action``, ``payment_intent.payment_failed`` (no charge).
        In subscription mode nothing else is created: Checkout only creates the subscription
        once a payment succeeds.
        """
        with self._lock:
            start = len(self.events)
            session = self.get("checkout.session", session_id)
            if session["status"] != "open":
                raise StripeError(400, f"Checkout session {session_id} is {session['status']}")
            extra = self._session_extra.get(session_id, {})
            metadata = (extra.get("payment_intent_data") or {}).get("metadata") or {}
            if session["mode"] == "subscription":
                metadata = {}
            pi = self._build_payment_intent(
                amount=int(session.get("amount_total") or 0),
                currency=session["currency"] or "usd",
                customer=session.get("customer"),
                metadata=metadata,
                status="requires_payment_method",
            )
            self._emit("payment_intent.created", pi)
            if authentication_required:
                pi["status"] = "requires_action"
                pi["next_action"] = {
                    "type": "use_stripe_sdk",
                    "use_stripe_sdk": {"type": "three_d_secure_redirect"},
                }
                self._emit("payment_intent.requires_action", pi)
                pi.update(
                    {
                        "status": "requires_payment_method",
                        "next_action": None,
                        "last_payment_error": {
                            "type": "invalid_request_error",
                            "code": "payment_intent_authentication_failure",
                            "message": "The provided PaymentMethod has failed authentication. "
                            "You can provide payment_method_data or a new PaymentMethod to "
                            "attempt to fulfill this PaymentIntent again.",
                        },
                    }
                )
            else:
                ch = self._build_charge(pi, status="failed")
                pi["last_payment_error"] = {
                    "type": "card_error",
                    "code": "card_declined",
                    "decline_code": "generic_decline",
                    "message": "Your card was declined.",
                    "charge": ch["id"],
                }
                self._emit("charge.failed", ch)
            self._emit("payment_intent.payment_failed", pi)
            return self.events_since(start)

    def attach_payment_method(self, customer_id: str, *, last4: str = "4242") -> list[Json]:
        """The customer saves a new card (Customer Portal): it becomes the invoice default.

        Emits ``payment_method.attached`` then ``customer.updated``.
        """
        with self._lock:
            start = len(self.events)
            cust = self.get("customer", customer_id)
            pm = self._new("payment_method", customer=customer_id, metadata={})
            pm["card"]["last4"] = last4
            pm["billing_details"]["email"] = cust.get("email")
            self._store(normalize(pm))
            self._emit("payment_method.attached", pm)
            previous = {"invoice_settings": copy.deepcopy(cust["invoice_settings"])}
            cust["invoice_settings"]["default_payment_method"] = pm["id"]
            self._emit("customer.updated", cust, previous)
            return self.events_since(start)

    def pay_invoice(self, invoice_id: str) -> list[Json]:
        """An open invoice (e.g. a failed renewal) is paid now with the customer's card.

        Emits ``charge.succeeded``, ``invoice_payment.paid``, ``invoice.paid`` and, when the
        subscription was ``past_due``/``unpaid``, ``customer.subscription.updated`` (active).
        """
        with self._lock:
            start = len(self.events)
            inv = self.get("invoice", invoice_id)
            if inv["status"] != "open":
                raise StripeError(400, f"Invoice is already {inv['status']}.", param="invoice")
            ip = next(
                (
                    p
                    for p in self.objects.get("invoice_payment", {}).values()
                    if p["invoice"] == inv["id"]
                ),
                None,
            )
            if ip is None:
                pi = self._build_payment_intent(
                    amount=inv["amount_due"],
                    currency=inv["currency"],
                    customer=inv["customer"],
                    status="processing",
                )
                ip = self._build_invoice_payment(inv, pi)
            else:
                pi = self.get("payment_intent", ip["payment"]["payment_intent"])
            ch = self._build_charge(pi, status="pending")
            self._pay_invoice(inv, pi, ip, ch)
            parent = (inv.get("parent") or {}).get("subscription_details") or {}
            sub = self.find(parent.get("subscription") or "")
            if sub is not None and sub["status"] in {"past_due", "unpaid"}:
                prev = {"status": sub["status"]}
                sub["status"] = "active"
                self._emit("customer.subscription.updated", sub, prev)
            return self.events_since(start)

    # ------------------------------------------------------------------ balance

    def _balance_transaction(
        self,
        *,
        amount: int,
        currency: str,
        fee: int,
        source: str,
        type_: str,
        reporting_category: str,
        description: str | None,
        exchange_rate: float | None = None,
    ) -> Json:
        txn = self._new("balance_transaction")
        txn.update(
            {
                "amount": amount,
                "currency": currency,
                "fee": fee,
                "net": amount - fee,
                "exchange_rate": exchange_rate,
                "available_on": self.now() + 2 * 86400,
                "description": description,
                "source": source,
                "type": type_,
                "reporting_category": reporting_category,
                "status": "pending",
                "fee_details": [
                    {
                        "amount": fee,
                        "application": None,
                        "currency": currency,
                        "description": "Stripe processing fees",
                        "type": "stripe_fee",
                    }
                ]
                if fee
                else [],
                "balance_type": "payments",
            }
        )
        return self._store(normalize(txn))

    def settle_charge(
        self,
        charge_id: str,
        fee: int = 0,
        exchange_rate: float | None = None,
        currency: str | None = None,
    ) -> list[Json]:
        """The charge's balance transaction appears (fee known); emits ``charge.updated``.

        With ``exchange_rate`` the transaction is in ``currency`` (default "eur"), amount
        converted; ``fee`` is then in that settlement currency.
        """
        with self._lock:
            start = len(self.events)
            ch = self.get("charge", charge_id)
            amount = ch["amount"]
            cur = ch["currency"]
            if exchange_rate is not None:
                amount = round(amount * exchange_rate)
                cur = currency or "eur"
            elif currency is not None:
                cur = currency
            txn = self._balance_transaction(
                amount=amount,
                currency=cur,
                fee=fee,
                source=ch["id"],
                type_="charge",
                reporting_category="charge",
                description=ch.get("description"),
                exchange_rate=exchange_rate,
            )
            prev = {"balance_transaction": ch["balance_transaction"]}
            ch["balance_transaction"] = txn["id"]
            self._emit("charge.updated", ch, prev)
            return self.events_since(start)

    # ------------------------------------------------------------------ subscriptions

    def _sub_period_end(self, sub: Json) -> int | None:
        ends = [i["current_period_end"] for i in sub["items"]["data"]]
        return max(ends) if ends else None

    def _change_subscription(
        self, sub: Json, changes: dict[str, Any], ctx: RequestContext | None = None
    ) -> Json | None:
        """Apply field changes with Stripe's side effects; emit the updated event."""
        previous: Json = {}

        def put(key: str, value: Any) -> None:
            if sub.get(key) != value:
                previous.setdefault(key, copy.deepcopy(sub.get(key)))
                sub[key] = value

        now = self.now()
        for key, value in changes.items():
            if key == "metadata":
                from .state import _metadata_update

                put("metadata", _metadata_update(sub.get("metadata") or {}, value))
            elif key == "cancel_at_period_end":
                put("cancel_at_period_end", bool(value))
                put("cancel_at", self._sub_period_end(sub) if value else None)
                put("canceled_at", now if value else None)
                put(
                    "cancellation_details",
                    {
                        "comment": None,
                        "feedback": None,
                        "reason": "cancellation_requested" if value else None,
                    },
                )
            elif key == "cancel_at":
                if value in ("", None):
                    put("cancel_at", None)
                    put("canceled_at", None)
                    put("cancel_at_period_end", False)
                    put("cancellation_details", {"comment": None, "feedback": None, "reason": None})
                else:
                    if value in {"max_period_end", "min_period_end", "max_billed_until"}:
                        value = self._sub_period_end(sub)
                    put("cancel_at", int(value))
                    put("canceled_at", now)
                    put(
                        "cancellation_details",
                        {"comment": None, "feedback": None, "reason": "cancellation_requested"},
                    )
            elif key == "trial_end":
                if value == "now":
                    put("trial_end", now)
                    if sub["status"] == "trialing":
                        put("status", "active")
                else:
                    put("trial_end", int(value))
                    if sub.get("trial_start") is None:
                        put("trial_start", now)
                    if sub["status"] in {"active", "trialing"} and int(value) > now:
                        # An active subscription starts a trial now: its period is the trial
                        # (from now to trial_end), where the billing cycle is anchored anew.
                        if sub["status"] == "active":
                            put("trial_start", now)
                        put("status", "trialing")
                        items = copy.deepcopy(sub["items"])
                        for item in sub["items"]["data"]:
                            if sub["status"] == "trialing" and previous.get("status") == "active":
                                item["current_period_start"] = now
                            item["current_period_end"] = int(value)
                        previous.setdefault("items", items)
                        put("billing_cycle_anchor", int(value))
            elif key == "cancellation_details":
                put(
                    "cancellation_details",
                    {
                        "comment": None,
                        "feedback": None,
                        "reason": sub["cancellation_details"]["reason"],
                        **dict(value or {}),
                    },
                )
            elif key in {"proration_behavior", "expand", "proration_date", "payment_behavior"}:
                continue
            elif key == "items":
                items_prev = copy.deepcopy(sub["items"])
                changed = False
                for change in value:
                    item = next(
                        (i for i in sub["items"]["data"] if i["id"] == change.get("id")), None
                    )
                    if item is None:
                        item = sub["items"]["data"][0] if sub["items"]["data"] else None
                    if item is None:
                        continue
                    if change.get("price"):
                        item["price"] = copy.deepcopy(self._price(change["price"]))
                        changed = True
                    if change.get("quantity") is not None:
                        item["quantity"] = int(change["quantity"])
                        changed = True
                    if "metadata" in change:
                        from .state import _metadata_update

                        item["metadata"] = _metadata_update(item["metadata"], change["metadata"])
                        changed = True
                if changed:
                    previous.setdefault("items", items_prev)
            else:
                put(key, None if value == "" else value)
        if not previous:
            return None
        return self._emit("customer.subscription.updated", sub, previous, ctx=ctx)

    def update_subscription(self, sub_id: str, **changes: Any) -> list[Json]:
        """Stripe-side change (e.g. the customer cancels in the portal).

        Accepts API-like keys (``cancel_at_period_end``, ``cancel_at``, ``trial_end``,
        ``metadata``, ``items``) and raw fields (``status="past_due"``).
        """
        with self._lock:
            start = len(self.events)
            self._change_subscription(self.get("subscription", sub_id), changes)
            return self.events_since(start)

    def switch_interval(self, sub_id: str, price_id: str) -> list[Json]:
        """The customer switches to a price of another interval (Customer Portal, prorated):
        Stripe resets the billing cycle to now and invoices at once (`subscription_update`):
        the new price's period less the unused time of the old one. A positive total is
        charged; a negative one is paid by nothing (`amount_due` 0) and goes to the customer's
        credit balance (`ending_balance`), which pays the next invoices.

        Emits ``customer.subscription.updated``, ``invoice.created`` and either the payment's
        events (``charge.succeeded``, ``invoice_payment.paid``, ``invoice.paid``) or just
        ``invoice.paid``.
        """
        with self._lock:
            start = len(self.events)
            sub = self.get("subscription", sub_id)
            now = self.now()
            price = self._price(price_id)
            item = sub["items"]["data"][0]
            old = item["price"]
            old_length = item["current_period_end"] - item["current_period_start"]
            unused = int(old["unit_amount"] or 0) * max(0, item["current_period_end"] - now)
            credit = unused // old_length if old_length else 0
            rec = price["recurring"] or {"interval": "month", "interval_count": 1}
            length = _INTERVAL_SECONDS[rec["interval"]] * int(rec.get("interval_count") or 1)
            previous: Json = {"items": copy.deepcopy(sub["items"])}
            item["price"] = copy.deepcopy(price)
            item["current_period_start"] = now
            item["current_period_end"] = now + length
            previous["latest_invoice"] = sub["latest_invoice"]
            total = int(price["unit_amount"] or 0) - credit
            inv = self._build_invoice(
                sub["customer"],
                [{"price": price_id, "amount": total, "period": (now, now + length)}],
                subscription=sub,
                billing_reason="subscription_update",
                period=(now, now),
            )
            self._emit("customer.subscription.updated", sub, previous)
            if total <= 0:
                inv.update({"amount_due": 0, "amount_remaining": 0, "ending_balance": total})
            self._emit("invoice.created", inv)
            if total > 0:
                pi = self._build_payment_intent(
                    amount=total,
                    currency=inv["currency"],
                    customer=sub["customer"],
                    status="processing",
                    description="Subscription update",
                )
                ch = self._build_charge(pi, status="pending")
                ip = self._build_invoice_payment(inv, pi)
                self._pay_invoice(inv, pi, ip, ch)
            else:
                inv.update({"status": "paid", "attempted": True})
                inv["status_transitions"]["paid_at"] = now
                self._emit("invoice.paid", inv)
            return self.events_since(start)

    def delete_subscription(
        self,
        sub_id: str,
        *,
        reason: str = "cancellation_requested",
        ctx: RequestContext | None = None,
    ) -> list[Json]:
        """The subscription ends now; emits ``customer.subscription.deleted``."""
        with self._lock:
            start = len(self.events)
            sub = self.get("subscription", sub_id, "subscription_exposed_id")
            if sub["status"] in {"canceled", "incomplete_expired"}:
                raise StripeError(
                    404, f"No such subscription: '{sub_id}'", param="id", code="resource_missing"
                )
            now = self.now()
            previous = {
                "status": sub["status"],
                "ended_at": None,
                "canceled_at": sub["canceled_at"],
            }
            sub.update(
                {"status": "canceled", "ended_at": now, "canceled_at": sub["canceled_at"] or now}
            )
            sub["cancellation_details"] = {
                **sub["cancellation_details"],
                "reason": sub["cancellation_details"]["reason"] or reason,
            }
            self._emit("customer.subscription.deleted", sub, previous, ctx=ctx)
            return self.events_since(start)

    def renew_subscription(self, sub_id: str, *, paid: bool = True) -> list[Json]:
        """The billing period rolls over: periods move on, a cycle invoice is charged.

        paid → ``invoice.paid``; failed → ``invoice.payment_failed`` and ``past_due``.
        A subscription set to cancel at period end is deleted instead.
        """
        with self._lock:
            start = len(self.events)
            sub = self.get("subscription", sub_id)
            if sub["status"] == "canceled":
                raise StripeError(400, f"Subscription {sub_id} is canceled")
            period_end = self._sub_period_end(sub) or self.now()
            if sub.get("cancel_at") is not None and sub["cancel_at"] <= period_end:
                return self.delete_subscription(sub_id)
            prev_items = copy.deepcopy(sub["items"])
            lines = []
            for item in sub["items"]["data"]:
                rec = item["price"]["recurring"] or {"interval": "month", "interval_count": 1}
                length = _INTERVAL_SECONDS[rec["interval"]] * int(rec.get("interval_count") or 1)
                item["current_period_start"] = item["current_period_end"]
                item["current_period_end"] = item["current_period_start"] + length
                lines.append(
                    {
                        "price": item["price"]["id"],
                        "quantity": item["quantity"],
                        "subscription_item": item["id"],
                        "period": (item["current_period_start"], item["current_period_end"]),
                    }
                )
            previous: Json = {"items": prev_items}
            if sub["status"] == "trialing":
                previous["status"] = "trialing"
                sub["status"] = "active"
            previous["latest_invoice"] = sub["latest_invoice"]
            inv = self._build_invoice(
                sub["customer"],
                lines,
                subscription=sub,
                billing_reason="subscription_cycle",
                period=(period_end, period_end),
            )
            self._emit("customer.subscription.updated", sub, previous)
            self._emit("invoice.created", inv)
            pi = self._build_payment_intent(
                amount=inv["amount_due"],
                currency=inv["currency"],
                customer=sub["customer"],
                status="processing",
                description="Subscription update",
            )
            ch = self._build_charge(pi, status="pending")
            ip = self._build_invoice_payment(inv, pi)
            if paid:
                self._pay_invoice(inv, pi, ip, ch)
            else:
                self._fail_invoice(inv, pi, ch)
                if sub["status"] != "past_due":
                    prev_status = sub["status"]
                    sub["status"] = "past_due"
                    self._emit("customer.subscription.updated", sub, {"status": prev_status})
            return self.events_since(start)

    # ------------------------------------------------------------------ refunds

    def create_refund(self, params: Json, ctx: RequestContext | None = None) -> Json:
        """POST /v1/refunds semantics; emits ``refund.created`` and ``charge.refunded``."""
        with self._lock:
            if params.get("charge"):
                ch = self.get("charge", params["charge"], "charge")
            elif params.get("payment_intent"):
                pi = self.get("payment_intent", params["payment_intent"], "payment_intent")
                if not pi.get("latest_charge"):
                    raise StripeError(
                        400,
                        "This PaymentIntent does not have a successful charge to refund.",
                        param="payment_intent",
                    )
                ch = self.get("charge", pi["latest_charge"])
            else:
                raise StripeError(
                    400,
                    "One of the following params should be provided for "
                    "this request: payment_intent or charge.",
                )
            if ch["status"] != "succeeded":
                raise StripeError(400, f"Charge {ch['id']} has not succeeded.", param="charge")
            remaining = ch["amount"] - ch["amount_refunded"]
            amount = int(params.get("amount") or remaining)
            if ch["amount_refunded"] >= ch["amount"]:
                raise StripeError(
                    400,
                    f"Charge {ch['id']} has already been refunded.",
                    code="charge_already_refunded",
                )
            check_amount_step(amount, ch["currency"], "amount")
            if amount > remaining:
                raise StripeError(
                    400,
                    f"Refund amount ({amount}) is greater than unrefunded amount on "
                    f"charge ({remaining})",
                    param="amount",
                )
            txn = self._balance_transaction(
                amount=-amount,
                currency=ch["currency"],
                fee=0,
                source="",
                type_="refund",
                reporting_category="refund",
                description="REFUND FOR CHARGE",
            )
            refund = self._new("refund")
            refund.update(
                {
                    "amount": amount,
                    "balance_transaction": txn["id"],
                    "charge": ch["id"],
                    "currency": ch["currency"],
                    "payment_intent": ch["payment_intent"],
                    "reason": params.get("reason"),
                    "receipt_number": None,
                    "metadata": dict(params.get("metadata") or {}),
                    "status": "succeeded",
                    "destination_details": {
                        "type": "card",
                        "card": {
                            "type": "refund",
                        },
                    },
                    "source_transfer_reversal": None,
                    "transfer_reversal": None,
                }
            )
            txn["source"] = refund["id"]
            self._store(normalize(refund))
            prev = {"amount_refunded": ch["amount_refunded"], "refunded": ch["refunded"]}
            ch["amount_refunded"] += amount
            ch["refunded"] = ch["amount_refunded"] >= ch["amount"]
            self._emit("refund.created", refund, ctx=ctx)
            self._emit("charge.refunded", ch, prev, ctx=ctx)
            return refund

    def fail_refund(
        self, refund_id: str, failure_reason: str = "expired_or_canceled_card"
    ) -> list[Json]:
        """The refund fails at the bank; emits ``refund.updated`` (status failed)."""
        with self._lock:
            start = len(self.events)
            refund = self.get("refund", refund_id)
            prev = {"status": refund["status"], "failure_reason": None}
            txn = self._balance_transaction(
                amount=refund["amount"],
                currency=refund["currency"],
                fee=0,
                source=refund["id"],
                type_="refund_failure",
                reporting_category="refund_failure",
                description="REFUND FAILURE",
            )
            refund.update(
                {
                    "status": "failed",
                    "failure_reason": failure_reason,
                    "failure_balance_transaction": txn["id"],
                }
            )
            ch = self.get("charge", refund["charge"])
            ch["amount_refunded"] = max(0, ch["amount_refunded"] - refund["amount"])
            ch["refunded"] = False
            self._emit("refund.updated", refund, prev)
            return self.events_since(start)

    # ------------------------------------------------------------------ disputes

    def create_dispute(
        self,
        charge_id: str,
        *,
        amount: int | None = None,
        reason: str = "fraudulent",
        status: str = "needs_response",
    ) -> list[Json]:
        """The cardholder disputes the charge; emits ``charge.dispute.created``."""
        with self._lock:
            start = len(self.events)
            ch = self.get("charge", charge_id)
            dp = self._new("dispute")
            dp.update(
                {
                    "amount": amount if amount is not None else ch["amount"],
                    "charge": ch["id"],
                    "currency": ch["currency"],
                    "payment_intent": ch["payment_intent"],
                    "reason": reason,
                    "status": status,
                    "balance_transactions": [],
                    "is_charge_refundable": False,
                }
            )
            dp["evidence_details"]["due_by"] = self.now() + 7 * 86400
            self._store(normalize(dp))
            ch["disputed"] = True
            self._emit("charge.dispute.created", dp)
            return self.events_since(start)

    def withdraw_dispute_funds(self, dispute_id: str, fee: int = 1500) -> list[Json]:
        """Funds (plus a dispute fee) leave the balance: ``charge.dispute.funds_withdrawn``."""
        with self._lock:
            start = len(self.events)
            dp = self.get("dispute", dispute_id)
            txn = self._balance_transaction(
                amount=-dp["amount"],
                currency=dp["currency"],
                fee=fee,
                source=dp["id"],
                type_="adjustment",
                reporting_category="dispute",
                description=f"Chargeback withdrawal for {dp['charge']}",
            )
            dp["balance_transactions"].append(copy.deepcopy(txn))
            self._emit("charge.dispute.funds_withdrawn", dp)
            return self.events_since(start)

    def close_dispute(
        self, dispute_id: str, won: bool, ctx: RequestContext | None = None
    ) -> list[Json]:
        """Dispute decided: ``charge.dispute.closed`` (+ ``funds_reinstated`` when won)."""
        with self._lock:
            start = len(self.events)
            dp = self.get("dispute", dispute_id, "dispute")
            prev = {"status": dp["status"]}
            dp["status"] = "won" if won else "lost"
            if won and dp["balance_transactions"]:
                txn = self._balance_transaction(
                    amount=dp["amount"],
                    currency=dp["currency"],
                    fee=0,
                    source=dp["id"],
                    type_="adjustment",
                    reporting_category="dispute_reversal",
                    description=f"Chargeback reversal for {dp['charge']}",
                )
                dp["balance_transactions"].append(copy.deepcopy(txn))
            self._emit("charge.dispute.closed", dp, prev, ctx=ctx)
            if won and len(dp["balance_transactions"]) > 1:
                self._emit("charge.dispute.funds_reinstated", dp)
            return self.events_since(start)
