"""The committed openapi/openapi.json is what the app serves (regenerate: `billing openapi`)."""

from __future__ import annotations

import json

import httpx

from tests.conftest import ROOT


async def test_committed_openapi_matches_the_app(client: httpx.AsyncClient) -> None:
    served = (await client.get("/openapi.json")).json()
    committed = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    assert served == committed, "openapi/openapi.json is stale: run `.venv/bin/billing openapi`"


async def test_every_route_is_documented(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            assert operation.get("tags"), f"{where} has no tags"
            assert operation.get("summary"), f"{where} has no summary"
            assert (
                "200" in operation["responses"]
                or "201" in operation["responses"]
                or "202" in operation["responses"]
            ), where


async def test_every_422_documents_validation_error_next_to_the_routes_own_codes(
    client: httpx.AsyncClient,
) -> None:
    # Every route that takes input answers 422 `validation_error` for a malformed one, also
    # when it declares 422 codes of its own (refund_exceeds_limit, maintenance_too_long, ...).
    document = (await client.get("/openapi.json")).json()
    undocumented = [
        f"{method.upper()} {path}"
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        if "422" in operation["responses"]
        and "`validation_error`" not in operation["responses"]["422"]["description"]
    ]
    assert undocumented == []
