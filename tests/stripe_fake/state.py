"""In-memory Stripe state shared by the API handlers and the simulation methods.

All public methods are thread-safe (one RLock).
"""

from __future__ import annotations

import copy
import secrets
import string
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .openapi import Json, fixture, load_spec

API_VERSION = "2026-05-27.dahlia"

MINIMUM_CHARGE: dict[str, int] = {
    "usd": 50, "aed": 200, "aud": 50, "bgn": 100, "brl": 50, "cad": 50, "chf": 50,
    "czk": 1500, "dkk": 250, "eur": 50, "gbp": 30, "hkd": 400, "huf": 17500, "inr": 50,
    "jpy": 50, "mxn": 1000, "myr": 200, "nok": 300, "nzd": 50, "pln": 200, "ron": 200,
    "sek": 300, "sgd": 50, "thb": 1000,
}  # fmt: skip
"""Stripe's smallest charge per presentment currency, in minor units
(docs.stripe.com/currencies#minimum-and-maximum-charge-amounts). Tests may raise one to play
a charge that is below the minimum once converted to the settlement currency."""

THREE_DECIMAL_CURRENCIES = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})


def amount_step(currency: str) -> int:
    """What Stripe's charges and refunds in `currency` must be a multiple of (minor units): the
    last digit of a three-decimal currency's amount must be 0, and ISK is charged in whole
    krónur (docs.stripe.com/currencies, three-decimal currencies and special cases)."""
    if currency in THREE_DECIMAL_CURRENCIES:
        return 10
    return 100 if currency == "isk" else 1


def check_amount_step(amount: int, currency: str, param: str) -> None:
    """Stripe's 400 for an amount that is not a multiple of `amount_step`."""
    step = amount_step(currency)
    if amount % step:
        raise StripeError(
            400,
            f"Invalid amount: amounts in {currency.upper()} must be evenly divisible by {step}.",
            param=param,
            code="invalid_charge_amount_no_decimal_compatible" if currency == "isk" else None,
        )


MAXIMUM_CHARGE = 99_999_999
"""Stripe's largest charge: eight digits in minor units, e.g. 999,999.99 USD
(docs.stripe.com/currencies#minimum-and-maximum-charge-amounts); a Checkout session for more
is refused with `amount_too_large`."""

PREFIXES: dict[str, str] = {
    "customer": "cus_",
    "checkout.session": "cs_test_",
    "subscription": "sub_",
    "subscription_item": "si_",
    "invoice": "in_",
    "invoice_payment": "inpay_",
    "payment_intent": "pi_",
    "charge": "ch_",
    "balance_transaction": "txn_",
    "refund": "re_",
    "dispute": "dp_",
    "billing_portal.session": "bps_",
    "billing_portal.configuration": "bpc_",
    "event": "evt_",
    "webhook_endpoint": "we_",
    "price": "price_",
    "product": "prod_",
    "line_item": "li_",
    "payment_method": "pm_",
    "invoice_line_item": "il_",
}

_INTERVAL_SECONDS = {"day": 86400, "week": 7 * 86400, "month": 30 * 86400, "year": 365 * 86400}
_ALNUM = string.ascii_letters + string.digits


def new_id(object_type: str, length: int = 24) -> str:
    return PREFIXES[object_type] + "".join(secrets.choice(_ALNUM) for _ in range(length))


class StripeError(Exception):
    """An API error answered in Stripe's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        extra: Json | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.extra = extra or {}

    def body(self) -> Json:
        error: Json = {"type": self.type, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        if self.code is not None:
            error["code"] = self.code
        error.update(self.extra)
        return {"error": error}


def missing(object_type: str, object_id: str, param: str = "id") -> StripeError:
    return StripeError(
        404,
        f"No such {object_type.split('.')[-1]}: '{object_id}'",
        param=param,
        code="resource_missing",
    )


def _metadata_update(current: Json, value: Any) -> Json:
    """Stripe's metadata semantics: merge, "" value deletes a key, "" clears everything."""
    if value == "" or value is None:
        return {}
    merged = dict(current)
    for key, val in dict(value).items():
        if val == "":
            merged.pop(key, None)
        else:
            merged[key] = str(val)
    return merged


@dataclass
class RequestContext:
    """Who asked: becomes an event's ``request`` field."""

    request_id: str | None = None
    idempotency_key: str | None = None


class StripeState:
    """Stripe's objects and events, plus helpers shared by the API and the simulation."""

    def __init__(self, public_url: str = "http://127.0.0.1") -> None:
        self.public_url = public_url
        self._lock = threading.RLock()
        self.objects: dict[str, dict[str, Json]] = {}
        self.events: list[Json] = []
        self._by_id: dict[str, Json] = {}
        self._session_extra: dict[str, Json] = {}
        self._webhook_secrets: dict[str, str] = {}
        self.minimum_charge: dict[str, int] = dict(MINIMUM_CHARGE)
        self._clock: float | None = None

    # ------------------------------------------------------------------ basics

    def now(self) -> int:
        """Current unix time (frozen with :meth:`set_time`)."""
        return int(self._clock if self._clock is not None else time.time())

    def set_time(self, timestamp: float | None) -> None:
        """Freeze the fake's clock at ``timestamp`` (None: follow the wall clock)."""
        self._clock = timestamp

    def reset_state(self) -> None:
        with self._lock:
            self.objects.clear()
            self.events.clear()
            self._by_id.clear()
            self._session_extra.clear()
            self._webhook_secrets.clear()
            self.minimum_charge = dict(MINIMUM_CHARGE)

    def _store(self, obj: Json) -> Json:
        self.objects.setdefault(obj["object"], {})[obj["id"]] = obj
        self._by_id[obj["id"]] = obj
        return obj

    def get(self, object_type: str, object_id: str, param: str = "id") -> Json:
        """The stored object itself (mutable; copy before handing out)."""
        with self._lock:
            obj = self.objects.get(object_type, {}).get(object_id)
            if obj is None:
                raise missing(object_type, object_id, param)
            return obj

    def find(self, object_id: str) -> Json | None:
        with self._lock:
            return self._by_id.get(object_id)

    def all(self, object_type: str) -> list[Json]:
        """Stored objects of a type, oldest first (deep copies)."""
        with self._lock:
            return copy.deepcopy(list(self.objects.get(object_type, {}).values()))

    def _new(self, object_type: str, **fields: Any) -> Json:
        obj = fixture(object_type)
        obj.update({"id": new_id(object_type), "object": object_type, "livemode": False})
        if "created" in obj or object_type != "subscription_item":
            obj["created"] = self.now()
        if "metadata" in obj:
            obj["metadata"] = {}
        obj.update(fields)
        return obj

    # ------------------------------------------------------------------ events

    def _emit(
        self, type_: str, obj: Json, previous: Json | None = None, ctx: RequestContext | None = None
    ) -> Json:
        data: Json = {"object": copy.deepcopy(obj)}
        if previous:
            data["previous_attributes"] = copy.deepcopy(previous)
        event: Json = {
            "id": new_id("event"),
            "object": "event",
            "api_version": API_VERSION,
            "created": self.now(),
            "data": data,
            "livemode": False,
            "pending_webhooks": max(1, len(self.objects.get("webhook_endpoint", {}))),
            "request": {
                "id": ctx.request_id if ctx else None,
                "idempotency_key": ctx.idempotency_key if ctx else None,
            },
            "type": type_,
        }
        self._store(event)
        self.events.append(event)
        return event

    def events_since(self, index: int) -> list[Json]:
        with self._lock:
            return copy.deepcopy(self.events[index:])

    # ------------------------------------------------------------------ catalog

    def add_product(
        self, *, id: str | None = None, name: str = "Plan", metadata: dict[str, str] | None = None
    ) -> Json:
        with self._lock:
            product = self._new(
                "product",
                name=name,
                metadata=dict(metadata or {}),
                active=True,
                default_price=None,
                description=None,
                updated=self.now(),
            )
            product.pop("type", None)
            if id:
                product["id"] = id
            return copy.deepcopy(self._store(product))

    def add_price(
        self,
        *,
        id: str | None = None,
        unit_amount: int = 1000,
        currency: str = "usd",
        interval: str | None = "month",
        interval_count: int = 1,
        product: str | None = None,
        nickname: str | None = None,
        lookup_key: str | None = None,
        metadata: dict[str, str] | None = None,
        active: bool = True,
        product_name: str | None = None,
    ) -> Json:
        """Seed a price (and its product unless ``product`` names a stored one).

        ``interval=None`` makes a one-time price.
        """
        with self._lock:
            if product is None or product not in self.objects.get("product", {}):
                product = self.add_product(id=product, name=product_name or nickname or "Plan")[
                    "id"
                ]
            price = self._new(
                "price",
                active=active,
                currency=currency,
                unit_amount=unit_amount,
                unit_amount_decimal=str(unit_amount),
                product=product,
                nickname=nickname,
                lookup_key=lookup_key,
                metadata=dict(metadata or {}),
                type="recurring" if interval else "one_time",
                tiers_mode=None,
                transform_quantity=None,
                custom_unit_amount=None,
                recurring={
                    "interval": interval,
                    "interval_count": interval_count,
                    "meter": None,
                    "trial_period_days": None,
                    "usage_type": "licensed",
                }
                if interval
                else None,
            )
            if id:
                price["id"] = id
            self._store(price)
            prod = self.objects["product"][product]
            if prod.get("default_price") is None:
                prod["default_price"] = price["id"]
            return copy.deepcopy(price)

    def _price_from_data(self, data: Json) -> Json:
        product = data.get("product")
        if not product:
            pdata = data.get("product_data") or {}
            product = self.add_product(
                name=pdata.get("name", "Product"), metadata=pdata.get("metadata")
            )["id"]
        elif product not in self.objects.get("product", {}):
            raise missing("product", product, "product")
        recurring = data.get("recurring") or {}
        price = self.add_price(
            unit_amount=int(data.get("unit_amount") or 0),
            currency=data["currency"],
            interval=recurring.get("interval"),
            interval_count=int(recurring.get("interval_count") or 1),
            product=product,
            active=False,
        )
        return self.objects["price"][price["id"]]

    # ------------------------------------------------------------------ customers

    def create_customer(
        self, params: Json | None = None, ctx: RequestContext | None = None
    ) -> Json:
        params = params or {}
        with self._lock:
            customer = self._new(
                "customer",
                balance=0,
                currency=None,
                default_source=None,
                delinquent=False,
                description=params.get("description"),
                discount=None,
                email=params.get("email"),
                name=params.get("name"),
                phone=params.get("phone"),
                address=params.get("address"),
                shipping=None,
                invoice_prefix=new_id("customer", 8)[4:].upper(),
                metadata=_metadata_update({}, params.get("metadata") or {}),
                preferred_locales=params.get("preferred_locales", []),
                tax_exempt=params.get("tax_exempt", "none"),
                test_clock=None,
            )
            customer["invoice_settings"] = {
                "custom_fields": None,
                "default_payment_method": None,
                "footer": None,
                "rendering_options": None,
            }
            self._store(customer)
            self._emit("customer.created", customer, ctx=ctx)
            return copy.deepcopy(customer)

    # ------------------------------------------------------------------ helpers

    def _apply_simple(self, obj: Json, params: Json, keys: Iterable[str]) -> Json:
        """Set ``keys`` from params ("" unsets to None); return previous values."""
        previous: Json = {}
        for key in keys:
            if key not in params:
                continue
            value = params[key]
            new: Any
            if key == "metadata":
                new = _metadata_update(obj.get("metadata") or {}, value)
            else:
                new = None if value == "" else value
            if obj.get(key) != new:
                previous[key] = copy.deepcopy(obj.get(key))
                obj[key] = new
        return previous


def spec_event_types() -> set[str]:
    """Event types Stripe knows (from webhook_endpoint enabled_events enum)."""
    schema = load_spec()["paths"]["/v1/webhook_endpoints"]["post"]["requestBody"]["content"][
        "application/x-www-form-urlencoded"
    ]["schema"]["properties"]["enabled_events"]
    return set(schema["items"]["enum"]) - {"*"}
