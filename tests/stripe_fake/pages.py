"""Server-rendered HTML pages of the local Stripe simulator (no JavaScript).

Where Stripe shows its own pages the simulator shows these:

- ``/checkout/{session}``: Stripe Checkout. Pay with a card that succeeds, one that is
  declined, one whose 3-D Secure authentication then fails (or succeeds), or a delayed bank
  debit (completes unpaid; its outcome is decided on the controls page). The back link
  abandons to ``cancel_url``; an abandoned session expires at ``expires_at`` (or now, from
  the controls page).
- ``/billing_portal/{session}``: the Customer Portal of the session's customer: update the
  card, see and pay invoices, cancel at period end (as the portal configuration says),
  resume.
- ``/``: controls for what takes time in real life (renewals, refunds, disputes, expiry,
  delayed payments) and the webhook delivery log with its duplicate/shuffle switches.

Every action calls the simulation method that emits the events Stripe emits for it.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)

from .openapi import Json
from .state import StripeError

if TYPE_CHECKING:
    from .simulator import SimulatorServer

CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f6f9fc;color:#1a1f36}
header{background:#635bff;color:#fff;padding:14px 28px;font-weight:600;display:flex;justify-content:space-between}
header small{font-weight:400;opacity:.85}
main{max-width:980px;margin:24px auto;padding:0 20px}
.card{background:#fff;border-radius:8px;box-shadow:0 2px 5px rgba(60,66,87,.12);padding:20px 24px;margin-bottom:18px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:18px}
h1{font-size:22px;margin:0 0 12px}h2{font-size:17px;margin:0 0 10px}
.amount{font-size:32px;font-weight:700;margin:6px 0 14px}
.muted{color:#697386;font-size:13px}
table{border-collapse:collapse;width:100%;font-size:14px}td,th{text-align:left;padding:6px 8px;border-bottom:1px solid #e3e8ee;vertical-align:top}
button{background:#635bff;color:#fff;border:0;border-radius:6px;padding:8px 14px;font-size:14px;cursor:pointer;margin:2px 4px 2px 0}
button.secondary{background:#fff;color:#635bff;border:1px solid #635bff}
button.danger{background:#df1b41}
label{display:block;margin:8px 0;font-size:14px}input[type=text],input[type=email]{padding:7px;border:1px solid #cfd7df;border-radius:5px;width:260px}
.error{background:#fde8ec;color:#a41c3d;padding:10px 14px;border-radius:6px;margin-bottom:12px}
.notice{background:#e6f5ec;color:#0e6245;padding:10px 14px;border-radius:6px;margin-bottom:12px}
.status{display:inline-block;padding:1px 8px;border-radius:10px;background:#e3e8ee;font-size:12px}
form.inline{display:inline}
a{color:#635bff}
"""

CARDS = [
    ("success", "4242 4242 4242 4242", "Visa: the payment succeeds"),
    ("decline", "4000 0000 0000 0002", "Visa: declined (generic_decline)"),
    ("authenticate", "4000 0027 6000 3184", "Visa: needs 3-D Secure authentication"),
    ("delayed", "DE89 3704 0044 0532 0130 00", "SEPA debit: completes unpaid, settles later"),
]


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def money(amount: int | None, currency: str | None) -> str:
    cur = (currency or "usd").upper()
    if amount is None:
        return "-"
    return f"{amount / 100:,.2f} {cur}"


def when(ts: int | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def page(
    title: str, body: str, *, banner: str = "Stripe simulator", status: int = 200
) -> HTMLResponse:
    doc = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f"<header><span>{_e(banner)}</span><small>test mode · local simulator · "
        "<a style='color:#fff' href='/'>controls</a></small></header>"
        f"<main>{body}</main></body></html>"
    )
    return HTMLResponse(doc, status_code=status)


def button(action: str, label: str, fields: dict[str, str], *, cls: str = "") -> str:
    hidden = "".join(
        f"<input type='hidden' name='{_e(k)}' value='{_e(v)}'>" for k, v in fields.items()
    )
    klass = f" class='{cls}'" if cls else ""
    return (
        f"<form class='inline' method='post' action='{_e(action)}'>{hidden}"
        f"<button{klass}>{_e(label)}</button></form>"
    )


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


async def form_of(request: Request) -> dict[str, str]:
    body = (await request.body()).decode("utf-8", "replace")
    return {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}


# --------------------------------------------------------------------------- routing


async def handle(sim: SimulatorServer, request: Request) -> Response:
    path = request.url.path.rstrip("/") or "/"
    parts = path.strip("/").split("/")
    method = request.method.upper()
    try:
        if path == "/healthz":
            return PlainTextResponse("ok")
        if path in {"/", "/simulator"} and method == "GET":
            return controls_page(sim, request.query_params.get("notice"))
        if (
            parts[0] == "simulator"
            and len(parts) == 3
            and parts[1] == "actions"
            and method == "POST"
        ):
            return await control_action(sim, request, parts[2])
        if parts[0] == "simulator" and parts[1:] == ["delivery"] and method == "POST":
            return await delivery_settings(sim, request)
        if parts[0] == "checkout" and len(parts) >= 2:
            return await checkout(sim, request, parts[1], parts[2:])
        if parts[0] == "billing_portal" and len(parts) >= 2:
            return await portal(sim, request, parts[1], parts[2:])
        if parts[0] == "invoices" and len(parts) == 2:
            return invoice_page(sim, parts[1])
        if parts[0] == "receipts" and len(parts) == 2:
            return receipt_page(sim, parts[1])
    except StripeError as exc:
        return page(
            "Error",
            f"<div class='card'><div class='error'>{_e(exc.message)}</div>"
            "<a href='/'>Back to the controls</a></div>",
            status=exc.status,
        )
    return page("Not found", f"<div class='card'>No page at {_e(path)}</div>", status=404)


# --------------------------------------------------------------------------- checkout


def _line_rows(sim: SimulatorServer, session_id: str) -> str:
    rows = []
    for line in sim._session_lines(session_id):
        price = sim.get("price", line["price"])
        product = sim.find(price["product"]) or {}
        recurring = price.get("recurring")
        per = f" / {recurring['interval']}" if recurring else ""
        rows.append(
            f"<tr><td>{_e(product.get('name') or price.get('nickname') or price['id'])}"
            f"<div class='muted'>{_e(price['id'])}</div></td><td>× {line['quantity']}</td>"
            f"<td>{money(int(price.get('unit_amount') or 0) * line['quantity'], price['currency'])}{per}</td></tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def success_redirect(session: Json) -> str:
    url: str = session.get("success_url") or "/"
    return url.replace("{CHECKOUT_SESSION_ID}", session["id"])


async def checkout(
    sim: SimulatorServer, request: Request, session_id: str, rest: list[str]
) -> Response:
    session = sim.get("checkout.session", session_id)
    method = request.method.upper()
    if rest == ["authenticate"]:
        if method == "POST":
            form = await form_of(request)
            if form.get("result") == "complete":
                sim.act(
                    lambda: sim.complete_checkout(
                        session_id, email=form.get("email") or "customer@example.com"
                    )
                )
                return redirect(success_redirect(sim.get("checkout.session", session_id)))
            sim.act(lambda: sim.decline_checkout(session_id, authentication_required=True))
            return redirect(f"/checkout/{session_id}?error=authentication")
        return authenticate_page(session, request.query_params.get("email", ""))
    if rest:
        return page("Not found", "<div class='card'>No such page</div>", status=404)
    if method == "POST":
        if session["status"] != "open":
            return redirect(f"/checkout/{session_id}")
        form = await form_of(request)
        card = form.get("card", "success")
        email = form.get("email") or session.get("customer_email") or "customer@example.com"
        name = form.get("name") or "Jenny Rosen"
        if card == "decline":
            sim.act(lambda: sim.decline_checkout(session_id))
            return redirect(f"/checkout/{session_id}?error=declined")
        if card == "authenticate":
            return redirect(f"/checkout/{session_id}/authenticate?email={email}")
        paid = card != "delayed"
        sim.act(
            lambda: sim.complete_checkout(
                session_id, payment_status="paid" if paid else "unpaid", email=email, name=name
            )
        )
        return redirect(success_redirect(sim.get("checkout.session", session_id)))
    return checkout_page(sim, session, request.query_params.get("error"))


def checkout_page(sim: SimulatorServer, session: Json, error: str | None) -> HTMLResponse:
    sid = session["id"]
    customer = sim.find(session.get("customer") or "") or {}
    email = customer.get("email") or session.get("customer_email") or "customer@example.com"
    title = "Subscribe" if session["mode"] == "subscription" else "Pay"
    summary = (
        f"<div class='card'><div class='muted'>{_e(title)} · 1msg (test mode)</div>"
        f"<div class='amount'>{money(session.get('amount_total'), session.get('currency'))}</div>"
        f"{_line_rows(sim, sid)}"
        f"<p class='muted'>Session <code>{_e(sid)}</code> · expires {when(session.get('expires_at'))}</p></div>"
    )
    if session["status"] != "open":
        text = {
            "complete": "This Checkout Session is complete.",
            "expired": "This Checkout Session has expired. Go back and start again.",
        }.get(session["status"], session["status"])
        link = (
            f"<a href='{_e(success_redirect(session))}'>Continue</a>"
            if session["status"] == "complete"
            else f"<a href='{_e(session.get('cancel_url') or '/')}'>Back</a>"
        )
        return page(
            "Checkout",
            f"<div class='grid'>{summary}<div class='card'><h1>{_e(text)}</h1>{link}</div></div>",
            banner="Checkout",
        )
    messages = {
        "declined": "Your card was declined. Try another card.",
        "authentication": "We are unable to authenticate your payment method. Choose a different payment method and try again.",
    }
    err = (
        f"<div class='error'>{_e(messages.get(error or '', ''))}</div>" if error in messages else ""
    )
    radios = "".join(
        f"<label><input type='radio' name='card' value='{k}'{' checked' if k == 'success' else ''}> "
        f"<code>{_e(number)}</code> <span class='muted'>{_e(text)}</span></label>"
        for k, number, text in CARDS
    )
    back = session.get("cancel_url")
    form = (
        f"<div class='card'>{err}<h1>Pay with card</h1>"
        f"<form method='post' action='/checkout/{_e(sid)}'>"
        f"<label>Email <input type='email' name='email' value='{_e(email)}'></label>"
        f"<label>Name on card <input type='text' name='name' value='Jenny Rosen'></label>"
        f"<h2>Test card</h2>{radios}"
        f"<button id='pay' type='submit'>{_e(title)}</button></form>"
        + (f"<p><a id='back' href='{_e(back)}'>← Back (abandon)</a></p>" if back else "")
        + "</div>"
    )
    return page("Checkout", f"<div class='grid'>{summary}{form}</div>", banner="Checkout")


def authenticate_page(session: Json, email: str) -> HTMLResponse:
    sid = session["id"]
    body = (
        "<div class='card'><h1>3-D Secure authentication</h1>"
        f"<p>Your bank asks you to confirm a payment of {money(session.get('amount_total'), session.get('currency'))}.</p>"
        f"<form class='inline' method='post' action='/checkout/{_e(sid)}/authenticate'>"
        f"<input type='hidden' name='email' value='{_e(email)}'>"
        "<button name='result' value='complete'>Complete authentication</button>"
        "<button class='danger' name='result' value='fail'>Fail authentication</button></form></div>"
    )
    return page("Authenticate", body, banner="Your bank")


# --------------------------------------------------------------------------- portal


def _portal_features(sim: SimulatorServer, session: Json) -> Json:
    cfg = sim.get("billing_portal.configuration", session["configuration"])
    features: Json = cfg.get("features") or {}
    return features


async def portal(
    sim: SimulatorServer, request: Request, session_id: str, rest: list[str]
) -> Response:
    session = sim.get("billing_portal.session", session_id)
    customer_id = session["customer"]
    features = _portal_features(sim, session)
    if request.method.upper() == "POST" and len(rest) == 1:
        form = await form_of(request)
        action = rest[0]
        sub_id = form.get("subscription", "")
        if action in {"cancel", "resume"}:
            sub = sim.get("subscription", sub_id)
            if sub["customer"] != customer_id:
                raise StripeError(404, f"No such subscription: '{sub_id}'")
            cancel = features.get("subscription_cancel") or {}
            if action == "cancel":
                if not cancel.get("enabled"):
                    raise StripeError(400, "Cancellation is disabled in this portal configuration.")
                if cancel.get("mode") == "immediately":
                    sim.act(lambda: sim.delete_subscription(sub_id))
                else:
                    sim.act(lambda: sim.update_subscription(sub_id, cancel_at_period_end=True))
                notice = "Your subscription has been canceled."
            else:
                sim.act(lambda: sim.update_subscription(sub_id, cancel_at_period_end=False))
                notice = "Your subscription has been renewed."
        elif action == "payment_method":
            last4 = (form.get("number") or "4242").replace(" ", "")[-4:]
            sim.act(lambda: sim.attach_payment_method(customer_id, last4=last4))
            notice = "Your payment method has been updated."
        elif action == "pay_invoice":
            inv = sim.get("invoice", form.get("invoice", ""))
            if inv["customer"] != customer_id:
                raise StripeError(404, "No such invoice")
            sim.act(lambda: sim.pay_invoice(inv["id"]))
            notice = "The invoice has been paid."
        else:
            raise StripeError(404, f"Unknown portal action {action}")
        return redirect(f"/billing_portal/{session_id}?notice={notice}")
    return portal_page(sim, session, features, request.query_params.get("notice"))


def portal_page(
    sim: SimulatorServer, session: Json, features: Json, notice: str | None
) -> HTMLResponse:
    sid = session["id"]
    customer = sim.get("customer", session["customer"])
    base = f"/billing_portal/{sid}"
    cancel = features.get("subscription_cancel") or {}
    subs = [
        s for s in sim.objects.get("subscription", {}).values() if s["customer"] == customer["id"]
    ]
    sub_rows = []
    for sub in subs:
        item = sub["items"]["data"][0] if sub["items"]["data"] else None
        price = item["price"] if item else {}
        product = sim.find(price.get("product") or "") or {}
        period_end = sim._sub_period_end(sub)
        actions = ""
        if sub["status"] not in {"canceled", "incomplete_expired"}:
            if sub["cancel_at_period_end"] or sub.get("cancel_at"):
                state = f"Cancels {when(sub.get('cancel_at'))}"
                actions = button(
                    f"{base}/resume", "Renew subscription", {"subscription": sub["id"]}
                )
            else:
                state = f"Renews {when(period_end)}"
                if cancel.get("enabled"):
                    actions = button(
                        f"{base}/cancel",
                        "Cancel subscription",
                        {"subscription": sub["id"]},
                        cls="danger",
                    )
        else:
            state = f"Ended {when(sub.get('ended_at'))}"
        recurring = price.get("recurring") or {}
        sub_rows.append(
            f"<tr><td><b>{_e(product.get('name') or price.get('id'))}</b>"
            f"<div class='muted'>{money(price.get('unit_amount'), price.get('currency'))} per {_e(recurring.get('interval'))}"
            f" · channel {_e(sub['metadata'].get('channel_id', '-'))}</div></td>"
            f"<td><span class='status'>{_e(sub['status'])}</span></td><td>{_e(state)}</td><td>{actions}</td></tr>"
        )
    pm_id = customer["invoice_settings"].get("default_payment_method")
    pm = sim.find(pm_id or "")
    card = f"Visa •••• {_e(pm['card']['last4'])}" if pm else "Visa •••• 4242 (used at checkout)"
    pm_block = ""
    if (features.get("payment_method_update") or {}).get("enabled"):
        pm_block = (
            f"<form method='post' action='{base}/payment_method'>"
            "<label>New card number <input type='text' name='number' value='5555 5555 5555 4444'></label>"
            "<button class='secondary'>Update payment method</button></form>"
        )
    invoices = [
        i for i in sim.objects.get("invoice", {}).values() if i["customer"] == customer["id"]
    ]
    inv_rows = []
    for inv in sorted(invoices, key=lambda i: i["created"], reverse=True):
        pay = ""
        if inv["status"] == "open":
            pay = button(f"{base}/pay_invoice", "Pay", {"invoice": inv["id"]})
        inv_rows.append(
            f"<tr><td>{when(inv['created'])}</td><td>{money(inv['total'], inv['currency'])}</td>"
            f"<td><span class='status'>{_e(inv['status'])}</span></td>"
            f"<td><a href='{_e(inv['hosted_invoice_url'])}'>{_e(inv['number'])}</a> {pay}</td></tr>"
        )
    invoice_block = ""
    if (features.get("invoice_history") or {}).get("enabled", True):
        invoice_block = (
            "<div class='card'><h2>Invoice history</h2><table>"
            + ("".join(inv_rows) or "<tr><td class='muted'>No invoices</td></tr>")
            + "</table></div>"
        )
    note = f"<div class='notice'>{_e(notice)}</div>" if notice else ""
    ret = session.get("return_url")
    body = (
        f"{note}<div class='card'><h1>1msg billing</h1>"
        f"<div class='muted'>{_e(customer.get('email'))} · {_e(customer['id'])}</div>"
        + (f"<p><a id='return' href='{_e(ret)}'>← Return to 1msg</a></p>" if ret else "")
        + "</div><div class='card'><h2>Current subscriptions</h2><table>"
        + ("".join(sub_rows) or "<tr><td class='muted'>No subscriptions</td></tr>")
        + f"</table></div><div class='card'><h2>Payment method</h2><p>{card}</p>{pm_block}</div>"
        + invoice_block
    )
    return page("Customer portal", body, banner="Customer portal")


def invoice_page(sim: SimulatorServer, invoice_id: str) -> HTMLResponse:
    inv = sim.get("invoice", invoice_id)
    lines = "".join(
        f"<tr><td>{_e(line['description'])}</td><td>{when(line['period']['start'])} – {when(line['period']['end'])}</td>"
        f"<td>{money(line['amount'], line['currency'])}</td></tr>"
        for line in inv["lines"]["data"]
    )
    body = (
        f"<div class='card'><h1>Invoice {_e(inv['number'])}</h1>"
        f"<p><span class='status'>{_e(inv['status'])}</span> · {_e(inv['billing_reason'])} · {_e(inv.get('customer_email'))}</p>"
        f"<table>{lines}</table><div class='amount'>{money(inv['total'], inv['currency'])}</div></div>"
    )
    return page("Invoice", body, banner="Invoice")


def receipt_page(sim: SimulatorServer, charge_id: str) -> HTMLResponse:
    ch = sim.get("charge", charge_id)
    body = (
        f"<div class='card'><h1>Receipt</h1><div class='amount'>{money(ch['amount'], ch['currency'])}</div>"
        f"<p><span class='status'>{_e(ch['status'])}</span> · refunded {money(ch['amount_refunded'], ch['currency'])}</p></div>"
    )
    return page("Receipt", body, banner="Receipt")


# --------------------------------------------------------------------------- controls

ACTIONS: dict[str, tuple[str, Callable[[SimulatorServer, dict[str, str]], list[Json]]]] = {
    "renew_paid": ("subscription", lambda s, f: s.renew_subscription(f["subscription"], paid=True)),
    "renew_failed": (
        "subscription",
        lambda s, f: s.renew_subscription(f["subscription"], paid=False),
    ),
    "cancel_now": ("subscription", lambda s, f: s.delete_subscription(f["subscription"])),
    "pay_invoice": ("invoice", lambda s, f: s.pay_invoice(f["invoice"])),
    "refund": ("charge", lambda s, f: s.refund(f["charge"], f.get("amount"))),
    "fail_refund": ("refund", lambda s, f: s.fail_refund(f["refund"])),
    "dispute": ("charge", lambda s, f: s.open_dispute(f["charge"])),
    "win_dispute": ("dispute", lambda s, f: s.close_dispute(f["dispute"], won=True)),
    "lose_dispute": ("dispute", lambda s, f: s.close_dispute(f["dispute"], won=False)),
    "expire_checkout": ("session", lambda s, f: s.expire_checkout(f["session"])),
    "async_succeeded": ("session", lambda s, f: s.async_payment_succeeded(f["session"])),
    "async_failed": ("session", lambda s, f: s.async_payment_failed(f["session"])),
    "redeliver": ("event", lambda s, f: s.redeliver(f["event"])),
}


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


async def control_action(sim: SimulatorServer, request: Request, action: str) -> Response:
    if action not in ACTIONS:
        raise StripeError(404, f"Unknown action {action!r}; known: {', '.join(ACTIONS)}")
    form = await form_of(request)
    if not form and "json" in request.headers.get("content-type", ""):
        form = {k: str(v) for k, v in json.loads(await request.body() or b"{}").items()}
    param, run = ACTIONS[action]
    if not form.get(param):
        raise StripeError(400, f"Missing {param}", param=param)
    try:
        events = sim.act(lambda: run(sim, form))
    except StripeError as exc:
        if _wants_json(request):
            return JSONResponse(exc.body(), status_code=exc.status)
        return redirect(f"/?notice=Error: {exc.message}")
    types = [e["type"] for e in events]
    if _wants_json(request):
        return JSONResponse(
            {"action": action, "events": [{"id": e["id"], "type": e["type"]} for e in events]}
        )
    return redirect(f"/?notice={action}: {', '.join(types) or 'no events'}")


async def delivery_settings(sim: SimulatorServer, request: Request) -> Response:
    form = await form_of(request)
    delivery = sim.delivery
    if delivery is not None:
        delivery.shuffle = form.get("shuffle") == "on"
        try:
            delivery.duplicate_rate = min(1.0, max(0.0, float(form.get("duplicate_rate") or 0)))
        except ValueError:
            delivery.duplicate_rate = 0.0
    return redirect("/?notice=Delivery settings saved")


def _table(title: str, head: list[str], rows: list[str]) -> str:
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    return (
        f"<div class='card'><h2>{_e(title)}</h2><table><tr>{header}</tr>"
        + ("".join(rows) or f"<tr><td colspan='{len(head)}' class='muted'>none</td></tr>")
        + "</table></div>"
    )


def controls_page(sim: SimulatorServer, notice: str | None) -> HTMLResponse:
    act = "/simulator/actions/"
    objs = sim.objects
    with sim._lock:
        subs = list(objs.get("subscription", {}).values())[::-1]
        sessions = list(objs.get("checkout.session", {}).values())[::-1]
        charges = list(objs.get("charge", {}).values())[::-1]
        refunds = list(objs.get("refund", {}).values())[::-1]
        disputes = list(objs.get("dispute", {}).values())[::-1]
        invoices = [i for i in objs.get("invoice", {}).values() if i["status"] == "open"][::-1]
        events = list(sim.events[-40:])[::-1]
    sub_rows = []
    for s in subs:
        buttons = ""
        if s["status"] not in {"canceled", "incomplete_expired"}:
            f = {"subscription": s["id"]}
            buttons = (
                button(act + "renew_paid", "Renew: paid", f)
                + button(act + "renew_failed", "Renew: payment fails", f, cls="secondary")
                + button(act + "cancel_now", "Cancel now", f, cls="danger")
            )
        sub_rows.append(
            f"<tr><td><code>{_e(s['id'])}</code><div class='muted'>{_e(s['metadata'].get('account_id', ''))} {_e(s['metadata'].get('channel_id', ''))}</div></td>"
            f"<td><span class='status'>{_e(s['status'])}</span>{' · cancels at period end' if s['cancel_at_period_end'] else ''}</td>"
            f"<td>{when(sim._sub_period_end(s))}</td><td>{buttons}</td></tr>"
        )
    inv_rows = [
        f"<tr><td><code>{_e(i['id'])}</code></td><td>{money(i['amount_due'], i['currency'])}</td>"
        f"<td>{_e(i['billing_reason'])}</td><td>{button(act + 'pay_invoice', 'Pay now (retry succeeds)', {'invoice': i['id']})}</td></tr>"
        for i in invoices
    ]
    sess_rows = []
    for cs in sessions:
        buttons = ""
        if cs["status"] == "open":
            buttons = f"<a href='/checkout/{_e(cs['id'])}'>open page</a> " + button(
                act + "expire_checkout", "Expire now", {"session": cs["id"]}, cls="secondary"
            )
        elif cs["status"] == "complete" and cs["payment_status"] == "unpaid":
            f = {"session": cs["id"]}
            buttons = button(act + "async_succeeded", "Delayed payment succeeds", f) + button(
                act + "async_failed", "Delayed payment fails", f, cls="danger"
            )
        sess_rows.append(
            f"<tr><td><code>{_e(cs['id'][:24])}…</code><div class='muted'>{_e(cs['mode'])} · {_e(cs['metadata'].get('account_id', ''))}</div></td>"
            f"<td><span class='status'>{_e(cs['status'])}</span> {_e(cs['payment_status'])}</td>"
            f"<td>{money(cs.get('amount_total'), cs.get('currency'))}</td><td>{buttons}</td></tr>"
        )
    ch_rows = []
    for ch in charges:
        buttons = ""
        if ch["status"] == "succeeded":
            f = {"charge": ch["id"]}
            if ch["amount_refunded"] < ch["amount"]:
                buttons += button(act + "refund", "Refund", f, cls="secondary")
            if not ch["disputed"]:
                buttons += button(act + "dispute", "Open dispute", f, cls="danger")
        ch_rows.append(
            f"<tr><td><code>{_e(ch['id'])}</code></td><td>{money(ch['amount'], ch['currency'])}"
            f"{' · refunded ' + money(ch['amount_refunded'], ch['currency']) if ch['amount_refunded'] else ''}</td>"
            f"<td><span class='status'>{_e(ch['status'])}</span>{' · disputed' if ch['disputed'] else ''}</td><td>{buttons}</td></tr>"
        )
    re_rows = [
        f"<tr><td><code>{_e(r['id'])}</code></td><td>{money(r['amount'], r['currency'])}</td>"
        f"<td><span class='status'>{_e(r['status'])}</span></td>"
        f"<td>{button(act + 'fail_refund', 'Refund fails at the bank', {'refund': r['id']}, cls='danger') if r['status'] == 'succeeded' else ''}</td></tr>"
        for r in refunds
    ]
    dp_rows = []
    for d in disputes:
        buttons = ""
        if d["status"] in {
            "needs_response",
            "under_review",
            "warning_needs_response",
            "warning_under_review",
        }:
            f = {"dispute": d["id"]}
            buttons = button(act + "win_dispute", "Win", f) + button(
                act + "lose_dispute", "Lose", f, cls="danger"
            )
        dp_rows.append(
            f"<tr><td><code>{_e(d['id'])}</code></td><td>{money(d['amount'], d['currency'])}</td>"
            f"<td><span class='status'>{_e(d['status'])}</span></td><td>{buttons}</td></tr>"
        )
    delivery = sim.delivery
    if delivery is not None:
        records = delivery.records
        ev_rows = []
        for ev in events:
            rec = records.get(ev["id"])
            state = "queued"
            if rec is not None and rec.attempts:
                state = f"{rec.last_status or rec.last_error} · {rec.attempts} attempt(s)"
                if rec.deliveries > 1:
                    state += f" · {rec.deliveries} deliveries"
            ev_rows.append(
                f"<tr><td>{_e(ev['type'])}</td><td><code>{_e(ev['id'])}</code></td><td>{_e(state)}</td>"
                f"<td>{button(act + 'redeliver', 'Resend', {'event': ev['id']}, cls='secondary')}</td></tr>"
            )
        delivery_card = (
            f"<div class='card'><h2>Webhooks → {_e(delivery.url)}</h2>"
            f"<form method='post' action='/simulator/delivery'>"
            f"<label><input type='checkbox' name='shuffle'{' checked' if delivery.shuffle else ''}> "
            "deliver the events of one action in random order</label>"
            f"<label>duplicate rate (0–1) <input type='text' name='duplicate_rate' value='{delivery.duplicate_rate}'></label>"
            f"<button class='secondary'>Save</button></form><p class='muted'>{delivery.backlog} pending</p>"
            f"<table>{''.join(ev_rows)}</table></div>"
        )
    else:
        delivery_card = (
            "<div class='card'><h2>Webhooks</h2><p class='muted'>no endpoint configured</p></div>"
        )
    note = f"<div class='notice'>{_e(notice)}</div>" if notice else ""
    body = (
        note + "<h1>Stripe simulator controls</h1><p class='muted'>What takes days at Stripe, now. "
        "Every button emits the events Stripe emits, delivered to the webhook endpoint below.</p>"
        + _table("Subscriptions", ["id", "status", "period end", "advance"], sub_rows)
        + _table("Open invoices", ["id", "amount due", "reason", ""], inv_rows)
        + _table("Checkout sessions", ["id", "status", "amount", ""], sess_rows)
        + _table("Charges", ["id", "amount", "status", ""], ch_rows)
        + _table("Refunds", ["id", "amount", "status", ""], re_rows)
        + _table("Disputes", ["id", "amount", "status", ""], dp_rows)
        + delivery_card
    )
    return page("Stripe simulator", body)
