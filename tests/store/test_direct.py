"""Prepared statements run straight on the driver (:mod:`dsf_bridge.store.direct`): the same rows
as through a session, the same errors, on both databases."""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
import pytest
from sqlalchemy import Table, bindparam, insert, select, text, update

from dsf_bridge.errors import StoreError, TaskAlreadyDeliveredError
from dsf_bridge.store import Database, batched_pg, direct
from dsf_bridge.store import repository as repo
from dsf_bridge.store.database import execute, on_conflict
from dsf_bridge.store.direct import Prepared, run_many_on
from dsf_bridge.store.kinds import OutboxKind, TaskSeenStatus
from dsf_bridge.store.tables import OutboxEntry, ProcessInstance, TaskSeen

_OUTBOX: Table = OutboxEntry.__table__  # type: ignore[assignment]
_SEEN: Table = TaskSeen.__table__  # type: ignore[assignment]
T0 = dt.datetime(2026, 12, 1, 9, 30, 15, 123456, tzinfo=dt.UTC)

_QUEUE = (
    insert(_OUTBOX)
    .inline()
    .values(
        status="pending",
        failures=0,
        attempts=0,
        **{
            name: bindparam(name)
            for name in (
                "idempotency_key",
                "instance_id",
                "kind",
                "payload",
                "next_attempt_at",
                "created_at",
                "lease_owner",
                "lease_expires_at",
            )
        },
    )
)
_SEEN_ROW = insert(_SEEN).values(
    **{
        name: bindparam(name)
        for name in ("task_id", "task_version", "role", "status", "instance_id", "seen_at")
    }
)


def _entry(key: str) -> dict[str, Any]:
    return {
        "idempotency_key": key,
        "instance_id": None,
        "kind": OutboxKind.SEND_TASK,
        "payload": {"quote": "it's 100% ü", "nested": [1, None, True], "at": "x"},
        "next_attempt_at": T0,
        "created_at": T0 + dt.timedelta(microseconds=1),
        "lease_owner": None,
        "lease_expires_at": None,
    }


def _seen() -> dict[str, Any]:
    """Task t-1's version 1, in progress."""
    return {
        "task_id": "t-1",
        "task_version": "1",
        "role": "incoming",
        "status": TaskSeenStatus.IN_PROGRESS,
        "instance_id": None,
        "seen_at": T0,
    }


async def _stored(database: Database, key: str) -> dict[str, Any]:
    """The row as the database holds it: every column but the key as text, not as a type
    reads it."""
    async with database.transaction() as session:
        connection = await session.connection()
        columns = [c.name for c in _OUTBOX.columns if c.name not in ("id", "idempotency_key")]
        selected = ", ".join(f"CAST({name} AS TEXT)" for name in columns)
        row = (
            await connection.exec_driver_sql(
                f"SELECT {selected} FROM outbox WHERE idempotency_key = '{key}'"
            )
        ).one()
        return dict(zip(columns, row, strict=True))


async def test_a_prepared_write_stores_what_the_session_stores(database: Database) -> None:
    async with database.transaction() as session:
        await session.execute(_QUEUE, _entry("by-session"))
        result = await execute(session, Prepared(_QUEUE), _entry("direct"))
        assert result.rows == []
    direct = await _stored(database, "direct")
    assert direct == await _stored(database, "by-session")  # JSON, times, kind: as stored
    assert direct["payload"] is not None and "100%" in direct["payload"]
    async with database.transaction() as session:
        entry = (
            await session.execute(
                select(OutboxEntry).where(OutboxEntry.idempotency_key == "direct")
            )
        ).scalar_one()
        assert entry.payload == _entry("direct")["payload"]
        assert entry.next_attempt_at == T0
        assert entry.kind is OutboxKind.SEND_TASK


async def test_a_statement_run_on_the_database_commits_on_its_own(database: Database) -> None:
    async def claim() -> bool:
        return await repo.record_task_seen(
            database,
            task_id="t-1",
            task_version="3",
            role="incoming",
            status=TaskSeenStatus.CLAIMING,
        )

    assert await claim() is True
    assert await claim() is False  # seen before: nothing written
    async with database.transaction() as session:
        seen = await repo.get_task_seen(session, "t-1", "3")
    assert seen is not None and seen.status == TaskSeenStatus.CLAIMING
    renamed = Prepared(
        update(_SEEN)
        .where(_SEEN.c.task_id == bindparam("b_task"))
        .values(status=bindparam("status"))
        .returning(_SEEN.c.task_version)
    )
    answered = await database.run(renamed, {"b_task": "t-1", "status": TaskSeenStatus.FAILED})
    assert answered.rows == [("3",)] and answered.rowcount == 1
    assert answered.scalar() == "3"
    missed = await database.run(renamed, {"b_task": "t-2", "status": TaskSeenStatus.FAILED})
    assert missed.first() is None and missed.rowcount == 0


async def test_a_duplicate_key_is_the_stores_error_and_on_conflicts(database: Database) -> None:
    row = _seen()
    prepared = Prepared(_SEEN_ROW)
    await database.run(prepared, row)
    with pytest.raises(StoreError, match=r"(?i)unique|duplicate"):
        await database.run(prepared, row)

    async def again() -> None:
        async with database.transaction() as session:
            on_conflict(session, "tasks_seen", TaskAlreadyDeliveredError("delivered before"))
            await execute(session, prepared, {**row, "task_version": "2"})
            await execute(session, prepared, row)

    with pytest.raises(TaskAlreadyDeliveredError, match="delivered before"):
        await again()
    async with database.transaction() as session:
        versions = (await session.execute(select(TaskSeen.task_version))).scalars().all()
    assert versions == ["1"]  # the transaction's other row rolled back with it


async def test_outside_a_transaction_of_the_database_the_session_runs_it(
    database: Database,
) -> None:
    prepared = Prepared(_QUEUE)
    async with database.autocommit() as session:  # on PostgreSQL a session of its own
        await execute(session, prepared, _entry("a"))
        found = await execute(
            session,
            Prepared(select(_OUTBOX.c.idempotency_key).where(_OUTBOX.c.status == "pending")),
            {},
        )
    assert found.rows == [("a",)]


def test_a_statement_that_needs_sqlalchemy_at_execution_is_refused(database: Database) -> None:
    dialect = database.engine.dialect
    defaults = Prepared(insert(_OUTBOX).values(idempotency_key=bindparam("k")))
    with pytest.raises(TypeError, match=r"give every column; defaults for .*created_at"):
        defaults.compiled(dialect)
    row = {"status": "pending", "attempts": 0, "failures": 0, **_entry("k")}
    unasked = Prepared(insert(_OUTBOX).values(row))  # RETURNING id, for SQLAlchemy
    if database.dialect == "postgresql":
        with pytest.raises(TypeError, match=r"returns nothing unasked: build it with \.inline"):
            unasked.compiled(dialect)
    returned = Prepared(select(_OUTBOX.c.payload))
    if database.dialect == "sqlite":  # SQLite's JSON is text that its type reads
        with pytest.raises(TypeError, match="cannot return payload"):
            returned.compiled(dialect)
    else:  # psycopg reads PostgreSQL's JSON itself, as for a session
        assert returned.compiled(dialect).returns
    instances: Table = ProcessInstance.__table__  # type: ignore[assignment]
    expanding = Prepared(select(instances.c.id).where(instances.c.id.in_(bindparam("ids"))))
    with pytest.raises(TypeError, match="cannot expand"):
        expanding.compiled(dialect)


async def test_an_unreachable_server_is_a_passing_store_error() -> None:
    away = Database("postgresql://postgres@127.0.0.1:9/nowhere")
    try:
        with pytest.raises(StoreError) as raised:
            await away.run(Prepared(_SEEN_ROW), {})
        assert raised.value.retryable
    finally:
        await away.dispose()


async def test_a_connection_the_server_ended_is_not_used_again(
    postgres_database: Database, postgres_url: str
) -> None:
    probe = Prepared(select(text("pg_backend_pid()")))
    pid = (await postgres_database.run(probe, {})).scalar()
    with psycopg.connect(postgres_url, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", (pid,))
    backends = set()
    failures: list[StoreError] = []
    for _ in range(4):  # each pooled connection once: the ended one fails, and only once
        try:
            backends.add((await postgres_database.run(probe, {})).scalar())
        except StoreError as exc:
            failures.append(exc)
    assert len(failures) <= 1
    assert all(failure.retryable for failure in failures)
    assert pid not in backends
    assert (await postgres_database.run(probe, {})).scalar() != pid


@pytest.mark.parametrize(
    "refused",
    [{"status": "misspelt"}, {"seen_at": dt.datetime(2026, 12, 1, 9, 30)}],
    ids=["kind", "naive-time"],
)
async def test_a_value_a_columns_type_refuses_is_a_store_error_as_through_a_session(
    database: Database, refused: dict[str, Any]
) -> None:
    row = {**_seen(), **refused}

    async def through(prepared: bool) -> None:
        async with database.transaction() as session:
            if prepared:
                await execute(session, Prepared(_SEEN_ROW), row)
            else:
                await session.execute(_SEEN_ROW, row)

    for prepared in (False, True):
        with pytest.raises(StoreError) as raised:
            await through(prepared)
        assert not raised.value.retryable
    with pytest.raises(StoreError) as alone:
        await database.run(Prepared(_SEEN_ROW), row)
    assert not alone.value.retryable


async def test_values_for_parameters_the_statement_lacks_are_refused(database: Database) -> None:
    """A session would add a column to the INSERT for such a key; a prepared statement is
    compiled once, so the value would be lost: refused instead."""
    with pytest.raises(TypeError, match=r"no parameters \['lease_owner_typo'\]"):
        await database.run(Prepared(_QUEUE), {**_entry("k"), "lease_owner_typo": "x"})
    async with database.transaction() as session:
        assert (await session.execute(select(OutboxEntry.idempotency_key))).all() == []


def test_an_update_nobody_reads_says_so_as_for_a_session(database: Database) -> None:
    dialect = database.engine.dialect
    bump = update(_SEEN).where(_SEEN.c.task_id == bindparam("b_task")).values(status="failed")
    assert Prepared(bump.execution_options(**{batched_pg.UNREAD: True})).compiled(dialect).unread
    assert not Prepared(bump).compiled(dialect).unread
    assert Prepared(_SEEN_ROW).compiled(dialect).unread  # an INSERT without RETURNING


@pytest.mark.parametrize("count", [3, 70, 1001], ids=["few", "uncached", "two-statements"])
async def test_rows_given_together_are_written_in_order_as_a_session_writes_them(
    database: Database, count: int
) -> None:
    rows = [{**_entry(f"k{number:04d}"), "instance_id": None} for number in range(count)]
    prepared = Prepared(_QUEUE)
    async with database.transaction() as session:
        connection = await session.connection()
        raw = (await connection.get_raw_connection()).dbapi_connection
        engine = database.engine.sync_engine
        await run_many_on(raw, engine, prepared, rows)
        await session.execute(_QUEUE, {**_entry("by-session"), "instance_id": None})
    async with database.transaction() as session:
        keys = (
            await session.scalars(select(OutboxEntry.idempotency_key).order_by(OutboxEntry.id))
        ).all()
    assert keys == [row["idempotency_key"] for row in rows] + ["by-session"]
    by_session = await _stored(database, "by-session")
    assert await _stored(database, "k0000") == by_session
    assert await _stored(database, f"k{count - 1:04d}") == by_session


async def test_only_a_plain_insert_takes_several_rows(database: Database) -> None:
    returning = Prepared(_SEEN_ROW.returning(_SEEN.c.task_id))
    async with database.transaction() as session:
        connection = await session.connection()
        raw = (await connection.get_raw_connection()).dbapi_connection
        with pytest.raises(TypeError, match="only a plain INSERT that returns nothing"):
            await run_many_on(raw, database.engine.sync_engine, returning, [_seen()])


@pytest.mark.parametrize(
    ("sql", "several"),
    [
        ("INSERT INTO t (a, b) VALUES (%(a)s::VARCHAR, lower(%(b)s))", True),
        ("INSERT INTO t (a) VALUES (?)", True),
        ("INSERT INTO t (a) VALUES (%(a)s) ON CONFLICT DO NOTHING", False),
        ("INSERT INTO t (a) VALUES (?) RETURNING t.id", False),
        ("WITH x AS (SELECT %(k)s AS k) INSERT INTO t (a) VALUES (%(a)s)", False),
        ("INSERT INTO t (a) SELECT 1", False),
    ],
)
def test_only_one_group_of_values_is_repeated_for_several_rows(sql: str, several: bool) -> None:
    assert direct._one_group_of_values(sql) is several


def test_several_rows_rename_their_parameters_and_keep_escaped_percent_signs() -> None:
    group = "(%(a)s::VARCHAR, '50%%(b)s', %(c_d)s)"
    assert direct._renamed(group, 3) == "(%(a__3)s::VARCHAR, '50%%(b)s', %(c_d__3)s)"


async def test_an_insert_with_a_clause_after_its_values_is_not_given_several_rows(
    database: Database,
) -> None:
    """It would be repeated with each group of values (on PostgreSQL a syntax error)."""
    ignoring = Prepared(
        lambda name: repo._insert_ignoring_duplicates_in(name, _SEEN).values(
            **{key: bindparam(key) for key in _seen()}
        )
    )
    async with database.transaction() as session:
        connection = await session.connection()
        raw = (await connection.get_raw_connection()).dbapi_connection
        with pytest.raises(TypeError, match="only a plain INSERT"):
            await run_many_on(raw, database.engine.sync_engine, ignoring, [_seen(), _seen()])
