"""Stripe REST operations on top of the simulation (no HTTP; params already validated)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

from .openapi import Json
from .simulation import StripeSimulation, normalize
from .state import (
    MAXIMUM_CHARGE,
    RequestContext,
    StripeError,
    _metadata_update,
    check_amount_step,
    new_id,
)

Handler = Callable[[dict[str, str], Json, RequestContext], tuple[int, Json]]

_EMAIL = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")


def _check_email(params: Json) -> None:
    """Stripe refuses a customer email that is not an address it can send to, e.g. a domain
    without a dot ("Invalid email address: test@test", `email_invalid`)."""
    email = params.get("email")
    if email and not _EMAIL.match(email):
        raise StripeError(
            400, f"Invalid email address: {email}", param="email", code="email_invalid"
        )


class StripeSimulator(StripeSimulation):
    """Stripe's API operations + simulation, without any transport.

    ``call(method, template, path_params, params, ctx)`` runs one validated request;
    :class:`~tests.stripe_fake.server.StripeFake` adds HTTP, validation and idempotency.
    """

    def __init__(self, public_url: str = "http://127.0.0.1") -> None:
        super().__init__(public_url)
        self._handlers: dict[tuple[str, str], Handler] = {}
        self._register()

    # ------------------------------------------------------------------ dispatch

    def call(
        self,
        method: str,
        template: str,
        path_params: dict[str, str],
        params: Json,
        ctx: RequestContext | None = None,
    ) -> tuple[int, Json]:
        handler = self._handlers.get((method.lower(), template))
        if handler is None:
            raise StripeError(
                404,
                f"Unrecognized request URL ({method.upper()}: {template}). "
                "The Stripe fake does not implement this operation.",
                code="not_implemented",
            )
        with self._lock:
            status, body = handler(path_params, params, ctx or RequestContext())
            body = copy.deepcopy(body)
            expand = params.get("expand") or []
            for path in expand:
                body = self._expand(body, path.split("."))
            return status, body

    def implemented_operations(self) -> list[tuple[str, str]]:
        return sorted(self._handlers)

    def _expand(self, node: Any, parts: list[str]) -> Any:
        if not parts or not isinstance(node, dict):
            return node
        head, rest = parts[0], parts[1:]
        if head == "payments" and node.get("object") == "invoice":
            payments = [
                ip
                for ip in self.objects.get("invoice_payment", {}).values()
                if ip["invoice"] == node["id"]
            ]
            node["payments"] = {
                "object": "list",
                "data": copy.deepcopy(payments),
                "has_more": False,
                "total_count": len(payments),
                "url": f"/v1/invoices/{node['id']}/payments",
            }
            node["payments"] = self._expand(node["payments"], ["data", *rest])
            return node
        if head not in node:
            return node
        value = node[head]
        if isinstance(value, list):
            node[head] = [self._expand(self._resolve(v), rest) for v in value]
        else:
            node[head] = self._expand(self._resolve(value), rest)
        return node

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, str):
            target = self._by_id.get(value)
            if target is not None:
                return copy.deepcopy(target)
        return value

    # ------------------------------------------------------------------ lists

    def _list(self, items: list[Json], params: Json, url: str) -> tuple[int, Json]:
        ordered = list(reversed(items))
        ordered.sort(key=lambda o: o.get("created") or 0, reverse=True)
        created = params.get("created")
        if isinstance(created, int):
            ordered = [o for o in ordered if o.get("created") == created]
        elif isinstance(created, dict):
            ops = {
                "gt": lambda a, b: a > b,
                "gte": lambda a, b: a >= b,
                "lt": lambda a, b: a < b,
                "lte": lambda a, b: a <= b,
            }
            for op, bound in created.items():
                ordered = [o for o in ordered if ops[op](o.get("created") or 0, int(bound))]
        limit = int(params.get("limit") or 10)
        if not 1 <= limit <= 100:
            raise StripeError(400, "Invalid limit: must be between 1 and 100", param="limit")
        ids = [o["id"] for o in ordered]
        if params.get("starting_after"):
            cursor = params["starting_after"]
            if cursor not in ids:
                raise StripeError(
                    404,
                    f"No such object: '{cursor}'",
                    param="starting_after",
                    code="resource_missing",
                )
            rest = ordered[ids.index(cursor) + 1 :]
            page, has_more = rest[:limit], len(rest) > limit
        elif params.get("ending_before"):
            cursor = params["ending_before"]
            if cursor not in ids:
                raise StripeError(
                    404,
                    f"No such object: '{cursor}'",
                    param="ending_before",
                    code="resource_missing",
                )
            before = ordered[: ids.index(cursor)]
            page, has_more = before[-limit:], len(before) > limit
        else:
            page, has_more = ordered[:limit], len(ordered) > limit
        return 200, {"object": "list", "data": page, "has_more": has_more, "url": url}

    def _filtered(self, object_type: str, params: Json, fields: dict[str, str]) -> list[Json]:
        """Objects of a type where each ``param -> field`` given in params matches."""
        items = list(self.objects.get(object_type, {}).values())
        for param, field in fields.items():
            if params.get(param) not in (None, ""):
                items = [o for o in items if o.get(field) == params[param]]
        return items

    def _get(self, object_type: str, param: str) -> Handler:
        def handler(pp: dict[str, str], params: Json, ctx: RequestContext) -> tuple[int, Json]:
            return 200, self.get(object_type, pp[param], param)

        return handler

    def _lister(self, object_type: str, url: str, fields: dict[str, str] | None = None) -> Handler:
        def handler(pp: dict[str, str], params: Json, ctx: RequestContext) -> tuple[int, Json]:
            return self._list(self._filtered(object_type, params, fields or {}), params, url)

        return handler

    # ------------------------------------------------------------------ registry

    def _register(self) -> None:
        h = self._handlers
        # customers
        h[("post", "/v1/customers")] = lambda pp, p, ctx: (200, self._customer_create(p, ctx))
        h[("get", "/v1/customers")] = self._lister("customer", "/v1/customers", {"email": "email"})
        h[("get", "/v1/customers/search")] = self._customer_search
        h[("get", "/v1/customers/{customer}")] = self._customer_get
        h[("post", "/v1/customers/{customer}")] = self._customer_update
        h[("delete", "/v1/customers/{customer}")] = self._customer_delete
        # checkout
        h[("post", "/v1/checkout/sessions")] = self._session_create
        h[("get", "/v1/checkout/sessions")] = self._lister(
            "checkout.session",
            "/v1/checkout/sessions",
            {
                "customer": "customer",
                "payment_intent": "payment_intent",
                "subscription": "subscription",
                "status": "status",
            },
        )
        h[("get", "/v1/checkout/sessions/{session}")] = self._get("checkout.session", "session")
        h[("post", "/v1/checkout/sessions/{session}")] = self._session_update
        h[("post", "/v1/checkout/sessions/{session}/expire")] = self._session_expire
        h[("get", "/v1/checkout/sessions/{session}/line_items")] = self._session_line_items
        # billing portal
        h[("post", "/v1/billing_portal/sessions")] = self._portal_session_create
        h[("post", "/v1/billing_portal/configurations")] = self._portal_config_create
        h[("get", "/v1/billing_portal/configurations")] = self._lister(
            "billing_portal.configuration",
            "/v1/billing_portal/configurations",
            {"active": "active", "is_default": "is_default"},
        )
        h[("get", "/v1/billing_portal/configurations/{configuration}")] = self._get(
            "billing_portal.configuration", "configuration"
        )
        h[("post", "/v1/billing_portal/configurations/{configuration}")] = (
            self._portal_config_update
        )
        # catalog
        h[("get", "/v1/prices")] = self._price_list
        h[("get", "/v1/prices/{price}")] = self._get("price", "price")
        h[("post", "/v1/prices")] = self._price_create
        h[("get", "/v1/products")] = self._lister("product", "/v1/products", {"active": "active"})
        h[("get", "/v1/products/{id}")] = self._get("product", "id")
        h[("post", "/v1/products")] = lambda pp, p, ctx: (
            200,
            self.add_product(id=p.get("id"), name=p["name"], metadata=p.get("metadata") or None),
        )
        # subscriptions
        h[("get", "/v1/subscriptions")] = self._subscription_list
        h[("get", "/v1/subscriptions/{subscription_exposed_id}")] = self._get(
            "subscription", "subscription_exposed_id"
        )
        h[("post", "/v1/subscriptions/{subscription_exposed_id}")] = self._subscription_update
        h[("delete", "/v1/subscriptions/{subscription_exposed_id}")] = self._subscription_cancel
        # invoices
        h[("get", "/v1/invoices")] = self._lister(
            "invoice", "/v1/invoices", {"customer": "customer", "status": "status"}
        )
        h[("get", "/v1/invoices/{invoice}")] = self._get("invoice", "invoice")
        h[("get", "/v1/invoice_payments")] = self._invoice_payment_list
        h[("get", "/v1/invoice_payments/{invoice_payment}")] = self._get(
            "invoice_payment", "invoice_payment"
        )
        # payments
        h[("get", "/v1/payment_intents")] = self._lister(
            "payment_intent", "/v1/payment_intents", {"customer": "customer"}
        )
        h[("get", "/v1/payment_intents/{intent}")] = self._get("payment_intent", "intent")
        h[("get", "/v1/charges")] = self._lister(
            "charge", "/v1/charges", {"customer": "customer", "payment_intent": "payment_intent"}
        )
        h[("get", "/v1/charges/{charge}")] = self._get("charge", "charge")
        h[("get", "/v1/balance_transactions")] = self._lister(
            "balance_transaction",
            "/v1/balance_transactions",
            {"source": "source", "type": "type", "currency": "currency"},
        )
        h[("get", "/v1/balance_transactions/{id}")] = self._get("balance_transaction", "id")
        # refunds
        h[("post", "/v1/refunds")] = lambda pp, p, ctx: (200, self.create_refund(p, ctx))
        h[("get", "/v1/refunds")] = self._lister(
            "refund", "/v1/refunds", {"charge": "charge", "payment_intent": "payment_intent"}
        )
        h[("get", "/v1/refunds/{refund}")] = self._get("refund", "refund")
        h[("post", "/v1/refunds/{refund}")] = self._metadata_updater("refund", "refund")
        # disputes
        h[("get", "/v1/disputes")] = self._lister(
            "dispute", "/v1/disputes", {"charge": "charge", "payment_intent": "payment_intent"}
        )
        h[("get", "/v1/disputes/{dispute}")] = self._get("dispute", "dispute")
        h[("post", "/v1/disputes/{dispute}")] = self._metadata_updater("dispute", "dispute")
        h[("post", "/v1/disputes/{dispute}/close")] = self._dispute_close
        # events
        h[("get", "/v1/events")] = self._event_list
        h[("get", "/v1/events/{id}")] = self._get("event", "id")
        # webhook endpoints
        h[("post", "/v1/webhook_endpoints")] = self._webhook_create
        h[("get", "/v1/webhook_endpoints")] = self._lister(
            "webhook_endpoint", "/v1/webhook_endpoints"
        )
        h[("get", "/v1/webhook_endpoints/{webhook_endpoint}")] = self._get(
            "webhook_endpoint", "webhook_endpoint"
        )
        h[("post", "/v1/webhook_endpoints/{webhook_endpoint}")] = self._webhook_update
        h[("delete", "/v1/webhook_endpoints/{webhook_endpoint}")] = self._webhook_delete

    # ------------------------------------------------------------------ customers

    def _customer_create(self, params: Json, ctx: RequestContext) -> Json:
        _check_email(params)
        customer_id = self.create_customer(params, ctx)["id"]
        return self.objects["customer"][customer_id]

    def _customer_get(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        cust = self.get("customer", pp["customer"], "customer")
        if cust.get("deleted"):
            return 200, {"id": cust["id"], "object": "customer", "deleted": True}
        return 200, cust

    def _customer_update(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        cust = self.get("customer", pp["customer"], "customer")
        _check_email(params)
        previous = self._apply_simple(
            cust,
            params,
            [
                "email",
                "name",
                "phone",
                "description",
                "metadata",
                "address",
                "preferred_locales",
                "tax_exempt",
                "shipping",
            ],
        )
        if isinstance(params.get("invoice_settings"), dict):
            before = copy.deepcopy(cust["invoice_settings"])
            cust["invoice_settings"].update(
                {k: (None if v == "" else v) for k, v in params["invoice_settings"].items()}
            )
            if before != cust["invoice_settings"]:
                previous["invoice_settings"] = before
        if previous:
            self._emit("customer.updated", cust, previous, ctx=ctx)
        return 200, cust

    def _customer_delete(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        cust = self.get("customer", pp["customer"], "customer")
        if cust.get("deleted"):
            raise StripeError(
                404, f"No such customer: '{cust['id']}'", param="id", code="resource_missing"
            )
        self._emit("customer.deleted", cust, ctx=ctx)
        cust["deleted"] = True
        return 200, {"id": cust["id"], "object": "customer", "deleted": True}

    def _customer_search(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        query: str = params.get("query", "")
        items = [c for c in self.objects.get("customer", {}).values() if not c.get("deleted")]
        for clause in re.split(r"\s+AND\s+", query.strip(), flags=re.IGNORECASE):
            m = re.match(r"^metadata\[['\"](.+?)['\"]\]\s*:\s*['\"](.*)['\"]$", clause)
            if m:
                key, value = m.groups()
                items = [c for c in items if (c.get("metadata") or {}).get(key) == value]
                continue
            m = re.match(r"^(email|name|phone)\s*:\s*['\"](.*)['\"]$", clause)
            if m:
                fld, value = m.groups()
                items = [c for c in items if c.get(fld) == value]
                continue
            raise StripeError(
                400, f"The Stripe fake cannot parse search query: {clause!r}", param="query"
            )
        limit = int(params.get("limit") or 10)
        items = list(reversed(items))
        return 200, {
            "object": "search_result",
            "data": items[:limit],
            "has_more": len(items) > limit,
            "next_page": None,
            "url": "/v1/customers/search",
        }

    # ------------------------------------------------------------------ checkout

    def _session_create(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        mode = params.get("mode")
        if mode not in {"payment", "subscription"}:
            raise StripeError(
                400, "The Stripe fake supports mode=payment|subscription", param="mode"
            )
        line_items = params.get("line_items") or []
        if not line_items:
            raise StripeError(
                400, f"`line_items` is required in `{mode}` mode.", param="line_items"
            )
        if params.get("customer"):
            cust = self.get("customer", params["customer"], "customer")
            if cust.get("deleted"):
                raise StripeError(
                    400,
                    f"No such customer: '{cust['id']}'",
                    param="customer",
                    code="resource_missing",
                )
        if params.get("customer") and params.get("customer_email"):
            raise StripeError(
                400,
                "You may only specify one of these parameters: customer, customer_email.",
                param="customer_email",
            )
        lines: list[Json] = []
        amount = 0
        currency: str | None = None
        has_recurring = False
        for i, li in enumerate(line_items):
            if li.get("price"):
                price = self.get("price", li["price"], f"line_items[{i}][price]")
            elif li.get("price_data"):
                price = self._price_from_data(li["price_data"])
            else:
                raise StripeError(
                    400,
                    "You must specify either `price` or `price_data`.",
                    param=f"line_items[{i}]",
                )
            if currency and price["currency"] != currency:
                raise StripeError(
                    400, "All line items must use the same currency.", param=f"line_items[{i}]"
                )
            currency = price["currency"]
            has_recurring = has_recurring or bool(price.get("recurring"))
            qty = int(li.get("quantity") or 1)
            amount += int(price.get("unit_amount") or 0) * qty
            lines.append({"price": price["id"], "quantity": qty})
        if mode == "subscription" and not has_recurring:
            raise StripeError(
                400,
                "You must provide at least one recurring price in "
                "`subscription` mode when using prices.",
                param="line_items",
            )
        if mode == "payment" and has_recurring:
            raise StripeError(
                400,
                "You specified `payment` mode but passed a recurring "
                "price. Either switch to `subscription` mode or use only "
                "one-time prices.",
                param="line_items",
            )
        minimum = self.minimum_charge.get(currency or "")
        if mode == "payment" and minimum is not None and amount < minimum:
            raise StripeError(
                400,
                "The Checkout Session's total amount due must add up to at least "
                f"{minimum} {currency} (minor units).",
                param="line_items",
                code="amount_too_small",
            )
        if mode == "payment" and amount > MAXIMUM_CHARGE:
            raise StripeError(
                400,
                f"Amount must be no more than {MAXIMUM_CHARGE} {currency} (minor units).",
                param="line_items",
                code="amount_too_large",
            )
        if mode == "payment":
            check_amount_step(amount, currency or "", "line_items")
        if params.get("ui_mode", "hosted_page") == "hosted_page" and not params.get("success_url"):
            raise StripeError(400, "Missing required param: success_url.", param="success_url")
        now = self.now()
        expires_at = params.get("expires_at") or now + 24 * 3600
        if not now + 30 * 60 <= expires_at <= now + 24 * 3600:
            raise StripeError(
                400,
                "The `expires_at` timestamp must be between 30 minutes "
                "and 24 hours from Checkout Session creation.",
                param="expires_at",
            )
        session = self._new("checkout.session")
        session.update(
            {
                "after_expiration": None,
                "allow_promotion_codes": params.get("allow_promotion_codes"),
                "amount_subtotal": amount,
                "amount_total": amount,
                "billing_address_collection": params.get("billing_address_collection"),
                "cancel_url": params.get("cancel_url"),
                "client_reference_id": params.get("client_reference_id"),
                "collected_information": None,
                "consent": None,
                "consent_collection": None,
                "currency": currency,
                "currency_conversion": None,
                "custom_text": {
                    "after_submit": None,
                    "shipping_address": None,
                    "submit": None,
                    "terms_of_service_acceptance": None,
                },
                "customer": params.get("customer"),
                "customer_creation": None
                if params.get("customer") or mode == "subscription"
                else "if_required",
                "customer_details": None,
                "customer_email": params.get("customer_email"),
                "expires_at": expires_at,
                "invoice": None,
                "invoice_creation": None,
                "locale": params.get("locale"),
                "metadata": dict(params.get("metadata") or {}),
                "mode": mode,
                "payment_intent": None,
                "payment_method_collection": "always" if mode == "subscription" else None,
                "payment_method_configuration_details": None,
                "payment_method_types": params.get("payment_method_types") or ["card"],
                "payment_status": "unpaid",
                "saved_payment_method_options": None,
                "shipping_address_collection": None,
                "shipping_cost": None,
                "status": "open",
                "subscription": None,
                "success_url": params.get("success_url"),
                "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
                "ui_mode": params.get("ui_mode", "hosted_page"),
                "adaptive_pricing": None,
                "discounts": [],
                "wallet_options": None,
                "managed_payments": None,
                "submit_type": params.get("submit_type"),
            }
        )
        session["url"] = f"{self.public_url}/checkout/{session['id']}"
        self._store(normalize(session))
        self._session_extra[session["id"]] = {
            "line_items": lines,
            "subscription_data": params.get("subscription_data") or {},
            "payment_intent_data": params.get("payment_intent_data") or {},
        }
        return 200, session

    def _session_update(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        session = self.get("checkout.session", pp["session"], "session")
        self._apply_simple(session, params, ["metadata"])
        return 200, session

    def _session_expire(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        self.expire_checkout(pp["session"], ctx)
        return 200, self.get("checkout.session", pp["session"])

    def _session_line_items(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        self.get("checkout.session", pp["session"], "session")
        items = []
        for line in self._session_extra.get(pp["session"], {}).get("line_items", []):
            price = self.get("price", line["price"])
            amount = int(price.get("unit_amount") or 0) * line["quantity"]
            items.append(
                {
                    "id": line.setdefault("id", new_id("line_item")),
                    "object": "item",
                    "amount_discount": 0,
                    "amount_subtotal": amount,
                    "amount_tax": 0,
                    "amount_total": amount,
                    "currency": price["currency"],
                    "description": (self.find(price["product"]) or {}).get("name", ""),
                    "price": copy.deepcopy(price),
                    "quantity": line["quantity"],
                    "metadata": {},
                    "created": self.now(),
                }
            )
        return self._list(items, params, f"/v1/checkout/sessions/{pp['session']}/line_items")

    # ------------------------------------------------------------------ billing portal

    def _default_portal_config(self) -> Json:
        for cfg in self.objects.get("billing_portal.configuration", {}).values():
            if cfg["is_default"]:
                return cfg
        return self._portal_config({"features": {}}, is_default=True)

    def _portal_config(self, params: Json, *, is_default: bool = False) -> Json:
        cfg = self._new(
            "billing_portal.configuration",
            is_default=is_default,
            active=True,
            application=None,
            updated=self.now(),
            default_return_url=params.get("default_return_url"),
            metadata=dict(params.get("metadata") or {}),
            name=params.get("name"),
        )
        self._merge_portal_params(cfg, params)
        return self._store(normalize(cfg))

    @staticmethod
    def _merge_portal_params(cfg: Json, params: Json) -> None:
        def merge(target: Json, src: Json) -> None:
            for key, value in src.items():
                if isinstance(value, dict) and isinstance(target.get(key), dict):
                    merge(target[key], value)
                else:
                    target[key] = None if value == "" else value

        for key in ("business_profile", "features", "login_page"):
            if isinstance(params.get(key), dict):
                target = cfg.setdefault(key, {})
                merge(target, params[key])
        for key in ("default_return_url", "name", "active"):
            if key in params:
                cfg[key] = None if params[key] == "" else params[key]
        if "metadata" in params:
            cfg["metadata"] = _metadata_update(cfg.get("metadata") or {}, params["metadata"])

    def _portal_config_create(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        return 200, self._portal_config(params)

    def _portal_config_update(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        cfg = self.get("billing_portal.configuration", pp["configuration"], "configuration")
        self._merge_portal_params(cfg, params)
        cfg["updated"] = self.now()
        return 200, cfg

    def _portal_session_create(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        cust = self.get("customer", params["customer"], "customer")
        if params.get("configuration"):
            cfg = self.get("billing_portal.configuration", params["configuration"], "configuration")
        else:
            cfg = self._default_portal_config()
        return_url = params.get("return_url") or cfg.get("default_return_url")
        session = self._new(
            "billing_portal.session",
            configuration=cfg["id"],
            customer=cust["id"],
            flow=None,
            locale=params.get("locale"),
            on_behalf_of=None,
            return_url=return_url,
            customer_account=None,
        )
        if params.get("flow_data"):
            self._session_extra[session["id"]] = {"flow_data": params["flow_data"]}
        session["url"] = f"{self.public_url}/billing_portal/{session['id']}"
        return 200, self._store(normalize(session))

    # ------------------------------------------------------------------ catalog

    def _price_list(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        items = self._filtered(
            "price",
            params,
            {"active": "active", "product": "product", "type": "type", "currency": "currency"},
        )
        if params.get("lookup_keys"):
            items = [p for p in items if p.get("lookup_key") in params["lookup_keys"]]
        interval = (params.get("recurring") or {}).get("interval")
        if interval:
            items = [p for p in items if (p.get("recurring") or {}).get("interval") == interval]
        return self._list(items, params, "/v1/prices")

    def _price_create(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        data = dict(params)
        if not data.get("product") and not data.get("product_data"):
            raise StripeError(
                400, "You must specify either `product` or `product_data`.", param="product"
            )
        price = self._price_from_data(data)
        price.update(
            {
                "active": params.get("active", True),
                "nickname": params.get("nickname"),
                "lookup_key": params.get("lookup_key"),
                "metadata": dict(params.get("metadata") or {}),
            }
        )
        return 200, price

    # ------------------------------------------------------------------ subscriptions

    def _subscription_list(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        items = self._filtered("subscription", params, {"customer": "customer"})
        status = params.get("status")
        if status in (None, ""):
            items = [s for s in items if s["status"] not in {"canceled", "incomplete_expired"}]
        elif status == "ended":
            items = [s for s in items if s["status"] in {"canceled", "incomplete_expired"}]
        elif status != "all":
            items = [s for s in items if s["status"] == status]
        if params.get("price"):
            items = [
                s
                for s in items
                if any(i["price"]["id"] == params["price"] for i in s["items"]["data"])
            ]
        return self._list(items, params, "/v1/subscriptions")

    def _subscription_update(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        sub = self.get("subscription", pp["subscription_exposed_id"], "subscription_exposed_id")
        if sub["status"] in {"canceled", "incomplete_expired"}:
            raise StripeError(
                400,
                "A canceled subscription can only update its cancellation_details and metadata.",
            )
        supported = {
            "cancel_at_period_end",
            "cancel_at",
            "trial_end",
            "metadata",
            "proration_behavior",
            "items",
            "cancellation_details",
            "description",
            "default_payment_method",
            "expand",
            "proration_date",
            "payment_behavior",
        }
        unsupported = sorted(set(params) - supported)
        if unsupported:
            raise StripeError(
                400,
                f"The Stripe fake does not simulate updating "
                f"{', '.join(unsupported)} on subscriptions.",
                param=unsupported[0],
            )
        if (
            "cancel_at" in params
            and params.get("cancel_at_period_end") is not None
            and params["cancel_at"] != ""
        ):
            raise StripeError(
                400,
                "You may only specify one of these parameters: cancel_at, cancel_at_period_end.",
                param="cancel_at",
            )
        self._change_subscription(sub, dict(params), ctx)
        return 200, sub

    def _subscription_cancel(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        sub_id = pp["subscription_exposed_id"]
        sub = self.get("subscription", sub_id, "subscription_exposed_id")
        details = params.get("cancellation_details") or {}
        if details:
            sub["cancellation_details"] = {
                **sub["cancellation_details"],
                **{k: (None if v == "" else v) for k, v in details.items()},
            }
        self.delete_subscription(sub_id, ctx=ctx)
        return 200, sub

    # ------------------------------------------------------------------ invoices

    def _invoice_payment_list(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        items = self._filtered(
            "invoice_payment", params, {"invoice": "invoice", "status": "status"}
        )
        payment = params.get("payment") or {}
        if payment.get("payment_intent"):
            items = [
                i for i in items if i["payment"].get("payment_intent") == payment["payment_intent"]
            ]
        return self._list(items, params, "/v1/invoice_payments")

    # ------------------------------------------------------------------ misc

    def _metadata_updater(self, object_type: str, param: str) -> Handler:
        def handler(pp: dict[str, str], params: Json, ctx: RequestContext) -> tuple[int, Json]:
            obj = self.get(object_type, pp[param], param)
            self._apply_simple(obj, params, ["metadata"])
            return 200, obj

        return handler

    def _dispute_close(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        self.close_dispute(pp["dispute"], won=False, ctx=ctx)
        return 200, self.get("dispute", pp["dispute"])

    def _event_list(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        items = list(self.events)
        if params.get("type"):
            pattern = re.compile("^" + re.escape(params["type"]).replace(r"\*", ".*") + "$")
            items = [e for e in items if pattern.match(e["type"])]
        if params.get("types"):
            if params.get("type"):
                raise StripeError(
                    400, "You may pass either `type` or `types`, but not both.", param="types"
                )
            items = [e for e in items if e["type"] in params["types"]]
        return self._list(items, params, "/v1/events")

    def _webhook_create(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        we = self._new(
            "webhook_endpoint",
            url=params["url"],
            enabled_events=params["enabled_events"],
            description=params.get("description"),
            api_version=params.get("api_version"),
            application=None,
            metadata=dict(params.get("metadata") or {}),
            status="enabled",
        )
        secret = "whsec_" + new_id("event", 32)[4:]
        self._webhook_secrets[we["id"]] = secret
        self._store(normalize(we))
        return 200, {**we, "secret": secret}

    def _webhook_update(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        we = self.get("webhook_endpoint", pp["webhook_endpoint"], "webhook_endpoint")
        self._apply_simple(we, params, ["url", "enabled_events", "description", "metadata"])
        if "disabled" in params:
            we["status"] = "disabled" if params["disabled"] else "enabled"
        return 200, we

    def _webhook_delete(
        self, pp: dict[str, str], params: Json, ctx: RequestContext
    ) -> tuple[int, Json]:
        we = self.get("webhook_endpoint", pp["webhook_endpoint"], "webhook_endpoint")
        del self.objects["webhook_endpoint"][we["id"]]
        self._by_id.pop(we["id"], None)
        return 200, {"id": we["id"], "object": "webhook_endpoint", "deleted": True}

    def webhook_secret(self, endpoint_id: str) -> str:
        """The ``whsec_...`` signing secret of a webhook endpoint created via the API."""
        return self._webhook_secrets[endpoint_id]
