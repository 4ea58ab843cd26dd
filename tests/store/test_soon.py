"""Writes given to :meth:`Database.soon` (an effect's done mark): they go with the next
transaction, or alone within milliseconds, and are never lost while the store is up; on both
databases. The row is always read through a second store, which carries nothing along."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog
from sqlalchemy import Table, bindparam, insert, select, text
from sqlalchemy.exc import OperationalError

from dsf_bridge.errors import StoreError
from dsf_bridge.store import Database
from dsf_bridge.store import database as database_module
from dsf_bridge.store import repository as repo
from dsf_bridge.store.direct import Prepared
from dsf_bridge.store.kinds import OutboxKind, TaskSeenStatus
from dsf_bridge.store.tables import OutboxEntry, TaskSeen

T0 = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)
_SEEN: Table = TaskSeen.__table__  # type: ignore[assignment]


@pytest.fixture
async def other(database: Database) -> AsyncIterator[Database]:
    """A second store on the same database: what is committed, not what is queued."""
    second = Database(database.url.render_as_string(False))
    try:
        yield second
    finally:
        await second.dispose()


async def _queue_leased(database: Database, key: str) -> None:
    async with database.transaction() as session:
        await repo.enqueue_new_outbox(
            session,
            idempotency_key=key,
            kind=OutboxKind.COMPLETE_TASK,
            payload={"task_id": "t-1"},
            instance_id=None,
            now=T0,
            leased_to=("me", T0 + dt.timedelta(minutes=1)),
        )


async def _status(store: Database, key: str) -> tuple[str, str | None]:
    async with store.transaction() as session:
        row = (
            await session.execute(
                select(OutboxEntry.status, OutboxEntry.lease_owner).where(
                    OutboxEntry.idempotency_key == key
                )
            )
        ).one()
        return str(row[0]), row[1]


def _done_soon(database: Database, key: str, owner: str = "me") -> None:
    repo.mark_outbox_done_soon(database, key, owner, result="Task/t-1/_history/3", now=T0)


async def test_a_write_given_soon_goes_with_the_next_transaction(
    database: Database, other: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database_module, "SOON_SECONDS", 30.0)  # no write of its own
    await _queue_leased(database, "a")
    await _queue_leased(database, "b")
    _done_soon(database, "a")
    assert await _status(other, "a") == ("pending", "me")  # not written yet
    async with database.transaction() as session:
        await repo.record_task_seen(
            session,
            task_id="t-9",
            task_version="1",
            role="incoming",
            status=TaskSeenStatus.CLAIMING,
        )
    assert await _status(other, "a") == ("done", None)
    assert await _status(other, "b") == ("pending", "me")


async def test_without_a_transaction_it_is_written_alone_within_soon_seconds(
    database: Database, other: Database
) -> None:
    await _queue_leased(database, "a")
    _done_soon(database, "a")
    assert await _status(other, "a") == ("pending", "me")
    await asyncio.sleep(database_module.SOON_SECONDS)
    for _ in range(100):
        if await _status(other, "a") == ("done", None):
            break
        await asyncio.sleep(0.02)
    assert await _status(other, "a") == ("done", None)


async def test_a_mark_for_a_lease_that_ran_out_changes_nothing(
    database: Database, other: Database
) -> None:
    await _queue_leased(database, "a")
    _done_soon(database, "a", owner="someone else")
    await database.flush_soon()
    assert await _status(other, "a") == ("pending", "me")


async def test_a_transaction_that_fails_takes_it_along_and_it_is_written_alone(
    database: Database, other: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database_module, "SOON_SECONDS", 30.0)
    monkeypatch.setattr(database_module, "_SOON_RETRY_SECONDS", 0.5)
    await _queue_leased(database, "a")
    _done_soon(database, "a")

    async def failing() -> None:
        async with database.transaction() as session:
            await session.execute(text("SELECT 1"))  # PostgreSQL: the held mark goes too
            raise RuntimeError("the caller's own failure")

    with pytest.raises(RuntimeError):
        await failing()
    assert await _status(other, "a") == ("pending", "me")  # rolled back with it
    for _ in range(200):
        await asyncio.sleep(0.02)
        if await _status(other, "a") == ("done", None):
            break
    assert await _status(other, "a") == ("done", None)


_SEEN_ROW = Prepared(
    insert(_SEEN).values(
        **{
            name: bindparam(name)
            for name in ("task_id", "task_version", "role", "status", "instance_id", "seen_at")
        }
    )
)


def _seen(task_id: str) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "task_version": "1",
        "role": "incoming",
        "status": TaskSeenStatus.CLAIMING,
        "instance_id": None,
        "seen_at": T0,
    }


async def test_a_write_that_fails_by_itself_fails_one_transaction_and_is_dropped(
    database: Database, other: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database_module, "SOON_SECONDS", 30.0)
    monkeypatch.setattr(database_module, "_SOON_RETRY_SECONDS", 30.0)
    await _queue_leased(database, "a")
    async with database.transaction() as session:
        await session.execute(_SEEN_ROW.statement(database.dialect), _seen("t-1"))
    database.soon(_SEEN_ROW, _seen("t-1"))  # a duplicate key: it cannot be written
    _done_soon(database, "a")
    with pytest.raises(StoreError, match=r"(?i)unique|duplicate"):
        async with database.transaction() as session:
            await session.execute(_SEEN_ROW.statement(database.dialect), _seen("t-2"))
    # The next transaction is not failed by it again.
    async with database.transaction() as session:
        await session.execute(_SEEN_ROW.statement(database.dialect), _seen("t-3"))
    assert await _status(other, "a") == ("pending", "me")
    with structlog.testing.capture_logs() as logged:
        await database.flush_soon()
    assert [entry["event"] for entry in logged] == ["store.soon_write_dropped"]
    assert await _status(other, "a") == ("done", None)  # the other write is not lost
    async with other.transaction() as session:
        ids = await session.execute(select(TaskSeen.task_id).order_by(TaskSeen.task_id))
        assert list(ids.scalars()) == ["t-1", "t-3"]


async def test_while_the_store_is_away_the_writes_wait(
    database: Database, other: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database_module, "SOON_SECONDS", 30.0)
    monkeypatch.setattr(database_module, "_SOON_RETRY_SECONDS", 30.0)
    await _queue_leased(database, "a")
    _done_soon(database, "a")
    with pytest.raises(RuntimeError):
        async with database.transaction():
            raise RuntimeError("failed")  # the mark now waits for a transaction of its own

    async def unavailable(*_args: Any, **_kwargs: Any) -> Any:
        raise OperationalError("UPDATE outbox", {}, Exception("server gone"))

    with monkeypatch.context() as away:
        away.setattr(database_module, "execute", unavailable)
        with pytest.raises(StoreError, match="server gone") as raised:
            await database.flush_soon()
    assert raised.value.retryable
    assert await _status(other, "a") == ("pending", "me")
    await database.flush_soon()  # the store is back
    assert await _status(other, "a") == ("done", None)


async def test_dispose_writes_what_is_left(database: Database, other: Database) -> None:
    await _queue_leased(database, "a")
    _done_soon(database, "a")
    await database.dispose()
    assert await _status(other, "a") == ("done", None)
