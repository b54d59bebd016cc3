"""problem+json for every error, health and readiness, body limits, CORS, settings, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import jwt
import pytest
from pydantic import SecretStr, ValidationError

from app import cli
from app.config import Settings
from app.main import create_app
from tests.conftest import JWT_SECRET, ROOT, bearer, create_database, drop_database, make_settings
from tests.foundation.test_auth import assert_problem


async def test_unknown_path_is_problem_404(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v1/nothing-here"), 404, "not_found")


async def test_wrong_method_is_problem_405(client: httpx.AsyncClient) -> None:
    assert_problem(await client.post("/healthz"), 405, "method_not_allowed")


async def test_body_over_one_mebibyte_is_413(client: httpx.AsyncClient) -> None:
    big = b"x" * (1024 * 1024 + 1)
    response = await client.post("/v1/plans", content=big)
    assert_problem(response, 413, "payload_too_large")


async def test_healthz_and_readyz_ok(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


async def test_readyz_503_when_database_unreachable(settings: Settings) -> None:
    down = settings.model_copy(
        update={"database_url": "postgresql+asyncpg://postgres@127.0.0.1:1/billing"}
    )
    app = create_app(down)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
    ):
        response = await http.get("/readyz")
    assert_problem(response, 503, "service_unavailable")
    assert "unreachable" in response.json()["detail"]


async def test_readyz_503_when_database_not_migrated(settings: Settings) -> None:
    name = f"billing_test_unmigrated_{os.getpid()}"
    url = await create_database(name)
    try:
        app = create_app(make_settings(url, settings.stripe_api_base or ""))
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
        ):
            response = await http.get("/readyz")
        assert_problem(response, 503, "service_unavailable")
    finally:
        await drop_database(name)


async def test_readyz_stays_ready_when_the_next_release_migrated_ahead_of_its_rollout(
    settings: Settings,
) -> None:
    """The runbook migrates before each rollout, while the old replicas still serve: a
    database at a revision this code does not know (newer) keeps them ready, or the load
    balancer would drop every replica at once; one behind the code's head is not ready."""
    import asyncpg

    from tests.conftest import plain_dsn

    name = f"billing_test_ahead_{os.getpid()}"
    url = await create_database(name)
    try:
        conn = await asyncpg.connect(plain_dsn(url))
        await conn.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
        app = create_app(make_settings(url, settings.stripe_api_base or ""))
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
        ):
            await conn.execute("INSERT INTO alembic_version VALUES ('9999_next_release')")
            ahead = await http.get("/readyz")
            await conn.execute("UPDATE alembic_version SET version_num = '0001'")
            behind = await http.get("/readyz")
        await conn.close()
        assert ahead.status_code == 200, ahead.text
        assert_problem(behind, 503, "service_unavailable")
    finally:
        await drop_database(name)


async def test_metrics_count_requests(client: httpx.AsyncClient) -> None:
    await client.get("/healthz")
    body = (await client.get("/metrics")).text
    assert 'billing_http_requests_total{method="GET",route="/healthz",status="200"}' in body
    assert "billing_http_request_duration_seconds_bucket" in body


async def test_request_methods_a_client_invents_add_no_metric_series(
    client: httpx.AsyncClient,
) -> None:
    """Every label value is a new series kept for the life of the process: methods outside
    HTTP's own are counted under one label, so a client sending made-up methods cannot grow
    the process's memory and /metrics without bound."""
    for n in range(50):
        response = await client.request(f"X{n}INVENTED", "/healthz")
        assert response.status_code == 405
    body = (await client.get("/metrics")).text
    assert "INVENTED" not in body
    assert 'billing_http_requests_total{method="other",route="/healthz",status="405"} 50.0' in body


async def test_cors_allows_only_configured_origins(client: httpx.AsyncClient) -> None:
    preflight = {"Access-Control-Request-Method": "POST"}
    allowed = await client.options(
        "/v1/plans", headers={"Origin": "https://app.1msg.io", **preflight}
    )
    assert allowed.headers.get("access-control-allow-origin") == "https://app.1msg.io"
    denied = await client.options(
        "/v1/plans", headers={"Origin": "https://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in denied.headers


@pytest.mark.parametrize(
    ("origin", "extra", "refused"),
    [
        ("https://evil.example", {}, "origin"),
        ("https://app.1msg.io", {"Access-Control-Request-Headers": "x-evil"}, "headers"),
    ],
)
async def test_a_refused_cors_preflight_answers_problem_json_like_every_error(
    client: httpx.AsyncClient, origin: str, extra: dict[str, str], refused: str
) -> None:
    denied = await client.options(
        "/v1/plans",
        headers={"Origin": origin, "Access-Control-Request-Method": "GET", **extra},
    )
    assert denied.status_code == 400
    assert denied.headers["content-type"] == "application/problem+json"
    body = denied.json()
    assert body["status"] == 400 and body["code"] == "cors_not_allowed"
    assert set(body) >= {"type", "title", "status", "detail", "code"}
    assert refused in body["detail"]
    assert "access-control-allow-origin" not in denied.headers or refused != "origin"


def test_production_refuses_placeholder_secrets() -> None:
    with pytest.raises(ValidationError) as excinfo:
        Settings(app_env="production", auth_jwt_secret=SecretStr("changeme"))
    message = str(excinfo.value)
    assert "AUTH_JWT_SECRET" in message
    assert "STRIPE_SECRET_KEY" in message
    assert "STRIPE_WEBHOOK_SECRETS" in message
    ok = Settings(
        app_env="production",
        stripe_secret_key=SecretStr("sk_live_" + "x" * 24),
        stripe_webhook_secrets=[SecretStr("whsec_" + "y" * 24)],
        auth_jwt_secret=SecretStr("z" * 40),
    )
    assert ok.stripe_livemode


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("auth_jwt_previous_secret", "changeme"),
        ("auth_jwt_previous_secret", "dev-only-jwt-secret-not-for-production"),
        ("auth_jwt_previous_secret", ""),
        ("auth_staff_jwt_secret", "secret"),
        ("auth_staff_jwt_secret", ""),
        ("auth_staff_jwt_secret", "z" * 40),  # the ordinary secret: anyone signing those is staff
    ],
)
def test_production_refuses_placeholder_rotation_and_staff_secrets(
    setting: str, value: str
) -> None:
    """A token signed with a placeholder previous or staff secret would be accepted (a staff
    one even for `finance`/`ops`): outside development they are refused like the others."""
    production = {
        "app_env": "production",
        "stripe_secret_key": SecretStr("sk_live_" + "x" * 24),
        "stripe_webhook_secrets": [SecretStr("whsec_" + "y" * 24)],
        "auth_jwt_secret": SecretStr("z" * 40),
    }
    with pytest.raises(ValidationError) as excinfo:
        Settings(**production, **{setting: SecretStr(value)})
    assert setting.upper() in str(excinfo.value)
    Settings(**production, **{setting: SecretStr("w" * 40)})


def test_top_up_limits_above_what_stripe_charges_are_refused_at_start() -> None:
    """Stripe charges at most eight digits of minor units: a TOP_UP_LIMITS max above that would
    let clients start top-ups Stripe refuses (a 502 at checkout) instead of our 422."""
    with pytest.raises(ValidationError) as excinfo:
        Settings(top_up_limits={"usd": {"min": 500, "max": 100_000_000}})
    assert "top_up_limits.usd.max" in str(excinfo.value)
    assert (
        Settings(top_up_limits={"usd": {"min": 500, "max": 99_999_999}}).top_up_limits["usd"].max
        == 99_999_999
    )


def test_a_refused_configuration_never_shows_a_secret() -> None:
    """The error that stops the service names what is wrong, not the values it was given:
    pydantic would show the settings' input (its start and end), which holds every secret."""
    environment = {  # as strings, the way the environment gives them
        "app_env": "production",
        "stripe_secret_key": "sk_live_key-never-shown",
        "auth_jwt_secret": "jwt-secret-never-shown-" + "z" * 20,
        "smtp_password": "smtp-password-never-shown",
    }
    with pytest.raises(ValidationError) as excinfo:
        Settings(**environment)
    message = str(excinfo.value)
    assert "STRIPE_WEBHOOK_SECRETS" in message
    assert "never-shown" not in message


def test_settings_parse_comma_lists_and_plans_from_environment() -> None:
    env = {
        "STRIPE_WEBHOOK_SECRETS": "whsec_a, whsec_b",
        "REDIRECT_ALLOWED_ORIGINS": "https://a.example,https://b.example",
        "PLANS": json.dumps(
            [
                {
                    "code": "p",
                    "name": "P",
                    "stripe_price_id": "price_1",
                    "amount": 5,
                    "currency": "eur",
                }
            ]
        ),
    }
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        parsed = Settings()
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert [s.get_secret_value() for s in parsed.stripe_webhook_secrets] == ["whsec_a", "whsec_b"]
    assert parsed.redirect_allowed_origins == ["https://a.example", "https://b.example"]
    assert parsed.plan("p") is not None and parsed.plan("p").currency == "eur"  # type: ignore[union-attr]


def test_mint_token_command_signs_verifiable_tokens() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "mint-token",
            "--sub",
            "ops-bot",
            "--scope",
            "ops billing:read",
        ],
        cwd=ROOT,
        env={**os.environ, "AUTH_JWT_SECRET": JWT_SECRET, "APP_ENV": "development"},
        capture_output=True,
        text=True,
        check=True,
    )
    claims = jwt.decode(
        result.stdout.strip(), JWT_SECRET, algorithms=["HS256"], audience="1msg-billing"
    )
    assert claims["sub"] == "ops-bot"
    assert claims["scope"] == "ops billing:read"
    refused = subprocess.run(
        [sys.executable, "-m", "app.cli", "mint-token", "--sub", "x", "--scope", "root"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 2
    assert "unknown scopes: root" in refused.stderr
    empty = subprocess.run(  # a token the service would refuse (401): not minted
        [sys.executable, "-m", "app.cli", "mint-token", "--sub", "x", "--scope", " "],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (empty.returncode, empty.stdout) == (2, "")
    assert "--scope names no scope" in empty.stderr


async def test_request_id_is_echoed(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz", headers={"X-Request-Id": "req-123"})
    assert response.headers["x-request-id"] == "req-123"


__all__ = ["bearer"]


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--sub", "", "--scope", "ops"], "--sub"),
        (["--sub", "x", "--account-id", ""], "--account-id"),
        (["--sub", "x", "--scope", "ops", "--ttl", "0"], "--ttl"),
        (["--sub", "x", "--account-id", "acc_1", "--ttl", "-60"], "--ttl"),
    ],
)
def test_mint_token_refuses_to_mint_a_token_the_service_would_refuse(
    args: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty `sub` or `account_id` (401 at the service) or a lifetime that has already
    ended (expired on arrival) is a usage error, not a token printed with exit 0."""
    try:
        code: object = cli.main(["mint-token", *args])
    except SystemExit as exited:  # argparse's usage error
        code = exited.code
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert complaint in captured.err


@pytest.mark.parametrize(
    "sender",
    [
        "1msg Billing, Finance <billing@1msg.io>",  # a list: MAIL FROM:<1msg>, Message-ID @1msg
        "1msg billing",  # no address at all
        "billing",  # a mailbox without a domain
    ],
)
def test_an_email_from_that_is_not_one_sender_address_is_refused_at_start(sender: str) -> None:
    """EMAIL_FROM is the `From:` of every notice, its envelope sender and the domain of each
    `Message-ID`: one that is not a single address with a domain (an unquoted comma in the
    name makes it two) made every notice carry a sender the relay refuses or cannot bounce to,
    so refund replies and maintenance notices were lost; the service refuses to start."""
    with pytest.raises(ValidationError) as excinfo:
        Settings(email_from=sender)
    assert "EMAIL_FROM" in str(excinfo.value)
    for good in ("1msg billing <billing@1msg.io>", "billing@1msg.io", "1msg Фин <b@1msg.io>"):
        assert Settings(email_from=good).email_from == good
