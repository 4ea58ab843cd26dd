"""SQLite writers of one process queue in asyncio, not in SQLite's sleeping busy handler."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from dsf_bridge.errors import StoreError
from dsf_bridge.store import Database, database, upgrade


@pytest.fixture
async def store(sqlite_url: str) -> AsyncIterator[Database]:
    upgrade(sqlite_url)
    db = Database(sqlite_url)
    try:
        yield db
    finally:
        await db.dispose()


async def test_concurrent_writers_all_commit_in_turn(store: Database) -> None:
    order: list[int] = []

    async def write(n: int) -> None:
        async with store.transaction() as session:
            await session.execute(text("UPDATE audit_head SET sequence = sequence"))
            order.append(n)
            await asyncio.sleep(0)  # give the others every chance to barge in

    await asyncio.gather(*(write(n) for n in range(20)))
    assert sorted(order) == list(range(20))


async def test_a_writer_held_too_long_is_a_retryable_error(
    store: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database, "_SQLITE_BUSY_TIMEOUT_MS", 100)
    async with store.transaction():
        with pytest.raises(StoreError, match="database is locked") as caught:
            async with store.transaction():
                pass  # pragma: no cover - never entered
    assert caught.value.retryable
    async with store.transaction() as session:  # released: the next writer gets in
        await session.execute(text("SELECT 1"))
