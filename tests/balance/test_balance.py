"""The prepaid balance ledger: usage charges, activity, balance and pagination, over HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.accounts.service import ensure_account
from app.models import Activity, LedgerEntry
from tests.conftest import bearer


def usage(charge_id: str, amount: int, kind: str = "conversation", **extra: Any) -> dict[str, Any]:
    return {
        "id": charge_id,
        "amount": amount,
        "currency": "usd",
        "kind": kind,
        "occurred_at": "2026-11-01T10:00:00Z",
        **extra,
    }


@pytest.fixture
def service(token: Any) -> dict[str, str]:
    return bearer(token(scope="usage:write", sub="conversation-service"))


@pytest.fixture
def db(app: Any) -> async_sessionmaker[AsyncSession]:
    factory: async_sessionmaker[AsyncSession] = app.state.session_factory
    return factory


async def _ledger_sum(db: async_sessionmaker[AsyncSession], account: str) -> int:
    async with db() as session:
        total = await session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
                LedgerEntry.account_id == account
            )
        )
    return int(total or 0)


async def _balance(client: httpx.AsyncClient, token: Any, account: str) -> Any:
    response = await client.get(
        f"/v1/accounts/{account}/balance", headers=bearer(token(account_id=account))
    )
    assert response.status_code == 200
    return response.json()


async def test_a_replayed_usage_charge_debits_once(
    client: httpx.AsyncClient, service: dict[str, str], token: Any, db: Any
) -> None:
    url = "/v1/accounts/acc_1/usage-charges"
    first = await client.post(url, json=usage("conv-1", 300), headers=service)
    replays = await asyncio.gather(
        *[client.post(url, json=usage("conv-1", 300), headers=service) for _ in range(3)]
    )
    assert first.status_code == 201, first.text
    assert [r.status_code for r in replays] == [200, 200, 200]
    assert {r.json()["ledger_entry_id"] for r in replays} == {first.json()["ledger_entry_id"]}
    assert await _balance(client, token, "acc_1") == {"balance": 0, "debt": 300, "currency": "usd"}
    assert await _ledger_sum(db, "acc_1") == -300


async def test_concurrent_first_reports_of_one_usage_charge_debit_once(
    client: httpx.AsyncClient, service: dict[str, str], db: Any
) -> None:
    url = "/v1/accounts/acc_1/usage-charges"
    responses = await asyncio.gather(
        *[client.post(url, json=usage("conv-race", 250), headers=service) for _ in range(5)]
    )
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 200, 201]
    assert await _ledger_sum(db, "acc_1") == -250


async def test_the_same_usage_id_with_other_values_is_409(
    client: httpx.AsyncClient, service: dict[str, str], db: Any
) -> None:
    url = "/v1/accounts/acc_1/usage-charges"
    assert (await client.post(url, json=usage("conv-1", 300), headers=service)).status_code == 201
    for body in (usage("conv-1", 301), usage("conv-1", 300, kind="meta_fee")):
        response = await client.post(url, json=body, headers=service)
        assert response.status_code == 409
        assert response.json()["code"] == "usage_charge_conflict"
    assert await _ledger_sum(db, "acc_1") == -300


async def test_balance_always_equals_the_sum_of_the_ledger(
    client: httpx.AsyncClient, service: dict[str, str], token: Any, db: Any
) -> None:
    # A top-up credit as the payment event handler writes it.
    async with db() as session, session.begin():
        await ensure_account(session, "acc_1")
        session.add(
            LedgerEntry(
                account_id="acc_1",
                kind="top_up",
                source_id="cs_test_1",
                amount=1000,
                currency="usd",
                occurred_at=await session.scalar(select(func.now())),
            )
        )
    url = "/v1/accounts/acc_1/usage-charges"
    expected = []
    for i, (amount, kind) in enumerate(
        [(400, "conversation"), (350, "meta_fee"), (500, "conversation")]
    ):
        response = await client.post(url, json=usage(f"u-{i}", amount, kind), headers=service)
        assert response.status_code == 201
        total = await _ledger_sum(db, "acc_1")
        expected.append({"balance": max(0, total), "debt": max(0, -total), "currency": "usd"})
        assert await _balance(client, token, "acc_1") == expected[-1]
        assert (response.json()["balance"], response.json()["debt"]) == (
            expected[-1]["balance"],
            expected[-1]["debt"],
        )
    assert expected[-1] == {"balance": 0, "debt": 250, "currency": "usd"}


async def test_the_ledger_pages_newest_first(
    client: httpx.AsyncClient, service: dict[str, str], token: Any
) -> None:
    url = "/v1/accounts/acc_1/usage-charges"
    for i in range(5):
        await client.post(url, json=usage(f"u-{i}", 10 + i), headers=service)
    headers = bearer(token(account_id="acc_1"))
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (
            await client.get("/v1/accounts/acc_1/ledger", params=params, headers=headers)
        ).json()
        seen += [entry["source_id"] for entry in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ["u-4", "u-3", "u-2", "u-1", "u-0"]


async def test_usage_charges_need_the_usage_scope_and_valid_bodies(
    client: httpx.AsyncClient, token: Any, service: dict[str, str], db: Any
) -> None:
    url = "/v1/accounts/acc_1/usage-charges"
    user = bearer(token(account_id="acc_1"))
    assert (await client.post(url, json=usage("x", 1), headers=user)).status_code == 403
    for body in (
        usage("x", 0),
        usage("x", -5),
        usage("x", 1, kind="refund"),
        usage("x", 1, currency="zzz"),
        usage("x", 1, occurred_at="2026-11-01T10:00:00"),
        {**usage("x", 1), "extra": True},
    ):
        response = await client.post(url, json=body, headers=service)
        assert response.status_code == 422, body
    assert await _ledger_sum(db, "acc_1") == 0


async def test_activity_is_stored_once_per_id(
    client: httpx.AsyncClient, service: dict[str, str], db: Any
) -> None:
    url = "/v1/accounts/acc_1/activity"
    body = {"id": "act-1", "kind": "message_sent", "occurred_at": "2026-11-02T08:00:00Z"}
    assert (await client.post(url, json=body, headers=service)).status_code == 201
    assert (await client.post(url, json=body, headers=service)).status_code == 200
    conflict = await client.post(url, json={**body, "kind": "other"}, headers=service)
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "activity_conflict"
    bad = await client.post(url, json={**body, "kind": "login"}, headers=service)
    assert bad.status_code == 422
    async with db() as session:
        assert await session.scalar(select(func.count()).select_from(Activity)) == 1


async def test_account_reads_are_limited_to_the_callers_account(
    client: httpx.AsyncClient, token: Any
) -> None:
    mine = bearer(token(account_id="acc_a"))
    assert (await client.get("/v1/accounts/acc_a/balance", headers=mine)).status_code == 200
    assert (await client.get("/v1/accounts/acc_b/balance", headers=mine)).status_code == 403
    assert (await client.get("/v1/accounts/acc_b/ledger", headers=mine)).status_code == 403
    assert (await client.get("/v1/access-changes", headers=mine)).status_code == 403
    assert (await client.get("/v1/channels/ch_1/access", headers=mine)).status_code == 403
    reader = bearer(token(scope="billing:read"))
    assert (await client.get("/v1/accounts/acc_b/balance", headers=reader)).status_code == 200
