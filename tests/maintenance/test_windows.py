"""Maintenance windows: the three-business-day limit of policy section 5 (BUSINESS_TIMEZONE
Asia/Singapore, SG public holidays)."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from tests.conftest import TokenFactory, bearer

SG = ZoneInfo("Asia/Singapore")
URL = "/v1/ops/maintenance-windows"


def sg(*parts: int) -> str:
    return datetime(*parts, tzinfo=SG).isoformat()  # type: ignore[misc]


def window(starts_at: str, ends_at: str, kind: str = "scheduled") -> dict[str, Any]:
    return {"starts_at": starts_at, "ends_at": ends_at, "kind": kind, "reason": "DB upgrade"}


@pytest.fixture
def ops(token: TokenFactory) -> dict[str, str]:
    return bearer(token(scope="ops", sub="ops-alice"))


@pytest.mark.parametrize(
    ("starts_at", "ends_at", "business_days"),
    [
        # Mon 09:00 → Wed 18:00: three business days.
        (sg(2026, 3, 9, 9), sg(2026, 3, 11, 18), 3),
        # Half-open: ending exactly at Thursday 00:00 does not touch Thursday.
        (sg(2026, 3, 9, 9), sg(2026, 3, 12, 0), 3),
        # Fri → Tue over a weekend: Fri, Mon, Tue.
        (sg(2026, 3, 13, 9), sg(2026, 3, 17, 9), 3),
        # Thu → Tue over Good Friday (3 April 2026) and a weekend: Thu, Mon, Tue.
        (sg(2026, 4, 2, 9), sg(2026, 4, 7, 9), 3),
        # A whole weekend: no business day.
        (sg(2026, 3, 14, 0), sg(2026, 3, 16, 0), 0),
    ],
)
async def test_scheduled_window_within_three_business_days_is_recorded(
    client: httpx.AsyncClient,
    ops: dict[str, str],
    starts_at: str,
    ends_at: str,
    business_days: int,
) -> None:
    response = await client.post(URL, json=window(starts_at, ends_at), headers=ops)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["business_days"] == business_days
    assert body["exceeds_policy_limit"] is False
    assert (body["status"], body["kind"], body["created_by"]) == ("open", "scheduled", "ops-alice")
    assert body["ended_at"] is None and body["unavailable_days"] is None


@pytest.mark.parametrize(
    ("starts_at", "ends_at"),
    [
        (sg(2026, 3, 9, 9), sg(2026, 3, 12, 0, 0, 1)),  # one second into Thursday
        (sg(2026, 3, 12, 9), sg(2026, 3, 17, 9)),  # Thu → Tue over a weekend: 4
        (sg(2026, 4, 9, 9), sg(2026, 4, 14, 9)),  # the same shape without a holiday: 4
        # 08:00 UTC on Thu 12 March is 16:00 in Singapore: Mon..Thu there.
        ("2026-03-09T01:00:00Z", "2026-03-12T08:00:00Z"),
    ],
)
async def test_scheduled_window_over_three_business_days_is_refused(
    client: httpx.AsyncClient, ops: dict[str, str], starts_at: str, ends_at: str
) -> None:
    response = await client.post(URL, json=window(starts_at, ends_at), headers=ops)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "maintenance_too_long"
    assert (await client.get(URL, headers=ops)).json()["items"] == []


async def test_emergency_window_over_the_limit_is_recorded_and_flagged(
    client: httpx.AsyncClient, ops: dict[str, str]
) -> None:
    body = window(sg(2026, 3, 9, 9), sg(2026, 3, 13, 9), kind="emergency")
    response = await client.post(URL, json=body, headers=ops)
    assert response.status_code == 201, response.text
    assert (response.json()["business_days"], response.json()["exceeds_policy_limit"]) == (5, True)
    detail = await client.get(f"{URL}/{response.json()['id']}", headers=ops)
    assert detail.json()["exceeds_policy_limit"] is True


async def test_overlapping_windows_count_as_one_suspension_for_the_limit(
    client: httpx.AsyncClient, ops: dict[str, str]
) -> None:
    first = await client.post(URL, json=window(sg(2026, 3, 9, 9), sg(2026, 3, 10, 18)), headers=ops)
    assert first.json()["business_days"] == 2
    # Overlaps the first: together Mon..Thu.
    longer = window(sg(2026, 3, 10, 12), sg(2026, 3, 12, 9))
    refused = await client.post(URL, json=longer, headers=ops)
    assert refused.status_code == 422
    assert refused.json()["code"] == "maintenance_too_long"
    # Adjoining the first (starts where it ends): still one suspension, Mon..Wed.
    adjoining = window(sg(2026, 3, 10, 18), sg(2026, 3, 11, 18))
    accepted = await client.post(URL, json=adjoining, headers=ops)
    assert accepted.status_code == 201
    assert accepted.json()["business_days"] == 3
    # An emergency overlapping both is recorded, flagged.
    emergency = window(sg(2026, 3, 11, 9), sg(2026, 3, 12, 9), kind="emergency")
    flagged = await client.post(URL, json=emergency, headers=ops)
    assert (flagged.status_code, flagged.json()["exceeds_policy_limit"]) == (201, True)
    # A window a week later is its own suspension.
    later = await client.post(
        URL, json=window(sg(2026, 3, 16, 9), sg(2026, 3, 16, 10)), headers=ops
    )
    assert later.json()["business_days"] == 1
    listed = (await client.get(URL, headers=ops)).json()["items"]
    assert [item["starts_at"] for item in listed] == sorted(
        (item["starts_at"] for item in listed), reverse=True
    )
    assert len(listed) == 4


@pytest.mark.parametrize(
    "body",
    [
        window(sg(2026, 3, 10, 9), sg(2026, 3, 10, 9)),
        window(sg(2026, 3, 10, 9), sg(2026, 3, 9, 9)),
        window("2026-03-10T09:00:00", "2026-03-10T10:00:00"),  # no time zone
        {**window(sg(2026, 3, 10, 9), sg(2026, 3, 10, 10)), "kind": "planned"},
        {**window(sg(2026, 3, 10, 9), sg(2026, 3, 10, 10)), "reason": ""},
        window(sg(2026, 3, 10, 9), sg(2028, 3, 10, 9), kind="emergency"),
    ],
)
async def test_malformed_window_is_422_and_records_nothing(
    client: httpx.AsyncClient, ops: dict[str, str], body: dict[str, Any]
) -> None:
    response = await client.post(URL, json=body, headers=ops)
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"
    assert (await client.get(URL, headers=ops)).json()["items"] == []


async def test_only_ops_may_manage_windows(client: httpx.AsyncClient, token: TokenFactory) -> None:
    body = window(sg(2026, 3, 10, 9), sg(2026, 3, 10, 10))
    finance = bearer(token(scope="finance billing:read"))
    user = bearer(token(account_id="acc_1"))
    for headers in (finance, user):
        assert (await client.post(URL, json=body, headers=headers)).status_code == 403
        assert (await client.get(URL, headers=headers)).status_code == 403
    assert (await client.post(URL, json=body)).status_code == 401


async def test_unknown_window_is_404(client: httpx.AsyncClient, ops: dict[str, str]) -> None:
    missing = f"{URL}/00000000-0000-0000-0000-000000000000"
    assert (await client.get(missing, headers=ops)).json()["code"] == "maintenance_window_not_found"
    response = await client.post(
        f"{missing}/complete", json={"ended_at": sg(2026, 3, 10, 10)}, headers=ops
    )
    assert response.status_code == 404
