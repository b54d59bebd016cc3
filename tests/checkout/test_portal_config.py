"""`billing portal-config` against the Stripe fake (which validates every parameter)."""

from __future__ import annotations

from typing import Any

import pytest

from app import cli
from app.config import get_settings
from tests.stripe_fake import StripeFake


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, settings: Any, stripe_fake: StripeFake) -> None:
    monkeypatch.setenv("STRIPE_API_BASE", stripe_fake.url)
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("REDIRECT_ALLOWED_ORIGINS", "https://app.1msg.io")
    monkeypatch.delenv("STRIPE_PORTAL_CONFIGURATION_ID", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_portal_config_enables_what_the_policy_allows_and_updates_in_place(
    cli_env: None, stripe_fake: StripeFake, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["portal-config"]) == 0
    [config] = stripe_fake.all("billing_portal.configuration")
    assert capsys.readouterr().out.strip() == config["id"]
    features = config["features"]
    assert features["payment_method_update"]["enabled"] is True
    assert features["invoice_history"]["enabled"] is True
    cancel = features["subscription_cancel"]
    assert (cancel["enabled"], cancel["mode"], cancel["proration_behavior"]) == (
        True,
        "at_period_end",
        "none",
    )
    update = features["subscription_update"]
    assert update["enabled"] is True
    assert update["proration_behavior"] == "create_prorations"
    assert update["default_allowed_updates"] == ["price"]
    prices = sorted(p for product in update["products"] for p in product["prices"])
    assert prices == ["price_channel_monthly_usd", "price_channel_yearly_usd"]
    assert config["default_return_url"] == "https://app.1msg.io"

    assert cli.main(["portal-config", "--id", config["id"], "--headline", "1msg billing"]) == 0
    [updated] = stripe_fake.all("billing_portal.configuration")
    assert updated["id"] == config["id"]
    assert updated["business_profile"]["headline"] == "1msg billing"
    rejected = [r for r in stripe_fake.requests if r.status and r.status >= 400]
    assert rejected == []
