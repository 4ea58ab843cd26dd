"""ISO 8601 time arithmetic for timer events and job retries.

The engine never reads the clock: every due time is computed from the ``now`` an event carries.
Supported: durations (``PT20S``, ``P1DT2H``, ``P1Y2M``), dates (``2026-01-01T10:00:00Z``) and
retry cycles as Camunda writes them in ``camunda:failedJobRetryTimeCycle`` (``R3/PT5S`` or a
comma-separated list of durations ``PT1M,PT5M``).
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, datetime, timedelta

from dsf_bridge.errors import ProcessModelError

__all__ = [
    "RetryPolicy",
    "TimerError",
    "add_duration",
    "parse_date",
    "parse_duration",
    "parse_retry_cycle",
]


class TimerError(ProcessModelError):
    """A timer or retry definition is not valid ISO 8601 in the supported forms."""


_DURATION_RE = re.compile(
    r"^P(?!$)(?:(?P<y>\d+)Y)?(?:(?P<mo>\d+)M)?(?:(?P<w>\d+)W)?(?:(?P<d>\d+)D)?"
    r"(?:T(?=\d)(?:(?P<h>\d+)H)?(?:(?P<mi>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$",
    re.ASCII,  # \d alone would take any Unicode digit (Arabic-Indic, full-width)
)

Duration = tuple[int, timedelta]
"""A duration as (calendar months, fixed part): months vary in length, so they stay apart."""


def parse_duration(text: str) -> Duration:
    """Parse an ISO 8601 duration into ``(months, timedelta)``."""
    match = _DURATION_RE.match(text.strip())
    if match is None:
        raise TimerError(f"Not an ISO 8601 duration: {_quoted(text)}")
    parts = {k: v for k, v in match.groupdict().items() if v is not None}
    try:
        months = int(parts.get("y", 0)) * 12 + int(parts.get("mo", 0))
        fixed = timedelta(
            weeks=int(parts.get("w", 0)),
            days=int(parts.get("d", 0)),
            hours=int(parts.get("h", 0)),
            minutes=int(parts.get("mi", 0)),
            seconds=float(parts.get("s", 0)),
        )
    except (OverflowError, ValueError):  # values from Tasks: P99999999999D, 5000-digit numbers
        raise TimerError("ISO 8601 duration out of range") from None
    return months, fixed


def add_duration(moment: datetime, duration: Duration) -> datetime:
    """``moment`` plus ``duration``; months are added on the calendar (Jan 31 + P1M = Feb 28)."""
    months, fixed = duration
    try:
        if months:
            total = moment.month - 1 + months
            year, month = moment.year + total // 12, total % 12 + 1
            day = min(moment.day, calendar.monthrange(year, month)[1])
            moment = moment.replace(year=year, month=month, day=day)
        return moment + fixed
    except (OverflowError, ValueError):  # P9999Y from a Task: past the year 9999
        raise TimerError("due time after the year 9999") from None


def parse_date(text: str) -> datetime:
    """Parse an ISO 8601 date-time; a date-time without zone is taken as UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise TimerError(f"Not an ISO 8601 date-time: {_quoted(text)}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        value.astimezone(UTC)  # what the store keeps: 9999-12-31T23:00-05:00 is past year 9999
    except OverflowError:
        raise TimerError(f"ISO 8601 date-time out of range: {text!r}") from None
    return value


class RetryPolicy:
    """How often and after what delays a failed async job is tried again."""

    __slots__ = ("delays",)

    def __init__(self, delays: tuple[Duration, ...]) -> None:
        self.delays = delays

    @property
    def retries(self) -> int:
        return len(self.delays)

    def delay(self, retries_left: int) -> Duration:
        """The wait before the next try when ``retries_left`` tries remain (counting down)."""
        if not self.delays:
            return _NO_DELAY
        index = max(0, self.retries - retries_left)
        return self.delays[min(index, len(self.delays) - 1)]

    def __repr__(self) -> str:
        return f"RetryPolicy(retries={self.retries})"


_NO_DELAY = parse_duration("PT0S")
_REPEAT_RE = re.compile(r"^R(\d+)/(P.+)$", re.ASCII)


def _quoted(text: str, limit: int = 60) -> str:
    """``text`` quoted for an error, cut after ``limit`` characters: it may come from a Task."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def parse_retry_cycle(text: str) -> RetryPolicy:
    """Parse ``R3/PT5S`` or ``PT1M,PT5M,PT10M`` into a retry policy, counted as Camunda 7 does.

    ``R<n>/<d>`` is *n* tries in all (the first and *n-1* retries, *d* apart); ``R0`` is one
    try, as Camunda starts a job with at least one retry. A list of *k* durations is *k+1*
    tries: the first, then one retry after each duration. (Camunda's ``ParseUtil`` and
    ``DefaultJobRetryCmd``: a job's retries start at *n*, or *k+1*, and each failure takes one;
    at zero the job becomes an incident.)
    """
    stripped = text.strip()
    match = _REPEAT_RE.match(stripped)
    if match is not None:
        count = int(match.group(1))
        delay = parse_duration(match.group(2))
        return RetryPolicy((delay,) * max(count - 1, 0))
    if stripped.startswith("R"):
        raise TimerError(f"Unbounded or malformed retry cycle: {text!r}")
    return RetryPolicy(tuple(parse_duration(part) for part in stripped.split(",")))
