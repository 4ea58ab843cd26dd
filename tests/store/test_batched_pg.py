"""PostgreSQL writes held to the next read (``postgresql+dsfbatch``): fewer round trips, the
same outcome. Round trips are counted as the queries psycopg sends to the server."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any, cast

import psycopg
import pytest
from sqlalchemy import Table, bindparam, func, insert, select, text, update
from sqlalchemy.ext.asyncio import create_async_engine

from dsf_bridge.errors import StoreError, TaskAlreadyDeliveredError
from dsf_bridge.store import Database, append_event, batched_pg
from dsf_bridge.store import database as database_module
from dsf_bridge.store import repository as repo
from dsf_bridge.store.kinds import OutboxKind, TaskSeenStatus
from dsf_bridge.store.tables import AuditEvent, OutboxEntry, TaskSeen

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
async def sent(postgres_database: Database, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """One entry per round trip to ``postgres_database`` from now on (after its first
    connection's set-up queries): a query sent alone, or the queries of one pipeline joined
    by ``;``."""
    async with postgres_database.transaction() as session:
        await session.execute(text("SELECT 1"))
    trips: list[str] = []
    piped: list[list[str]] = []
    real_execute = psycopg.AsyncCursor.execute
    real_pipeline = psycopg.AsyncConnection.pipeline

    async def execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        (piped[-1] if piped else trips).append(str(query))
        return await real_execute(self, query, *args, **kwargs)

    @contextlib.asynccontextmanager
    async def pipeline(self: Any) -> AsyncIterator[Any]:
        piped.append([])
        try:
            async with real_pipeline(self) as pipe:
                yield pipe
        finally:
            trips.append(";".join(piped.pop()))

    monkeypatch.setattr(psycopg.AsyncCursor, "execute", execute)
    monkeypatch.setattr(psycopg.AsyncConnection, "pipeline", pipeline)
    return trips


async def _queue(session: Any, key: str, leased_to: repo.Lease | None = None) -> None:
    await repo.enqueue_new_outbox(
        session,
        idempotency_key=key,
        kind=OutboxKind.SEND_TASK,
        payload={"key": key, "quote": "it's 100%", "nested": [1, None, True]},
        instance_id=None,
        now=T0,
        leased_to=leased_to,
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


async def _duplicate_held(database: Database, *, read_after: bool) -> StoreError:
    """Queue a key that exists, held with a new one, in a transaction that then reads (or
    commits at once): the error it ends with."""
    async with database.transaction() as session:
        await _queue(session, "taken")

    async def twice() -> None:
        async with database.transaction() as session:
            await _queue(session, "new")
            await _queue(session, "taken")  # its error comes with the read or the commit
            if read_after:
                await session.execute(text("SELECT 1"))

    with pytest.raises(StoreError, match="duplicate key") as raised:
        await twice()
    return raised.value


@pytest.mark.parametrize("read_after", [False, True], ids=["commit", "read"])
async def test_a_held_write_that_fails_fails_what_sends_it_and_nothing_is_written(
    postgres_database: Database, read_after: bool
) -> None:
    error = await _duplicate_held(postgres_database, read_after=read_after)
    assert not error.retryable
    # The error names the held statements (their SQL, not their values).
    notes = "".join(getattr(error.__cause__.orig, "__notes__", []))  # type: ignore[union-attr]
    assert "held before it" in notes and "INSERT INTO outbox" in notes
    assert set(await _payloads(postgres_database)) == {"taken"}
    async with postgres_database.transaction() as session:  # the connection is fine again
        await _queue(session, "after")
    assert set(await _payloads(postgres_database)) == {"taken", "after"}


@pytest.mark.parametrize("bad", ["a NUL \x00 in a key", {"a set": {1, 2}}], ids=["nul", "json"])
async def test_a_held_write_that_psycopg_refuses_before_sending_writes_nothing(
    postgres_database: Database, bad: Any
) -> None:
    """A value psycopg cannot send (it fails on this side, while the pipeline is queued) fails
    the transaction, and the writes queued before it are not committed: the pipeline's Sync
    must not commit them (an implicit transaction would, without BEGIN)."""

    async def failing() -> None:
        async with postgres_database.transaction() as session:
            await _queue(session, "first")
            if isinstance(bad, str):
                await _queue(session, bad)
            else:
                await repo.enqueue_new_outbox(
                    session,
                    idempotency_key="second",
                    kind=OutboxKind.SEND_TASK,
                    payload=bad,
                    instance_id=None,
                    now=T0,
                )

    with pytest.raises((StoreError, TypeError)):
        await failing()
    assert await _payloads(postgres_database) == {}


async def test_a_single_audit_event_goes_with_the_commit(
    postgres_database: Database, sent: list[str]
) -> None:
    """One event is written without reading its new id back (a round trip of its own)."""
    async with postgres_database.transaction() as session:
        await _queue(session, "a")
        await append_event(session, actor="test", subject="instance/i", action="one")
    assert len(sent) == 1
    assert "INSERT INTO audit_events" in sent[0] and "RETURNING" not in sent[0]


async def test_rows_given_together_are_one_insert_of_several_values(
    postgres_database: Database, sent: list[str]
) -> None:
    """The audit events a transaction appends go to the server as one INSERT (one statement to
    run, not one per event), with the commit, in the order given."""
    async with postgres_database.transaction() as session:
        for action in ("first", "second", "third"):
            await append_event(session, actor="test", subject="instance/i", action=action)
    assert len(sent) == 1
    assert sent[0].count("INSERT INTO audit_events") == 1
    assert sent[0].count("VALUES") == 1 and sent[0].count("), (") == 2
    async with postgres_database.transaction() as session:
        actions = list(await session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))
    assert actions == ["first", "second", "third"]


async def test_a_task_taken_in_twice_is_refused_at_the_commit_without_a_read(
    postgres_database: Database, sent: list[str]
) -> None:
    """Taking a Task version in reads nothing back: its two writes go with the commit, and a
    version taken in before fails the transaction there, as a Task delivered already (not a
    store error), with nothing of it written and the connection fine again."""

    async with postgres_database.transaction() as session:
        await repo.take_in_task(
            session, task_id="t1", task_version="4", claimed_version="3", instance_id="i-1"
        )
        assert sent == []  # held: nothing reads what they answer
    assert len(sent) == 1
    assert sent[0].startswith("BEGIN") and sent[0].endswith("COMMIT")

    async def again() -> None:  # another claim (of version 2) delivers version 4 once more
        async with postgres_database.transaction() as session:
            await repo.record_task_seen(
                session,
                task_id="t9",
                task_version="1",
                role="outgoing",
                status=TaskSeenStatus.REQUESTED,
            )
            await repo.take_in_task(
                session, task_id="t1", task_version="4", claimed_version="2", instance_id="i-2"
            )

    with pytest.raises(TaskAlreadyDeliveredError, match="version 4 was delivered already"):
        await again()
    async with postgres_database.transaction() as session:
        rows = {
            (row.task_id, row.task_version): (row.status, row.instance_id)
            for row in await session.execute(
                select(
                    TaskSeen.task_id, TaskSeen.task_version, TaskSeen.status, TaskSeen.instance_id
                )
            )
        }
    assert rows == {
        ("t1", "3"): (TaskSeenStatus.TAKEN_IN, "i-1"),
        ("t1", "4"): (TaskSeenStatus.IN_PROGRESS, "i-1"),
    }


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


async def test_values_go_to_the_server_as_parameters_not_in_the_sql(
    postgres_database: Database, sent: list[str]
) -> None:
    """Bound by the server as before: an error the server logs shows the SQL, never a value
    (a held write's payload may hold a study's identifiers)."""
    async with postgres_database.transaction() as session:
        await repo.enqueue_new_outbox(
            session,
            idempotency_key="secret-key",
            kind=OutboxKind.SEND_TASK,
            payload={"study": "1.2.826.0.1.3680043.8.498.1"},
            instance_id=None,
            now=T0,
        )
    assert len(sent) == 1
    assert "1.2.826.0.1.3680043.8.498.1" not in sent[0] and "secret-key" not in sent[0]
    assert (await _payloads(postgres_database))["secret-key"] == {
        "study": "1.2.826.0.1.3680043.8.498.1"
    }


async def test_a_transaction_the_server_ended_under_it_is_begun_again(
    postgres_database: Database,
) -> None:
    """As psycopg begins a transaction implicitly: a write after the server's transaction
    ended (here by a COMMIT sent as SQL) belongs to a new one, rolled back with the step."""

    async def ended_then_failed() -> None:
        async with postgres_database.transaction() as session:
            await _queue(session, "a")
            await session.execute(text("COMMIT"))  # sends the BEGIN and the insert, commits
            await _queue(session, "b")
            await session.execute(text("SELECT 1"))  # sends a new BEGIN with the insert
            raise RuntimeError("the step failed")

    with pytest.raises(RuntimeError):
        await ended_then_failed()
    assert set(await _payloads(postgres_database)) == {"a"}


async def test_an_isolation_level_given_to_the_engine_is_the_transactions(
    postgres_database: Database,
) -> None:
    engine = create_async_engine(postgres_database.url, isolation_level="SERIALIZABLE")
    try:
        async with engine.connect() as connection:
            level = await connection.scalar(text("SHOW transaction_isolation"))
            assert level == "serializable"
        assert engine.dialect.default_isolation_level == "SERIALIZABLE"
        async with engine.connect() as connection:  # and back to it after AUTOCOMMIT
            single = await connection.execution_options(isolation_level="AUTOCOMMIT")
            assert await single.scalar(text("SHOW transaction_isolation")) == "read committed"
        async with engine.connect() as connection:
            level = await connection.scalar(text("SHOW transaction_isolation"))
            assert level == "serializable"
    finally:
        await engine.dispose()


async def test_a_statement_prepared_in_an_aborted_pipeline_does_not_poison_the_connection(
    postgres_database: Database,
) -> None:
    """psycopg prepares a statement at its sixth execution; in a pipeline that a held write
    before it aborted, the server skipped that PREPARE. The rollback forgets it, so the
    statement runs again on the same connection (one connection: the pool's only one)."""
    single = Database(postgres_database.url.render_as_string(False), pool_size=1, max_overflow=0)
    outbox = cast(Table, OutboxEntry.__table__)
    other = insert(outbox).inline()  # another held INSERT: another statement to prepare

    async def other_insert(session: Any, key: str) -> None:
        await session.execute(
            other,
            {
                "idempotency_key": key,
                "kind": OutboxKind.SEND_TASK,
                "payload": {},
                "status": "pending",
                "next_attempt_at": T0,
                "created_at": T0,
            },
        )

    async def fails_early() -> None:  # a rollback before anything was prepared
        async with single.transaction() as session:
            await session.execute(text("SELECT 1"))
            raise RuntimeError("the step failed")

    async def aborted() -> None:
        async with single.transaction() as session:
            await other_insert(session, "taken")  # a duplicate: aborts the pipeline
            await _queue(session, "k5")  # the sixth: prepared, and skipped

    try:
        with pytest.raises(RuntimeError):
            await fails_early()
        async with single.transaction() as session:
            await other_insert(session, "taken")
        for n in range(5):
            async with single.transaction() as session:
                await _queue(session, f"k{n}")
        with pytest.raises(StoreError, match="duplicate key"):
            await aborted()
        for n in range(6, 9):
            async with single.transaction() as session:
                await _queue(session, f"k{n}")
    finally:
        await single.dispose()
    assert {f"k{n}" for n in (*range(5), 6, 7, 8)} <= set(await _payloads(postgres_database))


async def test_a_transaction_whose_held_write_failed_cannot_commit(
    postgres_database: Database,
) -> None:
    """The error of a held write surfaces at a later statement; a caller that catches it and
    commits gets an error, not PostgreSQL's silent ROLLBACK for a COMMIT of a failed
    transaction."""
    async with postgres_database.transaction() as session:
        await _queue(session, "taken")

    async def caught_then_committed() -> None:
        async with postgres_database.transaction() as session:
            await _queue(session, "new")
            await _queue(session, "taken")
            with contextlib.suppress(Exception):
                await session.execute(text("SELECT 1"))  # the duplicate's error, caught

    with pytest.raises(StoreError, match="cannot commit"):
        await caught_then_committed()
    assert set(await _payloads(postgres_database)) == {"taken"}


async def test_a_write_given_soon_adds_no_round_trip(
    postgres_database: Database, sent: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database_module, "SOON_SECONDS", 30.0)
    async with postgres_database.transaction() as session:
        await _queue(session, "a", leased_to=("me", T0 + dt.timedelta(minutes=1)))
    sent.clear()
    repo.mark_outbox_done_soon(postgres_database, "a", "me", result="done", now=T0)
    async with postgres_database.transaction() as session:
        await _queue(session, "b")
    assert len(sent) == 1  # BEGIN; the done mark; the new entry; COMMIT
    assert sent[0].startswith("BEGIN") and sent[0].endswith("COMMIT")
    assert "UPDATE outbox" in sent[0] and "INSERT INTO outbox" in sent[0]
    async with postgres_database.transaction() as session:
        rows = await session.execute(select(OutboxEntry.idempotency_key, OutboxEntry.status))
        assert {key: status for key, status in rows} == {"a": "done", "b": "pending"}
