"""Review of issue 11: the catch-up cursor written once per page, when a resource of the page
fails the catch-up."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest

from dsf_bridge.dsf.subscription import SubscriptionSettings, TaskSubscription
from dsf_bridge.errors import StoreError
from tests.dsf.test_subscription import CountingCursor, _Pages, _requested


async def test_a_catch_up_stopped_mid_page_keeps_the_cursor_of_the_tasks_taken_in() -> None:
    """The second Task of a page stops the catch-up (the store was busy past the pool's
    timeout): the first was taken in, so the cursor stands after it, as it did when it was
    written per Task; the next catch-up starts there."""
    settings = SubscriptionSettings(page_size=3)
    pages = [[_requested(f"t{n}", n, None) for n in (1, 2, 3)]]

    async def handle(resource: dict[str, Any]) -> None:
        if resource["id"] == "t2":
            raise StoreError("database busy: QueuePool limit reached", retryable=True)

    cursor = CountingCursor()
    subscription = TaskSubscription(
        _Pages(pages),  # type: ignore[arg-type]
        None,
        handle,
        cursor,
        settings=settings,
    )
    with pytest.raises(StoreError):
        await asyncio.wait_for(subscription.catch_up(), 5)
    assert cursor.saved == [dt.datetime(2026, 1, 1, 0, 0, 1, tzinfo=dt.UTC)]
