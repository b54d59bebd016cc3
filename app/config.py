"""Settings: every knob comes from the environment (documented in README.md)."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.calendar import BusinessCalendar

PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "secret", "placeholder", "xxx", "todo"}
DEV_JWT_SECRET = "dev-only-jwt-secret-not-for-production"
DEV_WEBHOOK_SECRET = "whsec_dev_only_not_for_production"
DEV_STRIPE_KEY = "sk_test_dev_only_not_for_production"


class Plan(BaseModel):
    """A channel plan on sale, tied to a Stripe recurring price."""

    code: str
    name: str
    stripe_price_id: str
    amount: int = Field(ge=0, description="Price per interval in minor units.")
    currency: str = Field(min_length=3, max_length=3)
    interval: Literal["day", "week", "month", "year"] = "month"


DEFAULT_PLANS = [
    Plan(
        code="channel_monthly",
        name="WhatsApp channel, monthly",
        stripe_price_id="price_channel_monthly_usd",
        amount=3900,
        currency="usd",
    ),
    Plan(
        code="channel_yearly",
        name="WhatsApp channel, yearly",
        stripe_price_id="price_channel_yearly_usd",
        amount=39000,
        currency="usd",
        interval="year",
    ),
]


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _json_value(value: object) -> object:
    if isinstance(value, str):
        return json.loads(value)
    return value


CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """One flat settings object; names match the environment variables."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    app_env: Literal["development", "test", "production"] = "development"
    log_level: str = "INFO"

    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:54329/billing"
    database_pool_size: int = 10

    stripe_secret_key: SecretStr = SecretStr(DEV_STRIPE_KEY)
    stripe_api_base: str | None = None
    stripe_webhook_secrets: Annotated[list[SecretStr], NoDecode] = [SecretStr(DEV_WEBHOOK_SECRET)]
    stripe_webhook_tolerance_seconds: int = 300
    stripe_max_network_retries: int = Field(default=2, ge=0, le=5)
    stripe_timeout_seconds: float = Field(default=10.0, gt=0)

    auth_jwt_secret: SecretStr = SecretStr(DEV_JWT_SECRET)
    auth_jwt_previous_secret: SecretStr | None = None
    auth_staff_jwt_secret: SecretStr | None = None
    auth_jwt_audience: str = "1msg-billing"

    cors_allowed_origins: CommaList = ["http://localhost:3000"]
    redirect_allowed_origins: CommaList = ["http://localhost:3000"]

    default_currency: str = "usd"
    business_timezone: str = "Asia/Singapore"
    business_holidays_country: str = "SG"
    event_retention_days: int = Field(default=30, ge=1)

    plans: Annotated[list[Plan], NoDecode] = DEFAULT_PLANS
    run_background_workers: bool = True
    past_due_keeps_access: bool = True

    # --- refunds and disputes (app/refunds, app/disputes) ---
    # WABA number setup/hosting fee deducted from zero-usage refunds, per currency (minor units).
    waba_setup_fees: Annotated[dict[str, int], NoDecode] = {"usd": 1500}
    # Business days for the first reply and for the decision (policy section 4).
    refund_first_response_business_days: int = Field(default=3, ge=1)
    refund_decision_business_days: int = Field(default=14, ge=1)
    # Whether a lost chargeback on a subscription payment ends that subscription's access at once.
    dispute_lost_ends_access: bool = True

    @property
    def calendar(self) -> BusinessCalendar:
        return BusinessCalendar(self.business_timezone, self.business_holidays_country)

    @field_validator("cors_allowed_origins", "redirect_allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        return _comma_list(value)

    @field_validator("stripe_webhook_secrets", mode="before")
    @classmethod
    def _split_secrets(cls, value: object) -> object:
        return _comma_list(value)

    @field_validator("plans", mode="before")
    @classmethod
    def _parse_plans(cls, value: object) -> object:
        return _json_value(value)

    @field_validator("waba_setup_fees", mode="before")
    @classmethod
    def _parse_setup_fees(cls, value: object) -> object:
        parsed = _json_value(value)
        if isinstance(parsed, dict):
            return {str(k).lower(): v for k, v in parsed.items()}
        return parsed

    @field_validator("waba_setup_fees")
    @classmethod
    def _non_negative_fees(cls, value: dict[str, int]) -> dict[str, int]:
        for currency, fee in value.items():
            if len(currency) != 3 or fee < 0:
                raise ValueError("WABA_SETUP_FEES maps 3-letter currencies to fees >= 0")
        return value

    @field_validator("default_currency")
    @classmethod
    def _lower_currency(cls, value: str) -> str:
        return value.lower()

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        if self.app_env == "development":
            return self
        problems = [name for name, value in self._secrets() if _is_placeholder(value)]
        if problems:
            raise ValueError(
                "missing or placeholder secrets outside development mode: " + ", ".join(problems)
            )
        return self

    def _secrets(self) -> list[tuple[str, str]]:
        secrets = [
            ("STRIPE_SECRET_KEY", self.stripe_secret_key.get_secret_value()),
            ("AUTH_JWT_SECRET", self.auth_jwt_secret.get_secret_value()),
        ]
        if not self.stripe_webhook_secrets:
            secrets.append(("STRIPE_WEBHOOK_SECRETS", ""))
        secrets += [
            ("STRIPE_WEBHOOK_SECRETS", s.get_secret_value()) for s in self.stripe_webhook_secrets
        ]
        return secrets

    @property
    def stripe_livemode(self) -> bool:
        return self.stripe_secret_key.get_secret_value().startswith(("sk_live_", "rk_live_"))

    def plan(self, code: str) -> Plan | None:
        return next((plan for plan in self.plans if plan.code == code), None)


def _is_placeholder(value: str) -> bool:
    return (
        value.strip().lower() in PLACEHOLDER_SECRETS or "dev_only" in value or "dev-only" in value
    )


@lru_cache
def get_settings() -> Settings:
    return Settings()
