"""SQLite writers of one process queue in asyncio, not in SQLite's sleeping busy handler."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from dsf_bridge.errors import StoreError
from dsf_bridge.store import Database, database


async def test_concurrent_writers_all_commit_in_turn(sqlite_database: Database) -> None:
    order: list[int] = []

    async def write(n: int) -> None:
        async with sqlite_database.transaction() as session:
            await session.execute(text("UPDATE audit_head SET sequence = sequence"))
            order.append(n)
            await asyncio.sleep(0)  # give the others every chance to barge in

    await asyncio.gather(*(write(n) for n in range(20)))
    assert sorted(order) == list(range(20))


async def test_a_writer_held_too_long_is_a_retryable_error(
    sqlite_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database, "_SQLITE_BUSY_TIMEOUT_MS", 100)
    async with sqlite_database.transaction():
        with pytest.raises(StoreError, match="database is locked") as caught:
            async with sqlite_database.transaction():
                pass  # pragma: no cover - never entered
    assert caught.value.retryable
    async with sqlite_database.transaction() as session:  # released: the next writer gets in
        await session.execute(text("SELECT 1"))
