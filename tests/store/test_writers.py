"""SQLite writers of one process queue in asyncio, not in SQLite's sleeping busy handler."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest
from sqlalchemy import event, text

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


async def test_the_writer_runs_sqlite_on_the_event_loop_thread(sqlite_database: Database) -> None:
    # No worker thread per statement (aiosqlite's four thread hops per statement cost ~1 ms of
    # CPU each); the admin API's read-only store keeps its worker thread.
    threads: set[int] = set()

    def seen(*_args: object) -> None:
        threads.add(threading.get_ident())

    event.listen(sqlite_database.engine.sync_engine, "before_cursor_execute", seen)
    async with sqlite_database.transaction() as session:
        await session.execute(text("UPDATE audit_head SET sequence = sequence"))
        await session.execute(text("SELECT count(*) FROM jobs"))
    assert threads == {threading.get_ident()}
    assert sqlite_database.url.drivername == "sqlite+dsfinline"
    reader = Database(
        sqlite_database.url.render_as_string().replace("+dsfinline", ""), read_only=True
    )
    try:
        assert reader.url.drivername == "sqlite+aiosqlite"
    finally:
        await reader.dispose()


async def test_a_cancelled_writer_leaves_the_write_lock_free(
    sqlite_database: Database, sqlite_url: str
) -> None:
    # A worker round cancelled at the end of the shutdown grace unwinds between statements and
    # rolls back at once: another process can write right after (it used to wait for a
    # statement still running in aiosqlite's thread, or until the process exited).
    inside = asyncio.Event()

    async def hold() -> None:
        async with sqlite_database.transaction() as session:
            await session.execute(text("UPDATE jobs SET attempts = attempts"))
            inside.set()
            await asyncio.Event().wait()

    holder = asyncio.ensure_future(hold())
    await inside.wait()
    other = sqlite3.connect(str(database.sqlite_path(sqlite_url)), timeout=0, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
        other.execute("BEGIN IMMEDIATE")  # free at once
        other.execute("ROLLBACK")
    finally:
        other.close()


async def test_every_pooled_connection_busy_is_a_retryable_store_error(
    postgres_database: Database,
) -> None:
    # A peak beyond pool_size + max_overflow waits pool_timeout, then the step is tried again.
    busy = Database(postgres_database.url.render_as_string(False), pool_size=1)
    pool = busy.engine.sync_engine.pool
    pool._timeout = 0.2  # type: ignore[attr-defined]
    pool._max_overflow = 0  # type: ignore[attr-defined]
    try:
        async with busy.transaction() as session:
            await session.execute(text("SELECT 1"))
            with pytest.raises(StoreError, match="database busy") as caught:
                async with busy.transaction() as other:
                    await other.execute(text("SELECT 1"))
        assert caught.value.retryable
    finally:
        await busy.dispose()


def _terminate_others(database_url: str) -> int:
    """End every other backend connected to the database of ``database_url``."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            [url.database],
        ).fetchall()
    return sum(1 for (ended,) in rows if ended)


async def test_postgresql_pings_only_connections_that_were_idle(
    postgres_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection in steady use is not pinged; one idle for longer than the threshold is,
    and one the server ended meanwhile is replaced before the transaction runs on it."""
    url = postgres_database.url.render_as_string(False)
    store = Database(url, pool_size=2)
    dialect = store.engine.sync_engine.dialect
    pings = 0
    real_ping = dialect.do_ping

    def counted(dbapi_connection: object) -> bool:
        nonlocal pings
        pings += 1
        return real_ping(dbapi_connection)  # type: ignore[arg-type]

    monkeypatch.setattr(dialect, "do_ping", counted)
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 0.3)
    try:
        for _ in range(5):
            async with store.transaction() as session:
                await session.execute(text("SELECT 1"))
        assert pings == 0, "a connection reused at once was pinged"
        assert await asyncio.to_thread(_terminate_others, url) >= 1
        await asyncio.sleep(0.4)
        async with store.transaction() as session:
            assert (await session.execute(text("SELECT 41 + 1"))).scalar_one() == 42
        assert pings >= 1, "the idle connection was used without a ping"
    finally:
        await store.dispose()


async def test_postgresql_connection_ended_in_use_is_a_retryable_error(
    postgres_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a ping (reused at once), a connection the server ended fails that transaction
    as retryable, and the next one runs on a new connection."""
    url = postgres_database.url.render_as_string(False)
    store = Database(url, pool_size=1)
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 60.0)
    try:
        async with store.transaction() as session:
            await session.execute(text("SELECT 1"))
        assert await asyncio.to_thread(_terminate_others, url) >= 1
        with pytest.raises(StoreError) as caught:
            async with store.transaction() as session:
                await session.execute(text("SELECT 1"))
        assert caught.value.retryable
        async with store.transaction() as session:
            assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await store.dispose()


class _BlockError(Exception):
    pass


async def _insert_then_raise(database: Database) -> None:
    async with database.autocommit() as session:
        await session.execute(text("INSERT INTO scratch (value) VALUES (1)"))
        raise _BlockError


async def test_autocommit_commits_each_statement_on_postgresql_and_is_a_transaction_on_sqlite(
    database: Database,
) -> None:
    """On PostgreSQL a statement in ``autocommit`` is committed when it ran (no BEGIN, no
    COMMIT); on SQLite the block is a transaction, rolled back when it raises."""
    async with database.transaction() as session:
        await session.execute(text("CREATE TABLE scratch (value INTEGER)"))
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement.strip().upper())

    event.listen(database.engine.sync_engine, "before_cursor_execute", seen)
    try:
        with pytest.raises(_BlockError):
            await _insert_then_raise(database)
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", seen)
    async with database.transaction() as session:
        kept = (await session.execute(text("SELECT count(*) FROM scratch"))).scalar_one()
    if database.dialect == "postgresql":
        assert kept == 1, "the insert was not committed on its own"
    else:
        assert kept == 0, "SQLite's block was not rolled back"
        assert "BEGIN IMMEDIATE" in statements, "SQLite ran without the write lock"
