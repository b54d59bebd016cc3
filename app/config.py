"""Settings: every knob comes from the environment (documented in README.md)."""

from __future__ import annotations

import email.policy
import json
from email.errors import MessageError
from email.message import EmailMessage
from functools import lru_cache
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays
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


STRIPE_MAXIMUM_AMOUNT = 99_999_999
"""Stripe charges amounts of up to eight digits in minor units (its currencies guide): a larger
top-up would be refused by Stripe at checkout (502) rather than by us."""


class TopUpLimit(BaseModel):
    """Bounds of one top-up payment in a currency, in minor units; `max` at most
    `STRIPE_MAXIMUM_AMOUNT`, refused at start-up otherwise."""

    min: int = Field(gt=0)
    max: int = Field(gt=0, le=STRIPE_MAXIMUM_AMOUNT)

    @model_validator(mode="after")
    def _ordered(self) -> TopUpLimit:
        if self.min > self.max:
            raise ValueError("top-up min exceeds max")
        return self


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

    # hide_input_in_errors: an error that stops the service must not print its input (every
    # secret, as the environment gave it)
    model_config = SettingsConfigDict(
        env_file=None, extra="ignore", case_sensitive=False, hide_input_in_errors=True
    )

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
    event_batch_size: int = Field(default=1000, ge=1, le=1000)

    plans: Annotated[list[Plan], NoDecode] = DEFAULT_PLANS
    run_background_workers: bool = True
    past_due_keeps_access: bool = True

    # Email delivery (app/notifications): the outbox worker's SMTP relay and retry policy.
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_tls: Literal["none", "starttls", "tls"] = "none"
    smtp_timeout_seconds: float = Field(default=30.0, gt=0)
    email_from: str = "1msg billing <billing@1msg.io>"
    email_max_attempts: int = Field(default=8, ge=1, le=50)
    email_retry_base_seconds: float = Field(default=30.0, gt=0)
    email_retry_max_seconds: float = Field(default=3600.0, gt=0)
    email_batch_size: int = Field(default=20, ge=1, le=500)
    email_poll_seconds: float = Field(default=5.0, gt=0)
    email_sending_stale_seconds: float = Field(default=900.0, gt=0)

    # --- checkout, portal and balance (app/checkout, app/portal, app/balance) ---------------
    top_up_limits: Annotated[dict[str, TopUpLimit], NoDecode] = {
        "usd": TopUpLimit(min=500, max=500000)
    }
    stripe_sessions_per_account_per_minute: int = Field(default=10, ge=1)
    stripe_portal_configuration_id: str | None = None
    idempotency_wait_seconds: float = Field(default=10.0, ge=0)

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

    @field_validator("top_up_limits", "waba_setup_fees", mode="before")
    @classmethod
    def _parse_currency_map(cls, value: object) -> object:
        """JSON objects keyed by currency; keys are lower-cased."""
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

    @field_validator("business_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        """Refused at start: every refund request's deadlines and every maintenance window's
        length are computed per request in this zone (else each of them was a 500)."""
        try:
            ZoneInfo(value)
        except (ValueError, ZoneInfoNotFoundError):
            raise ValueError(f"BUSINESS_TIMEZONE {value!r} is no IANA time zone") from None
        return value

    @field_validator("business_holidays_country")
    @classmethod
    def _known_holidays_country(cls, value: str) -> str:
        """Refused at start, like the time zone: the public holidays that are not business
        days come from the `holidays` library, which knows upper-case ISO codes."""
        try:
            holidays.country_holidays(value)
        except NotImplementedError:
            raise ValueError(
                f"BUSINESS_HOLIDAYS_COUNTRY {value!r} is no country the holidays library knows"
            ) from None
        return value

    @field_validator("email_from")
    @classmethod
    def _one_sender_address(cls, value: str) -> str:
        """Refused at start: EMAIL_FROM is every notice's `From:`, its envelope sender and the
        domain of its `Message-ID`, so it must be one ASCII address with a domain (an unquoted
        comma in the name makes it two, the first a bare word: every notice then had a sender
        the relay refuses)."""
        message = EmailMessage(policy=email.policy.SMTP)
        try:
            message["From"] = value
            addresses = message["From"].addresses
        except (ValueError, IndexError, MessageError):
            addresses = ()
        if (
            len(addresses) != 1
            or not addresses[0].username
            or not addresses[0].domain
            or not addresses[0].addr_spec.isascii()
        ):
            raise ValueError(
                "EMAIL_FROM must be one sender address, e.g. '1msg billing <billing@1msg.io>'"
            )
        return value

    @field_validator("default_currency")
    @classmethod
    def _lower_currency(cls, value: str) -> str:
        return value.lower()

    @model_validator(mode="after")
    def _stale_after_smtp_timeout(self) -> Settings:
        # A row is declared stuck in `sending` only long after any live worker would have given
        # up on its SMTP conversation (each SMTP step may take up to the timeout).
        if self.email_sending_stale_seconds < 10 * self.smtp_timeout_seconds:
            raise ValueError(
                "EMAIL_SENDING_STALE_SECONDS must be at least 10 × SMTP_TIMEOUT_SECONDS"
            )
        return self

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        if self.app_env == "development":
            return self
        problems = [name for name, value in self._secrets() if _is_placeholder(value)]
        staff = self.auth_staff_jwt_secret
        ordinary = (self.auth_jwt_secret, self.auth_jwt_previous_secret)
        if staff is not None and any(
            s is not None and s.get_secret_value() == staff.get_secret_value() for s in ordinary
        ):
            # whoever signs ordinary tokens could sign staff ones
            problems.append("AUTH_STAFF_JWT_SECRET (same as an ordinary JWT secret)")
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
        # Optional ones count once set: a token signed with either is accepted (a staff one for
        # `finance` and `ops`), so an empty or placeholder value is as bad as the main secret's.
        for name, optional in (
            ("AUTH_JWT_PREVIOUS_SECRET", self.auth_jwt_previous_secret),
            ("AUTH_STAFF_JWT_SECRET", self.auth_staff_jwt_secret),
        ):
            if optional is not None:
                secrets.append((name, optional.get_secret_value()))
        return secrets

    @property
    def stripe_livemode(self) -> bool:
        return self.stripe_secret_key.get_secret_value().startswith(("sk_live_", "rk_live_"))

    def plan(self, code: str) -> Plan | None:
        return next((plan for plan in self.plans if plan.code == code), None)

    @property
    def supported_currencies(self) -> frozenset[str]:
        """Currencies money may move in: top-up currencies and plan currencies."""
        return frozenset(self.top_up_limits) | {plan.currency.lower() for plan in self.plans}


def _is_placeholder(value: str) -> bool:
    return (
        value.strip().lower() in PLACEHOLDER_SECRETS or "dev_only" in value or "dev-only" in value
    )


@lru_cache
def get_settings() -> Settings:
    return Settings()
