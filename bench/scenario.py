"""Realistic Stripe events for the benchmarks, produced by the Stripe fake (tests/stripe_fake).

Every account lives the test suite's lifecycle (tests/webhooks/lifecycle.py): a subscription
checkout, its fee settling, cancel at period end and resume, a top-up with a partial refund, a
lost dispute on the subscription payment, a renewal and the deletion: 22 events of 14 types.
The rows the checkout API would have written first (account with its Stripe customer, our
checkout sessions) are returned for seeding, exactly as tests/webhooks/flows.py makes them.
"""

from __future__ import annotations

import random
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from tests.stripe_fake import StripeFake

PRICE_ID = "price_channel_monthly_usd"
OK_URL, CANCEL_URL = "https://app.1msg.io/ok", "https://app.1msg.io/cancel"


@dataclass
class Scenario:
    events: list[dict[str, Any]] = field(default_factory=list)
    accounts: list[tuple[str, str]] = field(default_factory=list)  # (id, stripe customer)
    # (id, account, purpose, plan_code, amount, stripe session id)
    checkouts: list[tuple[uuid.UUID, str, str, str | None, int | None, str]] = field(
        default_factory=list
    )


def _open(
    fake: StripeFake, scenario: Scenario, account: str, customer: str, purpose: str, **kw: Any
) -> str:
    row_id = uuid.uuid4()
    metadata = {"account_id": account, "purpose": purpose, "checkout_session_id": str(row_id)}
    params: dict[str, Any] = {
        "customer": customer,
        "client_reference_id": account,
        "success_url": OK_URL + "?session={CHECKOUT_SESSION_ID}",
        "cancel_url": CANCEL_URL,
    }
    if purpose == "subscription":
        metadata |= {"channel_id": kw["channel_id"], "plan_code": "channel_monthly"}
        params |= {
            "mode": "subscription",
            "line_items": [{"price": PRICE_ID, "quantity": 1}],
            "subscription_data": {"metadata": metadata},
        }
    else:
        params |= {
            "mode": "payment",
            "line_items": [
                {
                    "price_data": {
                        "currency": "usd",
                        "unit_amount": kw["amount"],
                        "product_data": {"name": "Balance top-up"},
                    },
                    "quantity": 1,
                }
            ],
            "payment_intent_data": {"metadata": metadata},
        }
    params["metadata"] = metadata
    _, session = fake.call("post", "/v1/checkout/sessions", {}, params)
    scenario.checkouts.append(
        (
            row_id,
            account,
            purpose,
            "channel_monthly" if purpose == "subscription" else None,
            kw.get("amount"),
            session["id"],
        )
    )
    return str(session["id"])


def _charge_of(fake: StripeFake, payment_intent: str) -> str:
    return str(fake.get("payment_intent", payment_intent)["latest_charge"])


def lifecycle(fake: StripeFake, scenario: Scenario, account: str, channel: str) -> None:
    customer = str(fake.create_customer({"metadata": {"account_id": account}})["id"])
    scenario.accounts.append((account, customer))
    sub_session = _open(fake, scenario, account, customer, "subscription", channel_id=channel)
    top_up_session = _open(fake, scenario, account, customer, "top_up", amount=5000)
    start = len(fake.events)
    fake.complete_checkout(sub_session)
    subscription_id = str(fake.get("checkout.session", sub_session)["subscription"])
    invoice = fake.get("invoice", str(fake.get("subscription", subscription_id)["latest_invoice"]))
    first_pi = next(
        e["data"]["object"]["payment"]["payment_intent"]
        for e in fake.events[start:]
        if e["type"] == "invoice_payment.paid" and e["data"]["object"]["invoice"] == invoice["id"]
    )
    subscription_charge = _charge_of(fake, str(first_pi))
    _tick(fake)
    fake.settle_charge(subscription_charge, fee=143)
    fake.update_subscription(subscription_id, cancel_at_period_end=True)
    _tick(fake)
    fake.update_subscription(subscription_id, cancel_at_period_end=False)
    _tick(fake)
    fake.complete_checkout(top_up_session)
    _tick(fake)
    top_up_pi = str(fake.get("checkout.session", top_up_session)["payment_intent"])
    fake.settle_charge(_charge_of(fake, top_up_pi), fee=175)
    fake.create_refund({"payment_intent": top_up_pi, "amount": 1000})
    _tick(fake)
    dispute = fake.create_dispute(subscription_charge)
    dispute_id = str(dispute[0]["data"]["object"]["id"]) if dispute else ""
    fake.withdraw_dispute_funds(dispute_id)
    _tick(fake)
    fake.close_dispute(dispute_id, won=False)
    _tick(fake)
    fake.renew_subscription(subscription_id, paid=True)
    _tick(fake)
    fake.delete_subscription(subscription_id)
    scenario.events.extend(dict(e) for e in fake.events[start:])


def _tick(fake: StripeFake) -> None:
    """Steps of a lifecycle happen minutes apart, as they do at Stripe."""
    fake.set_time(fake.now() + 600)


# Stripe ids made by the fake: a prefix and a random tail of 24 (8 for invoice prefixes).
_STRIPE_ID = re.compile(
    r"\b((?:cus|cs_test|sub|si|in|inpay|pi|ch|txn|re|dp|evt|prod|li|il|pm)_)"
    r"([A-Za-z0-9]{24})\b"
)
_UUID = re.compile(r"\b([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{8})[0-9a-f]{4}\b")


def _templated(text: str) -> str:
    """Mark the part of every id that each copy replaces (str.replace is fast, re is not)."""
    text = _STRIPE_ID.sub(lambda m: m.group(1) + m.group(2)[:19] + "@ID@", text)
    return _UUID.sub(lambda m: m.group(1) + "@UU@", text)


def _copy(template: str, copy_no: int) -> Any:
    tag = f"{copy_no:05d}"
    text = template.replace("@ID@", tag).replace("@UU@", f"{copy_no:04x}")
    return orjson.loads(text.replace("_tpl_", f"_{tag}_"))


def build(fake: StripeFake, accounts: int, template_accounts: int = 25) -> Scenario:
    """`accounts` lifecycles: `template_accounts` simulated by the fake, the rest copies of
    them with every id renamed (events, our rows and the fake's objects alike, so the fake
    answers the service's look-ups for the copies too). Simulating each account would take
    about 60 ms apiece."""
    fake.add_price(id=PRICE_ID, unit_amount=3900, currency="usd", interval="month")
    fake.set_time(time.time() - 40 * 86400)
    template = Scenario()
    before = {kind: set(objs) for kind, objs in fake.objects.items()}
    for i in range(min(accounts, template_accounts)):
        lifecycle(fake, template, f"acc_tpl_{i}", f"chan_tpl_{i}")
    fake.set_time(None)
    objects = {
        kind: [obj for oid, obj in objs.items() if oid not in before.get(kind, set())]
        for kind, objs in fake.objects.items()
        if kind != "event"  # the service never fetches events here
    }
    scenario = Scenario()
    events_json = _templated(orjson.dumps(template.events).decode())
    objects_json = _templated(orjson.dumps(objects).decode())
    rows_json = _templated(
        orjson.dumps(
            [template.accounts, [[str(c[0]), *c[1:]] for c in template.checkouts]]
        ).decode()
    )
    copies = -(-accounts // len(template.accounts))
    for copy_no in range(copies):  # the template's own objects stay unused in the fake
        scenario.events.extend(_copy(events_json, copy_no))
        with fake._lock:
            for objs in _copy(objects_json, copy_no).values():
                for obj in objs:
                    fake._store(obj)
        accounts_rows, checkout_rows = _copy(rows_json, copy_no)
        scenario.accounts.extend(tuple(a) for a in accounts_rows)
        scenario.checkouts.extend((uuid.UUID(c[0]), *c[1:]) for c in checkout_rows)
    return scenario


def deliveries(
    events: list[dict[str, Any]], duplicate_share: float, rng: random.Random
) -> list[dict[str, Any]]:
    """Every event once plus `duplicate_share` of them again, all shuffled."""
    extra = rng.sample(events, int(len(events) * duplicate_share))
    stream = [*events, *extra]
    rng.shuffle(stream)
    return stream
