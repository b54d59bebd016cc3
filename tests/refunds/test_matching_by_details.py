"""A request identified by its payment's date, amount and currency (policy section 4: "stating
payment details, date, amount") names the money the client paid: a declined attempt of the
same amount that day does not make it ambiguous."""

from __future__ import annotations

import shutil
import zoneinfo
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from app.models import Payment
from tests.conftest import Deliver, TokenFactory, make_settings
from tests.refunds.flows import pay_subscription, pay_top_up
from tests.refunds.test_refund_workflow import file_request
from tests.stripe_fake import StripeFake
from tests.webhooks.flows import open_checkout

SGT = ZoneInfo("Asia/Singapore")


async def test_a_declined_attempt_the_same_day_does_not_hide_the_payment_that_succeeded(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    declined = await open_checkout(app, account_id="acc_d", purpose="top_up", amount=4200)
    await deliver(stripe_fake.decline_checkout(declined))
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_d", amount=4200)
    async with app.state.session_factory() as session:
        statuses = sorted(
            await session.scalars(select(Payment.status).where(Payment.account_id == "acc_d"))
        )
    assert statuses == ["failed", "succeeded"]  # two payments of 4200 usd today

    request = await file_request(
        client,
        token,
        "acc_d",
        description="Please refund my top-up",
        payment_date=datetime.now(SGT).date().isoformat(),
        amount=4200,
        currency="usd",
    )

    assert (request["status"], request["payment_id"]) == ("received", paid.payment_id)
    assert request["missing_information"] == []


async def test_the_checkout_session_a_client_returned_from_names_its_subscription_payment(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
) -> None:
    # A month paid through Checkout 35 days ago, renewed 5 days ago: two payments.
    now = datetime.now(UTC).replace(microsecond=0)
    stripe_fake.set_time((now - timedelta(days=35)).timestamp())
    paid = await pay_subscription(
        app, stripe_fake, deliver, account_id="acc_cs", channel_id="ch_cs"
    )
    assert paid.subscription_id is not None
    stripe_fake.set_time((now - timedelta(days=5)).timestamp())
    await deliver(stripe_fake.renew_subscription(paid.subscription_id))
    [checkout] = stripe_fake.all("checkout.session")

    # The `session_id` the success URL brought the client back with is what the client has
    # (README: matched by "a Stripe ... checkout session id"): it names the payment Checkout
    # took, the subscription's first, and the request's clock starts at once.
    request = await file_request(client, token, "acc_cs", payment_reference=checkout["id"])

    assert request["status"] == "received", request
    assert request["payment_id"] == paid.payment_id
    assert request["first_response_due"] is not None


@pytest.fixture
def zone_only_python_knows(tmp_path: Path) -> Iterator[str]:
    """A time zone in Python's tz database and not in PostgreSQL's: the service's image and the
    database server carry tz data of different releases (a zone new in one, such as
    America/Ciudad_Juarez in 2022g, is unknown to the other)."""
    found = next(
        Path(root) / "Asia" / "Singapore"
        for root in zoneinfo.TZPATH
        if (Path(root) / "Asia" / "Singapore").is_file()
    )
    (tmp_path / "Asia").mkdir()
    shutil.copy(found, tmp_path / "Asia" / "Billingtown")
    zoneinfo.reset_tzpath(to=[str(tmp_path), *zoneinfo.TZPATH])
    try:
        yield "Asia/Billingtown"
    finally:
        zoneinfo.reset_tzpath()


async def test_a_payment_date_is_matched_in_a_business_time_zone_postgres_does_not_know(
    app: FastAPI,
    client: httpx.AsyncClient,
    stripe_fake: StripeFake,
    deliver: Deliver,
    token: TokenFactory,
    zone_only_python_knows: str,
) -> None:
    """BUSINESS_TIMEZONE is refused at start only when Python does not know it; one PostgreSQL's
    tz database lacks must not make matching by `payment_date` a 500: the payment's local day
    is computed by the service, not by the database's zone names."""
    accepted = make_settings(
        app.state.settings.database_url,
        app.state.settings.stripe_api_base,
        business_timezone=zone_only_python_knows,
    )
    app.state.settings.business_timezone = accepted.business_timezone
    paid = await pay_top_up(app, stripe_fake, deliver, account_id="acc_z", amount=4300)

    request = await file_request(
        client,
        token,
        "acc_z",
        description="Please refund my top-up",
        payment_date=datetime.now(SGT).date().isoformat(),
        amount=4300,
        currency="usd",
    )

    assert (request["status"], request["payment_id"]) == ("received", paid.payment_id)
