"""The only module that talks to Stripe.

One method per call the service makes, async only, over `stripe.StripeClient` with the
SDK's `AIOHTTPClient`, the SDK's pinned API version, explicit network retries and timeouts.
Every call that creates something takes an idempotency key derived from our own row ids
(`billing:<kind>:<uuid>`), never from a caller's key, so a retry after a crash cannot create
twice. Results are returned as plain dicts in Stripe's JSON shape (the same shape webhook
payloads carry). Failures surface as `StripeUnavailable` (Stripe down, slow or rate limiting us
past our retries) or `StripeRequestRejected` (Stripe refused the request as invalid).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
import stripe
import structlog

from app.config import Settings
from app.errors import BillingError, StripeUnavailable

log = structlog.get_logger()

API_VERSION: str = stripe.api_version
StripeObject = dict[str, Any]


class StripeRequestRejected(BillingError):
    status, code, title = 502, "stripe_request_rejected", "Stripe rejected the request"

    def __init__(self, detail: str, *, param: str | None = None, stripe_code: str | None = None):
        super().__init__(detail)
        self.param = param
        self.stripe_code = stripe_code


class StripeCardError(BillingError):
    status, code, title = 402, "card_declined", "The card was declined"


def idempotency_key(kind: str, our_id: object) -> str:
    """The Stripe idempotency key for creating `kind` from our own row `our_id`."""
    return f"billing:{kind}:{our_id}"


class StripeGateway:
    """Thin async wrapper over the official SDK, one method per Stripe call we make."""

    def __init__(
        self,
        *,
        api_key: str,
        api_base: str | None = None,
        max_network_retries: int = 2,
        timeout_seconds: float = 10.0,
        rate_limit_retries: int = 2,
        max_retry_after_seconds: float = 5.0,
    ) -> None:
        # aiohttp rather than the SDK's default httpx: a call costs ~1.4 ms of our CPU
        # instead of ~3.5 ms (bench/README.md), the same for every call the service makes.
        self._http_client = stripe.AIOHTTPClient(
            timeout=aiohttp.ClientTimeout(total=timeout_seconds)
        )
        base_addresses: dict[str, str] = {}
        if api_base:
            base_addresses = {"api": api_base, "files": api_base, "connect": api_base}
        self._client = stripe.StripeClient(
            api_key,
            stripe_version=API_VERSION,
            base_addresses=base_addresses,  # type: ignore[arg-type]
            max_network_retries=max_network_retries,
            http_client=self._http_client,
        )
        # The SDK's typed params are TypedDicts; we build plain dicts checked by the fake's
        # OpenAPI validation in tests, so calls go through an untyped handle.
        self._v1: Any = self._client.v1
        self._rate_limit_retries = rate_limit_retries
        self._max_retry_after = max_retry_after_seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> StripeGateway:
        return cls(
            api_key=settings.stripe_secret_key.get_secret_value(),
            api_base=settings.stripe_api_base,
            max_network_retries=settings.stripe_max_network_retries,
            timeout_seconds=settings.stripe_timeout_seconds,
        )

    async def close(self) -> None:
        await self._http_client.close_async()  # type: ignore[no-untyped-call]

    @property
    def client(self) -> stripe.StripeClient:
        return self._client

    async def _call(
        self,
        operation: str,
        call: Callable[[], Awaitable[Any]],
        *,
        answers: Collection[str | None] | Literal["any"] = (),
    ) -> StripeObject:
        """`call`, its failures as our errors, each logged with the id Stripe gave the request
        (`stripe_request_id`: what finds it in Stripe's logs). A refusal is logged at error (a request we
        built wrong, or state we did not expect: someone should look), except one whose Stripe
        code is in `answers` (`"any"`: every refusal), which the caller takes as an answer
        (a subscription already gone, a session no longer open): logged at info."""
        attempt = 0
        while True:
            try:
                result = await call()
            except stripe.RateLimitError as exc:
                retry_after = _retry_after_seconds(exc)
                if attempt >= self._rate_limit_retries or retry_after > self._max_retry_after:
                    log.warning(
                        "stripe.rate_limited",
                        operation=operation,
                        attempts=attempt + 1,
                        stripe_request_id=exc.request_id,
                    )
                    raise StripeUnavailable(
                        "Stripe is rate limiting requests; retry later"
                    ) from None
                attempt += 1
                await asyncio.sleep(retry_after)
                continue
            except stripe.CardError as exc:
                raise StripeCardError(exc.user_message or "The card was declined") from None
            except stripe.InvalidRequestError as exc:
                expected = answers == "any" or exc.code in answers
                (log.info if expected else log.error)(
                    "stripe.request_rejected",
                    operation=operation,
                    param=exc.param,
                    code=exc.code,
                    expected=expected,
                    stripe_request_id=exc.request_id,
                )
                raise StripeRequestRejected(
                    f"Stripe rejected {operation}: {exc.user_message or exc}",
                    param=exc.param,
                    stripe_code=exc.code,
                ) from None
            except (stripe.APIConnectionError, stripe.APIError) as exc:
                log.warning(
                    "stripe.unavailable",
                    operation=operation,
                    error_type=type(exc).__name__,
                    stripe_request_id=exc.request_id,  # None when Stripe never answered
                )
                raise StripeUnavailable(f"Stripe did not answer {operation}; retry later") from None
            except stripe.StripeError as exc:
                log.error(
                    "stripe.error",
                    operation=operation,
                    error_type=type(exc).__name__,
                    stripe_request_id=exc.request_id,
                )
                raise StripeUnavailable(f"Stripe failed {operation}") from None
            return _plain(result)

    async def _post_json(
        self, path: str, params: dict[str, Any], key: str | None = None
    ) -> StripeObject:
        """POST through the SDK's `raw_request` (same encoding, retries, errors and key) and
        return Stripe's JSON as parsed, without building `StripeObject`s only to turn them
        back into dicts: for the calls on the checkout's hot path. `params` must not use the
        SDK's option names (`api_key`, `headers`, `idempotency_key`, ...)."""
        options = {"idempotency_key": key} if key is not None else {}
        response = await self._client.raw_request_async("post", path, **params, **options)
        data: StripeObject = response.data
        return data

    async def _get_json(self, path: str) -> StripeObject:
        """GET through the SDK's `raw_request`, Stripe's JSON as parsed (as `_post_json`): for
        the look-ups the event processor makes for many events."""
        response = await self._client.raw_request_async("get", path)
        data: StripeObject = response.data
        return data

    # --- customers -------------------------------------------------------------------------

    async def create_customer(self, *, account_id: str, key: str) -> StripeObject:
        """The account's customer, with parameters that never vary (the billing email is set
        by `update_customer_email`): Stripe refuses a key sent again with other parameters."""
        params: dict[str, Any] = {"metadata": {"account_id": account_id}}
        return await self._call(
            "customers.create", lambda: self._post_json("/v1/customers", params, key)
        )

    async def update_customer_email(self, customer_id: str, email: str) -> StripeObject:
        """Set the customer's email (an update: the same request twice changes nothing, so it
        needs no idempotency key)."""
        return await self._call(
            "customers.update",
            lambda: self._post_json(f"/v1/customers/{customer_id}", {"email": email}),
            answers={"email_invalid"},  # left off the customer (app/accounts/service.py)
        )

    # --- checkout --------------------------------------------------------------------------

    async def create_checkout_session(self, params: dict[str, Any], *, key: str) -> StripeObject:
        return await self._call(
            "checkout.sessions.create",
            lambda: self._post_json("/v1/checkout/sessions", params, key),
        )

    async def retrieve_checkout_session(self, session_id: str) -> StripeObject:
        return await self._call(
            "checkout.sessions.retrieve",
            lambda: self._v1.checkout.sessions.retrieve_async(session_id),
        )

    async def expire_checkout_session(self, session_id: str) -> StripeObject:
        """Refused when the session is no longer open (completed or expired meanwhile): the
        caller then reads what it became."""
        return await self._call(
            "checkout.sessions.expire",
            lambda: self._v1.checkout.sessions.expire_async(session_id),
            answers="any",
        )

    # --- billing portal --------------------------------------------------------------------

    async def create_portal_session(
        self, *, customer: str, return_url: str, key: str, configuration: str | None = None
    ) -> StripeObject:
        params: dict[str, Any] = {"customer": customer, "return_url": return_url}
        if configuration:
            params["configuration"] = configuration
        return await self._call(
            "billing_portal.sessions.create",
            lambda: self._v1.billing_portal.sessions.create_async(params, {"idempotency_key": key}),
        )

    async def create_portal_configuration(
        self, params: dict[str, Any], *, key: str
    ) -> StripeObject:
        return await self._call(
            "billing_portal.configurations.create",
            lambda: self._v1.billing_portal.configurations.create_async(
                params, {"idempotency_key": key}
            ),
        )

    async def update_portal_configuration(
        self, configuration_id: str, params: dict[str, Any]
    ) -> StripeObject:
        return await self._call(
            "billing_portal.configurations.update",
            lambda: self._v1.billing_portal.configurations.update_async(configuration_id, params),
        )

    # --- catalog ---------------------------------------------------------------------------

    async def retrieve_price(self, price_id: str) -> StripeObject:
        return await self._call(
            "prices.retrieve",
            lambda: self._v1.prices.retrieve_async(price_id),
        )

    # --- subscriptions ---------------------------------------------------------------------

    async def retrieve_subscription(self, subscription_id: str) -> StripeObject:
        return await self._call(
            "subscriptions.retrieve",
            lambda: self._v1.subscriptions.retrieve_async(subscription_id),
        )

    async def update_subscription(
        self, subscription_id: str, params: dict[str, Any], *, key: str
    ) -> StripeObject:
        """Refused for a subscription that has ended (or a `cancel_at` in the way): the
        maintenance push records it `rejected` (README), an answer, not a fault."""
        return await self._call(
            "subscriptions.update",
            lambda: self._v1.subscriptions.update_async(
                subscription_id, params, {"idempotency_key": key}
            ),
            answers="any",
        )

    # --- refunds ---------------------------------------------------------------------------

    async def create_refund(
        self,
        *,
        payment_intent: str,
        amount: int,
        metadata: dict[str, str],
        key: str,
    ) -> StripeObject:
        params: dict[str, Any] = {
            "payment_intent": payment_intent,
            "amount": amount,
            "reason": "requested_by_customer",
            "metadata": metadata,
        }
        return await self._call(
            "refunds.create",
            lambda: self._v1.refunds.create_async(params, {"idempotency_key": key}),
        )

    async def find_refund(self, *, payment_intent: str, execution_id: str) -> StripeObject | None:
        """The payment's refund we created for `execution_id` (its metadata), if Stripe has
        one: what a repeat of a lost request looks for, since Stripe's idempotency keys last
        only 24 hours. A payment has few refunds: the newest 100 are searched."""
        page = await self._call(
            "refunds.list",
            lambda: self._v1.refunds.list_async({"payment_intent": payment_intent, "limit": 100}),
        )
        for refund in page.get("data") or []:
            if (refund.get("metadata") or {}).get("refund_execution_id") == execution_id:
                found: StripeObject = refund
                return found
        return None

    async def cancel_subscription(self, subscription_id: str, *, key: str) -> StripeObject | None:
        """Cancel now, without proration or a final invoice. None when Stripe says the
        subscription is already gone (cancelled before), so repeating it is harmless."""
        params: dict[str, Any] = {"prorate": False, "invoice_now": False}
        try:
            return await self._call(
                "subscriptions.cancel",
                lambda: self._v1.subscriptions.cancel_async(
                    subscription_id, params, {"idempotency_key": key}
                ),
                answers={"resource_missing"},
            )
        except StripeRequestRejected as exc:
            if exc.stripe_code == "resource_missing":
                return None
            raise

    async def retrieve_balance_transaction(self, balance_transaction_id: str) -> StripeObject:
        path = f"/v1/balance_transactions/{quote(balance_transaction_id, safe='')}"
        return await self._call("balance_transactions.retrieve", lambda: self._get_json(path))

    async def create_webhook_endpoint(self, params: dict[str, Any]) -> StripeObject:
        """One key for every attempt of this create (no row of ours names an endpoint, so a
        fresh id per registration): the SDK would draw a new one each time `_call` retries a
        429, and a create whose first answer was lost would then make a second endpoint."""
        options = {"idempotency_key": idempotency_key("webhook_endpoint", uuid.uuid4())}
        return await self._call(
            "webhook_endpoints.create",
            lambda: self._v1.webhook_endpoints.create_async(params, options),
        )

    async def update_webhook_endpoint(
        self, endpoint_id: str, params: dict[str, Any]
    ) -> StripeObject:
        return await self._call(
            "webhook_endpoints.update",
            lambda: self._v1.webhook_endpoints.update_async(endpoint_id, params),
        )

    async def list_webhook_endpoints(self) -> StripeObject:
        return await self._call(
            "webhook_endpoints.list",
            lambda: self._v1.webhook_endpoints.list_async({"limit": 100}),
        )

    async def list_events(self, params: dict[str, Any]) -> StripeObject:
        return await self._call(
            "events.list",
            lambda: self._v1.events.list_async(params),
        )

    async def retrieve_invoice(self, invoice_id: str) -> StripeObject:
        return await self._call(
            "invoices.retrieve",
            lambda: self._v1.invoices.retrieve_async(invoice_id),
        )


def _retry_after_seconds(exc: stripe.StripeError) -> float:
    headers = exc.headers or {}
    try:
        return max(0.0, float(headers.get("retry-after") or headers.get("Retry-After") or 1))
    except ValueError:
        return 1.0


def _plain(result: Any) -> StripeObject:
    if isinstance(result, stripe.StripeObject):
        plain: StripeObject = result.to_dict(recursive=True, for_json=True)
        return plain
    if isinstance(result, dict):
        return result
    raise TypeError(f"unexpected Stripe result {type(result).__name__}")
