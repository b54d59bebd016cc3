"""The Stripe calls of a top-up checkout made directly with the service's `StripeGateway`
and parameters, one at a time: `python -m bench.direct_checkout <stripe url> <n>` prints the
durations in ms (after 20 warm-up rounds) as JSON: `pair` (an account's first checkout: the
customer created, its billing email set, the session) and `session` (the session alone). Run by bench/api.py and bench/checkout.py in a process of its own, with
the service's environment, so the SDK's work does not share a process with the Stripe fake or
the benchmark."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

from app.checkout.service import stripe_params
from app.config import Settings
from app.models import CheckoutSession
from app.stripe_gateway import StripeGateway
from bench import harness

APP_URL = "https://app.1msg.io"


async def main(stripe_url: str, count: int) -> dict[str, list[float]]:
    settings = Settings()
    gateway = StripeGateway(api_key=harness.STRIPE_KEY, api_base=stripe_url)
    run_tag = uuid.uuid4().hex[:6]
    durations: dict[str, list[float]] = {"pair": [], "session": []}
    try:
        for i in range(-20, count):
            account = f"acc_direct_{run_tag}_{i + 20}"
            row = CheckoutSession(
                id=uuid.uuid4(),
                account_id=account,
                purpose="top_up",
                amount=5000,
                currency="usd",
                status="pending",
                success_url=f"{APP_URL}/balance/done",
                cancel_url=f"{APP_URL}/balance",
            )
            started = time.perf_counter()
            customer = await gateway.create_customer(account_id=account, key=f"customer-{row.id}")
            await gateway.update_customer_email(str(customer["id"]), f"{account}@example.com")
            middle = time.perf_counter()
            await gateway.create_checkout_session(
                stripe_params(row, str(customer["id"]), settings), key=f"checkout-{row.id}"
            )
            ended = time.perf_counter()
            if i >= 0:
                durations["pair"].append((ended - started) * 1000)
                durations["session"].append((ended - middle) * 1000)
    finally:
        await gateway.close()
    return durations


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2])))))
