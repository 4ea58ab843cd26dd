"""Read-only stores (the admin API, ``audit verify``): they never write, never create a
database, never change SQLite's journal mode and never hold up the bridge's writers."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text

from dsf_bridge.errors import StoreError
from dsf_bridge.store import Database, schema_status, upgrade


async def test_a_reader_neither_blocks_nor_waits_for_a_writer(migrated_url: str) -> None:
    writer = Database(migrated_url)
    reader = Database(migrated_url, read_only=True)
    try:
        async with writer.transaction() as session:
            await session.execute(text("UPDATE audit_head SET sequence = sequence"))
            async with reader.transaction() as read:  # while the writer holds its lock
                assert (await read.execute(text("SELECT count(*) FROM audit_events"))).scalar() == 0
        async with reader.transaction() as read:
            await read.execute(text("SELECT 1"))
            async with writer.transaction() as session:  # while a read is open
                await session.execute(text("UPDATE audit_head SET sequence = sequence"))
    finally:
        await writer.dispose()
        await reader.dispose()


async def test_a_reader_refuses_to_write(migrated_url: str) -> None:
    reader = Database(migrated_url, read_only=True)
    try:
        with pytest.raises(StoreError, match=r"read-only|readonly"):
            async with reader.transaction() as read:
                await read.execute(text("DELETE FROM audit_events"))
    finally:
        await reader.dispose()


def test_sqlite_files_are_left_as_they_were(tmp_path: Path) -> None:
    path = tmp_path / "copy.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA journal_mode=DELETE")
    status = schema_status(url, read_only=True)
    assert status.up_to_date
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    missing = tmp_path / "missing.db"
    with pytest.raises(StoreError):
        schema_status(f"sqlite:///{missing}", read_only=True)
    assert not missing.exists()
