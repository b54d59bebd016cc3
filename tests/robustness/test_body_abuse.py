"""Abusive bodies on every route that takes one get a 4xx problem+json, never a 5xx, and change
nothing: over 1 MiB (413, declared or streamed without a length), JSON nested thousands deep,
content types other than JSON, invalid UTF-8, truncated JSON, and JSON that is not an object."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
from fastapi import FastAPI

from app.models import Base
from tests.conftest import TokenFactory, bearer, plain_dsn
from tests.robustness.routes import Route, admitted_principal, routes

MIB = 1024 * 1024


def body_routes(app: FastAPI) -> list[Route]:
    found = [r for r in routes(app) if r.method in ("POST", "PUT", "PATCH")]
    assert found
    return found


def headers_for(route: Route, token: TokenFactory) -> dict[str, str]:
    claims = admitted_principal(route)
    headers = {"Stripe-Signature": "t=1,v1=00"} if route.template == "/webhooks/stripe" else {}
    if claims is not None:
        headers |= bearer(token(**claims))
    return headers


ABUSES: dict[str, tuple[bytes, str]] = {
    "deep_arrays": (b"[" * 100_000 + b"]" * 100_000, "application/json"),
    "deep_objects": (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "application/json"),
    "invalid_utf8": (b'{"purpose": "\xff\xfe\xfa", "return_url": "\xc3\x28"}', "application/json"),
    "truncated": (b'{"purpose": "top_up", "amount": ', "application/json"),
    "not_an_object": (b'"just a string"', "application/json"),
    "null": (b"null", "application/json"),
    "empty": (b"", "application/json"),
    "nan": (b'{"amount": NaN, "currency": "usd"}', "application/json"),
    "huge_number": (b'{"amount": 1' + b"0" * 5000 + b"}", "application/json"),
    "text_plain": (b'{"purpose": "top_up"}', "text/plain"),
    "form": (b"purpose=top_up&amount=100", "application/x-www-form-urlencoded"),
    "multipart": (
        b'--x\r\nContent-Disposition: form-data; name="purpose"\r\n\r\ntop_up\r\n--x--\r\n',
        "multipart/form-data; boundary=x",
    ),
    "xml": (b"<purpose>top_up</purpose>", "application/xml"),
    "no_content_type": (b'{"purpose": "top_up"}', ""),
}


async def row_counts(database_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(plain_dsn(database_url))
    try:
        return {
            table.name: await conn.fetchval(f'SELECT count(*) FROM "{table.name}"')
            for table in Base.metadata.sorted_tables
        }
    finally:
        await conn.close()


def check_4xx(route: Route, name: str, response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (
        f"{route} with {name}: {response.status_code} {response.text[:300]}"
    )
    assert response.headers["content-type"].startswith("application/problem+json"), (route, name)
    assert response.json()["status"] == response.status_code
    assert str(response.status_code) in route.documented_statuses, (
        f"{route} answered undocumented {response.status_code} to {name}"
    )


async def test_malformed_bodies_get_4xx_and_change_nothing(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory, database_url: str
) -> None:
    before = await row_counts(database_url)
    for route in body_routes(app):
        for name, (content, content_type) in ABUSES.items():
            headers = headers_for(route, token)
            if content_type:
                headers["Content-Type"] = content_type
            response = await client.request(
                route.method, route.path(), content=content, headers=headers
            )
            check_4xx(route, name, response)
    assert await row_counts(database_url) == before


async def test_bodies_over_one_mib_get_413_declared_or_streamed(
    app: FastAPI, client: httpx.AsyncClient, token: TokenFactory, database_url: str
) -> None:
    before = await row_counts(database_url)
    big = b'{"pad": "' + b"x" * (MIB + 10) + b'"}'

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    for route in body_routes(app):
        headers = headers_for(route, token) | {"Content-Type": "application/json"}
        declared = await client.request(route.method, route.path(), content=big, headers=headers)
        check_4xx(route, "declared", declared)
        assert declared.status_code == 413, route
        streamed = await client.request(
            route.method, route.path(), content=chunks(), headers=headers
        )
        check_4xx(route, "streamed", streamed)
        assert streamed.status_code == 413, route
        lying = await client.request(
            route.method,
            route.path(),
            content=chunks(),
            headers=headers | {"Content-Length": "10"},
        )
        assert 400 <= lying.status_code < 500, f"{route} lying length: {lying.status_code}"
    assert await row_counts(database_url) == before
