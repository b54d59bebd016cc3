"""A person clicks through Checkout and the Customer Portal served by the Stripe simulator in a
real headless browser (Debian's chromium driven by Playwright); the service sees the outcome
only through the signed webhooks the simulator delivers."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, Route, async_playwright

from tests.conftest import ROOT
from tests.simulator.conftest import APP_ORIGIN, Stack

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
# SIMULATOR_SCREENSHOTS=1 refreshes the README's screenshots in docs/screenshots/.
SCREENSHOTS = ROOT / "docs" / "screenshots"


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1100, "height": 900})
    tab = await context.new_page()

    async def frontend(route: Route) -> None:  # the 1msg web app the redirects return to
        await route.fulfill(status=200, content_type="text/html", body="<h1>1msg app</h1>")

    await tab.route(f"{APP_ORIGIN}/**", frontend)
    yield tab
    await context.close()


async def snapshot(page: Page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes().startswith(b"\x89PNG")
    if os.environ.get("SIMULATOR_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOTS / f"{name}.png")


async def subscriptions(stack: Stack, account: str) -> list[dict[str, Any]]:
    response = await stack.http.get(
        f"/v1/accounts/{account}/subscriptions", headers=stack.headers(account)
    )
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


async def test_a_person_pays_in_checkout_then_cancels_at_period_end_in_the_portal(
    stack: Stack, page: Page, tmp_path: Path
) -> None:
    account = "acc_browser"
    created = await stack.http.post(
        f"/v1/accounts/{account}/checkout-sessions",
        json={
            "purpose": "subscription",
            "plan": "channel_monthly",
            "channel_id": "chan_browser",
            "success_url": f"{APP_ORIGIN}/billing/done",
            "cancel_url": f"{APP_ORIGIN}/billing",
        },
        headers=stack.headers(account),
    )
    assert created.status_code == 201, created.text
    checkout_url = created.json()["url"]
    assert checkout_url.startswith(stack.simulator.url + "/checkout/")

    await page.goto(checkout_url)
    assert "39.00 USD" in await page.inner_text("body")
    await snapshot(page, tmp_path, "checkout")

    # A declined card first: the page says so and the session stays open.
    await page.check("input[value=decline]")
    await page.click("#pay")
    assert "Your card was declined" in await page.inner_text(".error")
    assert await subscriptions(stack, account) == []

    await page.check("input[value=success]")
    await page.click("#pay")
    await page.wait_for_url(f"{APP_ORIGIN}/billing/done**")
    assert "session_id=" in page.url

    async def active() -> list[dict[str, Any]]:
        subs = await subscriptions(stack, account)
        return [s for s in subs if s["status"] == "active" and s["has_access"]]

    [subscription] = await stack.eventually(active)
    assert subscription["channel_id"] == "chan_browser"
    assert subscription["plan"] == "channel_monthly"
    assert subscription["cancel_at_period_end"] is False

    portal = await stack.http.post(
        f"/v1/accounts/{account}/portal-sessions",
        json={"return_url": f"{APP_ORIGIN}/billing"},
        headers=stack.headers(account),
    )
    assert portal.status_code == 201, portal.text
    await page.goto(portal.json()["url"])
    assert "Renews" in await page.inner_text("body")
    await snapshot(page, tmp_path, "portal")

    await page.click("text=Cancel subscription")
    assert "has been canceled" in await page.inner_text(".notice")

    async def cancelling() -> list[dict[str, Any]]:
        subs = await subscriptions(stack, account)
        return [s for s in subs if s["cancel_at_period_end"]]

    [cancelled] = await stack.eventually(cancelling)
    assert cancelled["status"] == "active"
    assert cancelled["has_access"] is True
    assert cancelled["cancel_at"] is not None

    await page.goto(stack.simulator.url + "/")
    assert "cancels at period end" in await page.inner_text("body")
    await snapshot(page, tmp_path, "controls")


async def test_the_service_converges_under_shuffled_and_duplicated_delivery_of_a_failed_renewal(
    stack: Stack,
) -> None:
    account = "acc_renewal"
    delivery = stack.simulator.delivery
    assert delivery is not None
    delivery.shuffle, delivery.duplicate_rate = True, 1.0
    try:
        created = await stack.http.post(
            f"/v1/accounts/{account}/checkout-sessions",
            json={
                "purpose": "subscription",
                "plan": "channel_yearly",
                "channel_id": "chan_renewal",
                "success_url": f"{APP_ORIGIN}/billing/done",
                "cancel_url": f"{APP_ORIGIN}/billing",
            },
            headers=stack.headers(account),
        )
        assert created.status_code == 201, created.text
        sim = httpx.AsyncClient(base_url=stack.simulator.url)
        stack.clients.append(sim)
        paid = await sim.post(created.json()["url"], data={"card": "success"})
        assert paid.status_code == 303

        async def status_is(wanted: str) -> list[dict[str, Any]]:
            subs = await subscriptions(stack, account)
            return [s for s in subs if s["status"] == wanted]

        [active] = await stack.eventually(lambda: status_is("active"))
        first_period_end = active["current_period_end"]

        async def control(action: str, **fields: str) -> None:
            response = await sim.post(
                f"/simulator/actions/{action}", data=fields, headers={"Accept": "application/json"}
            )
            assert response.status_code == 200, response.text

        await control("renew_failed", subscription=active["id"])
        [past_due] = await stack.eventually(lambda: status_is("past_due"))
        assert past_due["current_period_end"] > first_period_end

        invoice = stack.simulator.get("subscription", active["id"])["latest_invoice"]
        await control("pay_invoice", invoice=invoice)
        [recovered] = await stack.eventually(lambda: status_is("active"))
        assert recovered["has_access"] is True
        assert recovered["current_period_end"] == past_due["current_period_end"]
    finally:
        delivery.shuffle, delivery.duplicate_rate = False, 0.0
