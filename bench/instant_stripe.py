"""A Stripe stand-in that answers at once, for measuring the time a checkout adds on its own
(bench/checkout.py): `POST /v1/customers` and `POST /v1/checkout/sessions` return Stripe's
example object, `POST /v1/customers/{id}` (an update: the service sets the billing email after
creating the customer) the example customer with that id (the fixtures the Stripe fake uses, so the SDK parses as much as it would from
Stripe) with a fresh id, honouring `Idempotency-Key` (the same key returns the same object),
with no validation and no state beyond that. Served by uvicorn in its own process
(`uvicorn bench.instant_stripe:app`)."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from tests.stripe_fake import fixture

_ids = itertools.count(1)
_by_key: dict[tuple[str, str], bytes] = {}


CUSTOMER = fixture("customer")
CHECKOUT_SESSION = fixture("checkout.session")


def _customer(n: int) -> dict[str, Any]:
    return {**CUSTOMER, "id": f"cus_instant{n}", "livemode": False}


def _checkout_session(n: int) -> dict[str, Any]:
    return {
        **CHECKOUT_SESSION,
        "id": f"cs_test_instant{n}",
        "livemode": False,
        "mode": "payment",
        "status": "open",
        "payment_status": "unpaid",
        "url": f"https://checkout.stripe.com/c/pay/cs_test_instant{n}",
        "expires_at": int(time.time()) + 86400,
    }


MAKERS = {"/v1/customers": _customer, "/v1/checkout/sessions": _checkout_session}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:  # drain the form body
        message = await receive()
        more = message.get("more_body", False)
    path = scope["path"]
    maker = MAKERS.get(path)
    if scope["method"] == "POST" and path.startswith("/v1/customers/"):
        status, body = 200, json.dumps({**CUSTOMER, "id": path.rsplit("/", 1)[1]}).encode()
    elif scope["method"] != "POST" or maker is None:
        status, body = 404, json.dumps({"error": {"type": "invalid_request_error"}}).encode()
    else:
        headers = dict(scope["headers"])
        key = headers.get(b"idempotency-key", b"").decode()
        body = _by_key.get((path, key)) if key else None
        if body is None:
            body = json.dumps(maker(next(_ids))).encode()
            if key:
                _by_key[(path, key)] = body
        status = 200
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"request-id", b"req_instant")],
        }
    )
    await send({"type": "http.response.body", "body": body})
