"""The simulator without a browser: its pages and controls emit Stripe's events, its webhook
delivery signs like Stripe, retries while the endpoint is down, and can duplicate and shuffle."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import stripe

from app.config import DEFAULT_PLANS
from tests.simulator.conftest import free_port
from tests.stripe_fake import object_errors
from tests.stripe_fake.simulator import SimulatorServer, main

SECRET = "whsec_simulator_test_" + "d" * 24


class Receiver:
    """A webhook endpoint that verifies each delivery with the Stripe SDK's own check."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                event = stripe.Webhook.construct_event(
                    body.decode(), self.headers["Stripe-Signature"], SECRET
                )
                with receiver.lock:
                    receiver.received.append(json.loads(str(event)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def ids(self) -> list[str]:
        with self.lock:
            return [e["id"] for e in self.received]


def wait_until(condition: Any, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    endpoint = Receiver(free_port())
    yield endpoint
    endpoint.stop()


def simulator(receiver: Receiver, **options: Any) -> SimulatorServer:
    sim = SimulatorServer(
        webhook_url=f"http://127.0.0.1:{receiver.port}/hook",
        webhook_secret=SECRET,
        max_backoff=0.5,
        **options,
    )
    sim.seed_plans(DEFAULT_PLANS)
    return sim.start()


def api(sim: SimulatorServer) -> httpx.Client:
    return httpx.Client(base_url=sim.url, headers={"Authorization": "Bearer sk_test_sim"})


def new_checkout(http: httpx.Client, mode: str = "subscription") -> dict[str, Any]:
    customer = http.post("/v1/customers", data={"email": "jo@example.com"}).json()
    params = {
        "mode": mode,
        "customer": customer["id"],
        "success_url": "http://localhost:3000/done?session_id={CHECKOUT_SESSION_ID}",
        "cancel_url": "http://localhost:3000/billing",
    }
    if mode == "subscription":
        params |= {
            "line_items[0][price]": "price_channel_monthly_usd",
            "line_items[0][quantity]": "1",
        }
    else:
        params |= {
            "line_items[0][price_data][currency]": "usd",
            "line_items[0][price_data][unit_amount]": "5000",
            "line_items[0][price_data][product_data][name]": "Top-up",
            "line_items[0][quantity]": "1",
        }
    response = http.post("/v1/checkout/sessions", data=params)
    assert response.status_code == 200, response.text
    session: dict[str, Any] = response.json()
    return session


def types_since(sim: SimulatorServer, start: int) -> list[str]:
    return [e["type"] for e in sim.events_since(start)]


def control(http: httpx.Client, action: str, **fields: str) -> list[str]:
    response = http.post(
        f"/simulator/actions/{action}", data=fields, headers={"Accept": "application/json"}
    )
    assert response.status_code == 200, response.text
    return [e["type"] for e in response.json()["events"]]


def test_events_emitted_while_the_endpoint_is_down_arrive_signed_once_it_is_up(
    receiver: Receiver,
) -> None:
    sim = simulator(receiver)
    try:
        with api(sim) as http:
            session = new_checkout(http)
            paid = http.post(session["url"], data={"card": "success"})
            assert paid.status_code == 303
            assert paid.headers["location"] == (
                f"http://localhost:3000/done?session_id={session['id']}"
            )
        emitted = [e["id"] for e in sim.events]
        records = sim.delivery.records  # type: ignore[union-attr]
        # an event is registered with the delivery loop a moment after it is emitted
        wait_until(lambda: all(i in records and records[i].attempts >= 2 for i in emitted))
        assert receiver.ids() == []
        receiver.start()
        wait_until(lambda: sorted(receiver.ids()) == sorted(emitted))
        assert sim.delivery is not None and sim.delivery.backlog == 0
        for event in receiver.received:
            assert not object_errors("event", event), event["type"]
    finally:
        sim.stop()


def test_duplicate_and_shuffled_delivery_delivers_every_event_twice_out_of_order(
    receiver: Receiver,
) -> None:
    receiver.start()
    sim = simulator(receiver, duplicate_rate=1.0, shuffle=True, seed=7)
    try:
        with api(sim) as http:
            session = new_checkout(http)
            http.post(session["url"], data={"card": "success"})
        emitted = [e["id"] for e in sim.events]
        wait_until(lambda: len(receiver.ids()) == 2 * len(emitted))
        delivered = receiver.ids()
        assert sorted(delivered) == sorted(emitted * 2)
        assert delivered[: len(emitted)] != emitted
    finally:
        sim.stop()


@pytest.fixture
def quiet() -> Iterator[SimulatorServer]:
    """A simulator without a webhook endpoint (its events are only recorded)."""
    sim = SimulatorServer()
    sim.seed_plans(DEFAULT_PLANS)
    sim.start()
    yield sim
    sim.stop()


def test_checkout_page_declines_fails_authentication_then_pays_after_authentication(
    quiet: SimulatorServer,
) -> None:
    with api(quiet) as http:
        session = new_checkout(http)
        page = http.get(session["url"])
        assert page.status_code == 200
        assert "39.00 USD" in page.text

        start = len(quiet.events)
        declined = http.post(session["url"], data={"card": "decline"})
        assert declined.headers["location"].endswith("?error=declined")
        assert "Your card was declined" in http.get(declined.headers["location"]).text
        assert types_since(quiet, start) == [
            "payment_intent.created",
            "charge.failed",
            "payment_intent.payment_failed",
        ]

        start = len(quiet.events)
        challenge = http.post(session["url"], data={"card": "authenticate"})
        assert "3-D Secure" in http.get(challenge.headers["location"]).text
        failed = http.post(f"{session['url']}/authenticate", data={"result": "fail"})
        assert failed.headers["location"].endswith("?error=authentication")
        assert types_since(quiet, start) == [
            "payment_intent.created",
            "payment_intent.requires_action",
            "payment_intent.payment_failed",
        ]
        assert quiet.get("checkout.session", session["id"])["status"] == "open"
        assert quiet.all("subscription") == []

        start = len(quiet.events)
        done = http.post(f"{session['url']}/authenticate", data={"result": "complete"})
        assert done.headers["location"].startswith("http://localhost:3000/done")
        assert types_since(quiet, start) == [
            "customer.subscription.created",
            "charge.succeeded",
            "invoice_payment.paid",
            "invoice.paid",
            "checkout.session.completed",
            "charge.updated",
        ]
        assert "complete" in http.get(session["url"]).text
        for event in quiet.events:
            assert not object_errors("event", event), event["type"]


def test_delayed_payment_completes_unpaid_and_its_outcome_is_a_control(
    quiet: SimulatorServer,
) -> None:
    with api(quiet) as http:
        session = new_checkout(http, mode="payment")
        http.post(session["url"], data={"card": "delayed"})
        stored = quiet.get("checkout.session", session["id"])
        assert (stored["status"], stored["payment_status"]) == ("complete", "unpaid")
        assert control(http, "async_failed", session=session["id"]) == [
            "charge.failed",
            "checkout.session.async_payment_failed",
        ]
        other = new_checkout(http, mode="payment")
        http.post(other["url"], data={"card": "delayed"})
        assert control(http, "async_succeeded", session=other["id"]) == [
            "charge.succeeded",
            "checkout.session.async_payment_succeeded",
            "charge.updated",
        ]


def test_an_abandoned_checkout_expires_at_its_expiry_time(quiet: SimulatorServer) -> None:
    with api(quiet) as http:
        session = new_checkout(http)
        back = http.get(session["url"])
        assert "http://localhost:3000/billing" in back.text
        assert quiet.expire_due_sessions() == []
        quiet.set_time(session["expires_at"])
        [expired] = quiet.expire_due_sessions()
        assert expired["type"] == "checkout.session.expired"
        assert "expired" in http.get(session["url"]).text
        quiet.set_time(None)
        other = new_checkout(http)
        assert control(http, "expire_checkout", session=other["id"]) == ["checkout.session.expired"]


def test_portal_updates_the_card_cancels_at_period_end_and_resumes(
    quiet: SimulatorServer,
) -> None:
    with api(quiet) as http:
        session = new_checkout(http)
        http.post(session["url"], data={"card": "success"})
        sub_id = quiet.all("subscription")[0]["id"]
        portal = http.post(
            "/v1/billing_portal/sessions",
            data={"customer": session["customer"], "return_url": "http://localhost:3000/billing"},
        ).json()
        page = http.get(portal["url"])
        assert "Cancel subscription" in page.text
        assert "FAKE-0001" in page.text

        start = len(quiet.events)
        http.post(f"{portal['url']}/payment_method", data={"number": "5555 5555 5555 4444"})
        assert types_since(quiet, start) == ["payment_method.attached", "customer.updated"]
        assert "•••• 4444" in http.get(portal["url"]).text

        start = len(quiet.events)
        http.post(f"{portal['url']}/cancel", data={"subscription": sub_id})
        [updated] = quiet.events_since(start)
        assert updated["type"] == "customer.subscription.updated"
        assert updated["data"]["object"]["cancel_at_period_end"] is True
        assert updated["data"]["previous_attributes"]["cancel_at_period_end"] is False
        assert "Renew subscription" in http.get(portal["url"]).text

        start = len(quiet.events)
        http.post(f"{portal['url']}/resume", data={"subscription": sub_id})
        [resumed] = quiet.events_since(start)
        assert resumed["data"]["object"]["cancel_at_period_end"] is False


def test_portal_cancellation_follows_the_configuration_mode(quiet: SimulatorServer) -> None:
    with api(quiet) as http:
        session = new_checkout(http)
        http.post(session["url"], data={"card": "success"})
        sub_id = quiet.all("subscription")[0]["id"]
        config = http.post(
            "/v1/billing_portal/configurations",
            data={
                "features[subscription_cancel][enabled]": "true",
                "features[subscription_cancel][mode]": "immediately",
                "features[invoice_history][enabled]": "true",
            },
        ).json()
        portal = http.post(
            "/v1/billing_portal/sessions",
            data={"customer": session["customer"], "configuration": config["id"]},
        ).json()
        assert "Update payment method" not in http.get(portal["url"]).text
        start = len(quiet.events)
        http.post(f"{portal['url']}/cancel", data={"subscription": sub_id})
        assert types_since(quiet, start) == ["customer.subscription.deleted"]


def test_controls_renew_refund_and_dispute_emit_stripes_events(quiet: SimulatorServer) -> None:
    with api(quiet) as http:
        session = new_checkout(http)
        http.post(session["url"], data={"card": "success"})
        sub = quiet.all("subscription")[0]
        period_end = sub["items"]["data"][0]["current_period_end"]

        assert control(http, "renew_failed", subscription=sub["id"]) == [
            "customer.subscription.updated",
            "invoice.created",
            "charge.failed",
            "invoice.payment_failed",
            "customer.subscription.updated",
        ]
        renewed = quiet.get("subscription", sub["id"])
        assert renewed["status"] == "past_due"
        assert renewed["items"]["data"][0]["current_period_start"] == period_end
        assert "Pay now" in http.get("/").text
        assert control(http, "pay_invoice", invoice=renewed["latest_invoice"]) == [
            "charge.succeeded",
            "invoice_payment.paid",
            "invoice.paid",
            "customer.subscription.updated",
            "charge.updated",
        ]
        assert quiet.get("subscription", sub["id"])["status"] == "active"
        assert control(http, "renew_paid", subscription=sub["id"])[-2:] == [
            "invoice.paid",
            "charge.updated",
        ]

        charge = next(c for c in quiet.all("charge") if c["status"] == "succeeded")
        assert control(http, "refund", charge=charge["id"], amount="1000") == [
            "refund.created",
            "charge.refunded",
        ]
        refund = quiet.all("refund")[0]
        assert control(http, "fail_refund", refund=refund["id"]) == ["refund.updated"]
        assert control(http, "dispute", charge=charge["id"]) == [
            "charge.dispute.created",
            "charge.dispute.funds_withdrawn",
        ]
        dispute = quiet.all("dispute")[0]
        assert control(http, "win_dispute", dispute=dispute["id"]) == [
            "charge.dispute.closed",
            "charge.dispute.funds_reinstated",
        ]
        assert control(http, "cancel_now", subscription=sub["id"]) == [
            "customer.subscription.deleted"
        ]
        refused = http.post(
            "/simulator/actions/cancel_now",
            data={"subscription": sub["id"]},
            headers={"Accept": "application/json"},
        )
        assert refused.status_code == 404
        assert "No such subscription" in refused.json()["error"]["message"]
        for event in quiet.events:
            assert not object_errors("event", event), event["type"]


def test_the_api_still_validates_requests_against_stripes_openapi(quiet: SimulatorServer) -> None:
    with api(quiet) as http:
        response = http.post("/v1/customers", data={"emial": "x@example.com"})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "parameter_unknown"


def test_the_cli_runs_a_control_against_a_running_simulator(
    quiet: SimulatorServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with api(quiet) as http:
        session = new_checkout(http)
        http.post(session["url"], data={"card": "success"})
    sub_id = quiet.all("subscription")[0]["id"]
    assert main(["ctl", "renew_paid", f"subscription={sub_id}", "--url", quiet.url]) == 0
    output = json.loads(capsys.readouterr().out)
    assert output["action"] == "renew_paid"
    assert "invoice.paid" in [e["type"] for e in output["events"]]
    assert main(["ctl", "renew_paid", "subscription=sub_missing", "--url", quiet.url]) == 1
