"""The business calendar: weekends and the configured country's public holidays are not
business days (the `holidays` library), counted in `BUSINESS_TIMEZONE`.

Deadlines: "within N business days of receipt" is the end (the last instant, 23:59:59.999999
local: a deadline passes only once its day is over) of the Nth business day after the local day
of receipt; a request received on a weekend or holiday is therefore
counted from the next business day. Maintenance windows are measured by the business days they
touch: every local date that the half-open `[start, end)` overlaps and that is a business day.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import Annotated
from zoneinfo import ZoneInfo

import holidays
from pydantic import AfterValidator, AwareDatetime

EARLIEST, LATEST = datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)


def _within_calendar(value: datetime) -> datetime:
    if not EARLIEST <= value < LATEST:
        raise ValueError("must be from 2000-01-01 to 2099-12-31 (UTC)")
    return value


Moment = Annotated[AwareDatetime, AfterValidator(_within_calendar)]
"""A time an API caller gives: with its offset, and within the years the service computes with,
so that moving it to the business time zone or adding business days cannot overflow (a year-1
date with a positive offset did: a 500 found by the fuzzer). Outside them: 422."""


@lru_cache(maxsize=32)
def _holidays(country: str, year: int) -> frozenset[date]:
    return frozenset(holidays.country_holidays(country, years=year).keys())


class BusinessCalendar:
    def __init__(self, timezone: str, country: str) -> None:
        self.zone = ZoneInfo(timezone)
        self.country = country

    def is_business_day(self, day: date) -> bool:
        return day.weekday() < 5 and day not in _holidays(self.country, day.year)

    def local_date(self, moment: datetime) -> date:
        return moment.astimezone(self.zone).date()

    def end_of_day(self, day: date) -> datetime:
        return datetime.combine(day, time.max, tzinfo=self.zone)

    def add_business_days(self, received_at: datetime, days: int) -> datetime:
        """The deadline `days` business days after `received_at` (end of that local day)."""
        day = self.local_date(received_at)
        counted = 0
        while counted < days:
            day += timedelta(days=1)
            if self.is_business_day(day):
                counted += 1
        return self.end_of_day(day)

    def local_dates_touched(self, start: datetime, end: datetime) -> list[date]:
        """Every local date that the half-open interval `[start, end)` overlaps."""
        if end <= start:
            return []
        first = self.local_date(start)
        last = self.local_date(end - timedelta(microseconds=1))
        return [first + timedelta(days=n) for n in range((last - first).days + 1)]

    def business_days_touched(self, start: datetime, end: datetime) -> int:
        return sum(1 for day in self.local_dates_touched(start, end) if self.is_business_day(day))
