"""The two Stripe calls of a top-up checkout made directly with the service's `StripeGateway`
and parameters, one at a time: `python -m bench.direct_checkout <fake url> <n>` prints the
durations (ms, after 20 warm-up pairs) as JSON. Run by bench/api.py in its own process, with
the service's environment, so the SDK's work does not share a process with the fake."""

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


async def main(fake_url: str, count: int) -> list[float]:
    settings = Settings()
    gateway = StripeGateway(api_key=harness.STRIPE_KEY, api_base=fake_url)
    run_tag = uuid.uuid4().hex[:6]
    durations: list[float] = []
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
            customer = await gateway.create_customer(
                account_id=account, email=f"{account}@example.com", key=f"customer-{row.id}"
            )
            await gateway.create_checkout_session(
                stripe_params(row, str(customer["id"]), settings), key=f"checkout-{row.id}"
            )
            if i >= 0:
                durations.append((time.perf_counter() - started) * 1000)
    finally:
        await gateway.close()
    return durations


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2])))))
