"""PostgreSQL writes held to the next read (``postgresql+dsfbatch``): fewer round trips, the
same outcome. Round trips are counted as the queries psycopg sends to the server."""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

import psycopg
import pytest
from sqlalchemy import Table, bindparam, func, select, text, update

from dsf_bridge.errors import StoreError
from dsf_bridge.store import Database, batched_pg
from dsf_bridge.store import repository as repo
from dsf_bridge.store.kinds import OutboxKind
from dsf_bridge.store.tables import OutboxEntry

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
async def sent(postgres_database: Database, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every query psycopg sends to ``postgres_database`` from now on (one round trip each),
    after its first connection's set-up queries."""
    async with postgres_database.transaction() as session:
        await session.execute(text("SELECT 1"))
    queries: list[str] = []
    real = psycopg.AsyncCursor.execute

    async def execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        queries.append(str(query))
        return await real(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.AsyncCursor, "execute", execute)
    return queries


async def _queue(session: Any, key: str) -> None:
    await repo.enqueue_new_outbox(
        session,
        idempotency_key=key,
        kind=OutboxKind.SEND_TASK,
        payload={"key": key, "quote": "it's 100%", "nested": [1, None, True]},
        instance_id=None,
        now=T0,
    )


async def _payloads(database: Database) -> dict[str, Any]:
    async with database.transaction() as session:
        rows = await session.execute(select(OutboxEntry.idempotency_key, OutboxEntry.payload))
        return {key: payload for key, payload in rows}


async def test_the_writer_uses_the_batching_driver_and_the_reader_does_not(
    postgres_database: Database,
) -> None:
    assert postgres_database.url.drivername == f"postgresql+{batched_pg.DRIVER}"
    reader = Database(postgres_database.url.render_as_string(False), read_only=True)
    try:
        assert reader.url.drivername == "postgresql+psycopg"
    finally:
        await reader.dispose()


async def test_a_transaction_of_writes_is_one_round_trip_with_its_commit(
    postgres_database: Database, sent: list[str]
) -> None:
    async with postgres_database.transaction() as session:
        await _queue(session, "a")
        await _queue(session, "b")
        assert sent == []  # held: nothing reads what they answer
    assert len(sent) == 1
    assert sent[0].startswith("BEGIN") and sent[0].endswith("COMMIT")
    payloads = await _payloads(postgres_database)
    assert payloads["a"] == {"key": "a", "quote": "it's 100%", "nested": [1, None, True]}
    assert set(payloads) == {"a", "b"}


async def test_a_read_takes_the_held_writes_along_and_sees_them(
    postgres_database: Database, sent: list[str]
) -> None:
    async with postgres_database.transaction() as session:
        await _queue(session, "a")
        count = await session.scalar(select(func.count()).select_from(OutboxEntry))
        assert count == 1
        assert len(sent) == 1  # BEGIN, the insert and the read: one query
        await _queue(session, "b")
    assert len(sent) == 2  # the second insert went with the COMMIT
    assert set(await _payloads(postgres_database)) == {"a", "b"}


async def test_a_transaction_that_wrote_nothing_or_rolled_back_sends_nothing(
    postgres_database: Database, sent: list[str]
) -> None:
    async with postgres_database.transaction():
        pass

    async def failing() -> None:
        async with postgres_database.transaction() as session:
            await _queue(session, "a")
            raise RuntimeError("the step failed")

    with pytest.raises(RuntimeError):
        await failing()
    assert sent == []
    assert await _payloads(postgres_database) == {}


async def test_a_held_write_that_fails_fails_its_commit_and_nothing_is_written(
    postgres_database: Database,
) -> None:
    async with postgres_database.transaction() as session:
        await _queue(session, "taken")

    async def twice() -> None:
        async with postgres_database.transaction() as session:
            await _queue(session, "new")
            await _queue(session, "taken")  # its error comes with the commit

    with pytest.raises(StoreError, match="duplicate key"):
        await twice()
    assert set(await _payloads(postgres_database)) == {"taken"}
    async with postgres_database.transaction() as session:  # the connection is fine again
        await _queue(session, "after")
    assert set(await _payloads(postgres_database)) == {"taken", "after"}


async def test_a_failed_held_write_fails_the_read_that_sends_it(
    postgres_database: Database,
) -> None:
    async with postgres_database.transaction() as session:
        await _queue(session, "taken")

    async def read_after() -> None:
        async with postgres_database.transaction() as session:
            await _queue(session, "taken")
            await session.execute(text("SELECT 1"))  # its error comes with this read

    with pytest.raises(StoreError, match="duplicate key"):
        await read_after()
    assert set(await _payloads(postgres_database)) == {"taken"}


async def test_only_updates_said_unread_are_held_and_their_rowcount_is_unknown(
    postgres_database: Database, sent: list[str]
) -> None:
    async with postgres_database.transaction() as session:
        await _queue(session, "a")
    sent.clear()
    statement = update(OutboxEntry).where(OutboxEntry.idempotency_key == "a").values(status="done")
    async with postgres_database.transaction() as session:
        counted = await session.execute(statement)
        assert counted.rowcount == 1  # type: ignore[attr-defined]
        assert len(sent) == 1
        held = await session.execute(statement.execution_options(**{batched_pg.UNREAD: True}))
        assert held.rowcount == -1  # type: ignore[attr-defined]
        assert len(sent) == 1
    assert len(sent) == 2


async def test_statements_outside_a_transaction_are_sent_at_once(
    postgres_database: Database, sent: list[str]
) -> None:
    async with postgres_database.autocommit() as session:
        await _queue(session, "a")
        assert len(sent) == 1 and not sent[0].startswith("BEGIN")
    assert len(sent) == 1  # no COMMIT: it committed on its own
    assert set(await _payloads(postgres_database)) == {"a"}


async def test_a_streamed_read_after_held_writes_sees_them(postgres_database: Database) -> None:
    async with postgres_database.transaction() as session:
        await _queue(session, "a")
        streamed = await session.stream(select(OutboxEntry.idempotency_key))
        assert [key async for (key,) in streamed] == ["a"]


async def test_a_counted_update_of_many_rows_runs_in_the_transaction(
    postgres_database: Database,
) -> None:
    """An executemany that is read (not held) sends the held BEGIN first: it is part of the
    transaction, and rolled back with it."""
    async with postgres_database.transaction() as session:
        await _queue(session, "a")
        await _queue(session, "b")
    outbox = cast(Table, OutboxEntry.__table__)
    statement = (
        update(outbox).where(outbox.c.idempotency_key == bindparam("b_key")).values(status="done")
    )

    async def updated_then_failed() -> None:
        async with postgres_database.transaction() as session:
            await session.execute(statement, [{"b_key": "a"}, {"b_key": "b"}])
            raise RuntimeError("the step failed")

    with pytest.raises(RuntimeError):
        await updated_then_failed()
    async with postgres_database.transaction() as session:
        statuses = await session.execute(select(OutboxEntry.status))
        assert sorted(status for (status,) in statuses) == ["pending", "pending"]
