"""A channel's access from several subscriptions does not depend on the order the database
returns them in."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from app.subscriptions.access import Access, channel_access

NOW = datetime(2026, 11, 26, 12, tzinfo=UTC)


@dataclass(frozen=True)
class Row:
    status: str
    current_period_end: datetime | None
    access_revoked_at: datetime | None = None
    cancel_at_period_end: bool = False
    cancel_at: datetime | None = None
    extension_days: int = 0
    extension_days_in_period: int = 0
    ended_at: datetime | None = None


def in_every_order(rows: list[Row]) -> set[Access]:
    return {channel_access(order, NOW) for order in itertools.permutations(rows)}


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (  # the most recently ended gives the answer: revoked an hour ago
            [
                Row("canceled", NOW - timedelta(days=30)),
                Row("active", NOW + timedelta(days=20), access_revoked_at=NOW - timedelta(hours=1)),
                Row("active", NOW - timedelta(days=2)),
            ],
            Access(False, NOW - timedelta(hours=1), "revoked"),
        ),
        (  # a period that ended beats a subscription that never had access
            [Row("incomplete", NOW + timedelta(days=30)), Row("active", NOW - timedelta(days=2))],
            Access(False, NOW - timedelta(days=2), "period_ended"),
        ),
        (  # none with an end to show: the newest subscription (latest period) explains
            [
                Row("canceled", NOW - timedelta(days=40)),
                Row("incomplete", NOW + timedelta(days=30)),
            ],
            Access(False, None, "subscription_incomplete"),
        ),
    ],
)
def test_a_channel_without_access_answers_the_same_whatever_the_row_order(
    rows: list[Row], expected: Access
) -> None:
    assert in_every_order(rows) == {expected}


def test_a_channel_with_access_answers_the_same_whatever_the_row_order() -> None:
    until = NOW + timedelta(days=10)
    rows = [
        Row("active", until, cancel_at_period_end=True),
        Row("active", until),
        Row("canceled", NOW - timedelta(days=1)),
    ]
    [answer] = in_every_order(rows)
    assert (answer.has_access, answer.access_until) == (True, until)
