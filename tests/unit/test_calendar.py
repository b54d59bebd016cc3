"""Business-day arithmetic across weekends, Singapore public holidays and a year end."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from app.calendar import BusinessCalendar
from app.config import Settings

SGT = ZoneInfo("Asia/Singapore")
calendar = BusinessCalendar("Asia/Singapore", "SG")


def sgt(*args: int) -> datetime:
    return datetime(*args, tzinfo=SGT)


@pytest.mark.parametrize(
    ("received", "days", "due"),
    [
        (sgt(2026, 11, 23, 10), 3, sgt(2026, 11, 26, 23, 59, 59, 999999)),  # Mon -> Thu
        (sgt(2026, 11, 26, 10), 3, sgt(2026, 12, 1, 23, 59, 59, 999999)),  # Thu -> Fri, Mon, Tue
        (sgt(2026, 11, 28, 9), 3, sgt(2026, 12, 2, 23, 59, 59, 999999)),  # Sat -> Mon, Tue, Wed
        # Christmas (Fri 25 Dec 2026) and New Year's Day (Fri 1 Jan 2027) are holidays
        (sgt(2026, 12, 23, 12), 3, sgt(2026, 12, 29, 23, 59, 59, 999999)),  # Thu 24, Mon 28, Tue 29
        (sgt(2026, 12, 30, 12), 3, sgt(2027, 1, 5, 23, 59, 59, 999999)),  # Thu 31, Mon 4, Tue 5
        (sgt(2026, 12, 18, 12), 14, sgt(2027, 1, 11, 23, 59, 59, 999999)),
    ],
)
def test_deadlines_skip_weekends_and_holidays(received: datetime, days: int, due: datetime) -> None:
    assert calendar.add_business_days(received, days) == due


def test_receipt_time_is_read_in_the_business_timezone() -> None:
    # 20:00 UTC on Sunday is already Monday 04:00 in Singapore
    received = datetime(2026, 11, 22, 20, tzinfo=ZoneInfo("UTC"))
    assert calendar.add_business_days(received, 1) == sgt(2026, 11, 24, 23, 59, 59, 999999)


@pytest.mark.parametrize(
    ("start", "end", "touched"),
    [
        (sgt(2026, 11, 23, 22), sgt(2026, 11, 24, 2), 2),  # Mon night into Tue
        (sgt(2026, 11, 23, 0), sgt(2026, 11, 24, 0), 1),  # half-open: Tue 00:00 not touched
        (sgt(2026, 11, 27, 18), sgt(2026, 11, 30, 6), 2),  # Fri..Mon over a weekend
        (sgt(2026, 11, 28, 0), sgt(2026, 11, 30, 0), 0),  # the weekend only
        (sgt(2026, 12, 24, 20), sgt(2026, 12, 28, 8), 2),  # Thu, (Fri holiday), Mon
        (sgt(2026, 11, 23, 10), sgt(2026, 11, 23, 10), 0),
    ],
)
def test_business_days_touched(start: datetime, end: datetime, touched: int) -> None:
    assert calendar.business_days_touched(start, end) == touched


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("business_timezone", "Asia/Singapur"),
        ("business_timezone", ""),
        ("business_holidays_country", "sg"),  # the library knows only upper-case codes
        ("business_holidays_country", "XX"),
    ],
)
def test_a_business_calendar_the_service_cannot_compute_with_is_refused_at_start(
    setting: str, value: str
) -> None:
    """A time zone or holiday country the calendar cannot load used to start a ready service
    (/readyz 200) whose every refund request filing and maintenance window answered 500: the
    deadline or the length is computed per request. The setting is refused at start, named."""
    with pytest.raises(ValidationError) as excinfo:
        Settings(**{setting: value})
    assert setting.upper() in str(excinfo.value)
    Settings(business_timezone="America/New_York", business_holidays_country="US")
