"""Property-based fuzzing of the public API from the committed `openapi/openapi.json`
(schemathesis generates requests from the document; hypothesis drives them through the ASGI app
in-process, against Postgres and the Stripe fake).

Each operation gets requests conforming to its schema and requests that break it, sent with one
of: the account's own user token (the path's `account_id` set to its account), a service token
carrying every scope, a staff token (`finance ops`), or none. Every answer must be below 500 and
conform to the document: a documented status code, the documented content type, a body matching
the documented schema, and schema-breaking requests must not succeed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import load_all_checks
from schemathesis.specs.openapi import checks as openapi_checks

from tests.conftest import TokenFactory, bearer

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "openapi" / "openapi.json"
BASE_URL = "http://billing.test"
USER_ACCOUNT = "acc_fuzz"
APP_URL = "https://app.1msg.io"
PRINCIPALS = ["user", "user", "service", "service", "staff", "none"]

SCHEMA = schemathesis.openapi.from_path(DOCUMENT)
SCHEMA.config.update(base_url=BASE_URL)
OPERATIONS = {result.ok().label: result.ok() for result in SCHEMA.get_all_operations()}
CHECKS = [
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.negative_data_rejection,
]
load_all_checks()


def realistic(body: Any) -> Any:
    """Values random generation almost never hits but the service needs to go past validation:
    redirect URLs on the allowed origin, a plan on sale, the account's currency."""
    if not isinstance(body, dict):
        return body
    fixed = dict(body)
    for name, value in body.items():
        if name.endswith("_url"):
            fixed[name] = f"{APP_URL}/fuzz"
        elif name == "plan":
            fixed[name] = "channel_monthly"
        elif name == "currency":
            fixed[name] = "usd"
        elif name == "amount" and isinstance(value, int) and value <= 0:
            fixed[name] = 1000
    return fixed


def headers_for(principal: str, token: TokenFactory) -> dict[str, str]:
    if principal == "user":
        return bearer(token(account_id=USER_ACCOUNT, sub="fuzz-user"))
    if principal == "service":
        return bearer(
            token(scope="billing:read billing:write usage:write finance ops", sub="fuzz-svc")
        )
    if principal == "staff":
        return bearer(token(scope="finance ops", sub="fuzz-staff"))
    return {}


async def send(client: httpx.AsyncClient, kwargs: dict[str, Any]) -> httpx.Response:
    body: dict[str, Any] = {}
    if "json" in kwargs:
        body["content"] = json.dumps(kwargs["json"]).encode()
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        body["content"] = data if isinstance(data, bytes | str) else json.dumps(data)
    return await client.request(
        kwargs["method"],
        kwargs["url"],
        params=kwargs.get("params"),
        headers={k: str(v) for k, v in (kwargs.get("headers") or {}).items()},
        **body,
    )


@pytest.mark.parametrize("label", sorted(OPERATIONS))
@settings(
    max_examples=40,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
async def test_fuzzed_requests_get_documented_answers_and_no_server_error(
    label: str, client: httpx.AsyncClient, token: TokenFactory, data: st.DataObject
) -> None:
    operation = OPERATIONS[label]
    mode = data.draw(
        st.sampled_from([GenerationMode.POSITIVE, GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    )
    case = data.draw(operation.as_strategy(generation_mode=mode))
    if mode == GenerationMode.POSITIVE and data.draw(st.booleans()):
        case.body = realistic(case.body)
    principal = data.draw(st.sampled_from(PRINCIPALS))
    if principal == "user" and case.path_parameters and "account_id" in case.path_parameters:
        case.path_parameters["account_id"] = USER_ACCOUNT
    auth = headers_for(principal, token)
    case.headers = {**(case.headers or {}), **auth}
    kwargs = case.as_transport_kwargs(base_url=BASE_URL)
    response = await send(client, kwargs)
    assert response.status_code < 500, (
        f"{label} [{principal}, {mode.value}] -> {response.status_code}: {response.text[:500]}"
        f"\n{case.as_curl_command()}"
    )
    case.validate_response(response, checks=CHECKS)
