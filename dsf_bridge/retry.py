"""The retry policy of the HTTP adapters: how often and how patiently a call is repeated.

One policy for every adapter (the DSF FHIR client, DICOMweb, the inference server), set in the
configuration (``[runtime] call_attempts``, ``call_retry_delay``, ``call_retry_max_delay``,
``retry_after_cap``) and handed to each adapter by the runtime. It repeats a call only where
repeating is safe: connection failures and 5xx/429 answers of reads, idempotent writes and
DICOMweb calls, and of a Task or inference POST only when the server cannot have processed it;
anything else is the runtime's to decide (job retries, the outbox).

It lives beside :mod:`dsf_bridge.errors`, outside the adapter packages, because the FHIR client
(:mod:`dsf_bridge.dsf.client`) and the inference client (:mod:`dsf_bridge.omi.inference`) share
it while the layer contracts keep ``dsf`` and ``omi`` from importing each other.
"""

from __future__ import annotations

import datetime as dt
import email.utils
from dataclasses import dataclass

__all__ = ["CALL_RETRY", "RetryPolicy", "retry_after_seconds"]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a request is repeated; ``attempts`` counts the first try."""

    attempts: int = 4
    initial_delay: float = 0.5
    multiplier: float = 2.0
    max_delay: float = 10.0
    retry_after_cap: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts counts the first try and must be at least 1")
        if min(self.initial_delay, self.max_delay, self.retry_after_cap) < 0:
            raise ValueError("RetryPolicy delays must not be negative")

    def delay(self, attempt: int) -> float:
        """Back-off before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        return float(min(self.max_delay, self.initial_delay * self.multiplier ** (attempt - 1)))

    def delay_for_answer(self, attempt: int, retry_after: str | None) -> float:
        """Back-off after an answer: the server's ``Retry-After`` (up to the cap) when it asks
        for longer; never shorter than the back-off, whatever the cap."""
        delay = self.delay(attempt)
        asked = retry_after_seconds(retry_after)
        if asked is not None:
            delay = max(delay, min(asked, self.retry_after_cap))
        return delay


# The default of ``[runtime] call_*``: waits of 1, 2 and 4 s (7 s in all, or what a server
# asks for in Retry-After, up to 30 s), so a server that restarts within seconds is waited for.
CALL_RETRY = RetryPolicy(attempts=4, initial_delay=1.0, max_delay=10.0, retry_after_cap=30.0)


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header (seconds or an HTTP date) in seconds from now; None if absent."""
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():  # "²".isdigit() is true, float("²") fails
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())
