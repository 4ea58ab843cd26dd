"""The audit chain verifies when intact and names the first bad event after any tampering."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys

import pytest
from sqlalchemy import delete, event, insert, select, text, update

from dsf_bridge.store import Database, append_event, digest_payload, seal_events, verify_chain
from dsf_bridge.store.audit import GENESIS_HASH
from dsf_bridge.store.tables import AuditEvent


async def _append(database: Database, count: int, *, seal: bool = True) -> list[str]:
    """Append ``count`` events in one transaction and, as a worker round does after it, seal
    them; return the hashes of the events sealed."""
    async with database.transaction() as session:
        for number in range(count):
            await append_event(
                session,
                actor="organization:test.org",
                subject=f"Task/{number}",
                action="task.received",
                reason="test",
                payload={"resourceType": "Task", "id": str(number)},
            )
    if not seal:
        return []
    async with database.transaction() as session:
        assert await seal_events(session) == count
        events = (await session.scalars(select(AuditEvent).order_by(AuditEvent.id))).all()
    return [str(event.event_hash) for event in events[-count:]] if count else []


async def _verify(database: Database) -> tuple[bool, int | None, str | None, int]:
    async with database.transaction() as session:
        report = await verify_chain(session)
    return report.ok, report.first_bad_sequence, report.problem, report.events


async def test_intact_chain_verifies(database: Database) -> None:
    hashes = await _append(database, 5)
    ok, bad, problem, count = await _verify(database)
    assert (ok, bad, problem, count) == (True, None, None, 5)
    async with database.transaction() as session:
        events = (await session.scalars(select(AuditEvent).order_by(AuditEvent.sequence))).all()
    assert [event.sequence for event in events] == [1, 2, 3, 4, 5]
    assert events[0].previous_hash == GENESIS_HASH
    assert [event.previous_hash for event in events[1:]] == hashes[:-1]
    assert events[2].payload_digest == digest_payload({"id": "2", "resourceType": "Task"})
    assert events[2].occurred_at.tzinfo is not None


async def test_appends_in_separate_transactions_continue_the_chain(database: Database) -> None:
    await _append(database, 2)
    await _append(database, 3)
    assert (await _verify(database))[:2] == (True, None)
    assert (await _verify(database))[3] == 5


async def test_rolled_back_append_leaves_no_gap(database: Database) -> None:
    await _append(database, 2)

    async def append_then_fail() -> None:
        async with database.transaction() as session:
            await append_event(session, actor="a", subject="s", action="x")
            raise RuntimeError("abort")

    with pytest.raises(RuntimeError):
        await append_then_fail()
    await _append(database, 1)
    assert await _verify(database) == (True, None, None, 3)


async def _tamper(database: Database, statement: object) -> None:
    async with database.transaction() as session:
        await session.execute(statement)  # type: ignore[call-overload]


async def test_changed_row_is_detected(database: Database) -> None:
    await _append(database, 5)
    await _tamper(
        database, update(AuditEvent).where(AuditEvent.sequence == 3).values(reason="nothing")
    )
    ok, bad, problem, _ = await _verify(database)
    assert not ok
    assert bad == 3
    assert problem is not None and "changed" in problem


async def test_changed_timestamp_is_detected(database: Database) -> None:
    await _append(database, 3)
    later = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    await _tamper(
        database, update(AuditEvent).where(AuditEvent.sequence == 2).values(occurred_at=later)
    )
    assert (await _verify(database))[:2] == (False, 2)


async def test_deleted_middle_row_is_detected(database: Database) -> None:
    await _append(database, 5)
    await _tamper(database, delete(AuditEvent).where(AuditEvent.sequence == 2))
    ok, bad, problem, _ = await _verify(database)
    assert (ok, bad) == (False, 2)
    assert problem is not None and "missing" in problem


async def test_deleted_newest_row_is_detected(database: Database) -> None:
    await _append(database, 4)
    await _tamper(database, delete(AuditEvent).where(AuditEvent.sequence == 4))
    ok, bad, problem, _ = await _verify(database)
    assert (ok, bad) == (False, 4)
    assert problem is not None and "head" in problem


async def test_rechained_deletion_is_detected(database: Database) -> None:
    # Delete event 2 and renumber event 3 into its place: sequence looks fine, hashes do not.
    await _append(database, 4)
    await _tamper(database, delete(AuditEvent).where(AuditEvent.sequence == 2))
    await _tamper(database, update(AuditEvent).where(AuditEvent.sequence == 3).values(sequence=2))
    await _tamper(database, update(AuditEvent).where(AuditEvent.sequence == 4).values(sequence=3))
    assert (await _verify(database))[:2] == (False, 2)


async def test_row_inserted_out_of_order_is_detected(database: Database) -> None:
    await _append(database, 3)
    async with database.transaction() as session:
        first = (await session.scalars(select(AuditEvent).where(AuditEvent.sequence == 1))).one()
        forged = {
            column.name: getattr(first, column.key) for column in AuditEvent.__table__.columns
        }
    forged.update(id=99, sequence=7, event_hash="f" * 64)
    await _tamper(database, insert(AuditEvent).values(**forged))
    ok, bad, problem, _ = await _verify(database)
    assert (ok, bad) == (False, 4)
    assert problem is not None and "missing" in problem


async def test_swapped_rows_are_detected(database: Database) -> None:
    await _append(database, 4)
    async with database.transaction() as session:
        await session.execute(text("UPDATE audit_events SET sequence = -1 WHERE sequence = 2"))
        await session.execute(text("UPDATE audit_events SET sequence = 2 WHERE sequence = 3"))
        await session.execute(text("UPDATE audit_events SET sequence = 3 WHERE sequence = -1"))
    assert (await _verify(database))[:2] == (False, 2)


async def test_unsealed_events_are_counted_apart_and_sealed_in_append_order(
    database: Database,
) -> None:
    await _append(database, 2)
    await _append(database, 3, seal=False)
    async with database.transaction() as session:
        report = await verify_chain(session)
    assert (report.ok, report.events, report.unsealed) == (True, 2, 3)
    async with database.transaction() as session:
        assert await seal_events(session, limit=2) == 2  # in batches, oldest first
        assert await seal_events(session) == 1
        assert await seal_events(session) == 0
        events = (await session.scalars(select(AuditEvent).order_by(AuditEvent.id))).all()
    assert [event.sequence for event in events] == [1, 2, 3, 4, 5]
    assert [event.previous_hash for event in events[1:]] == [e.event_hash for e in events[:-1]]
    assert await _verify(database) == (True, None, None, 5)


async def test_a_transactions_events_are_written_at_its_end_in_one_statement_in_order(
    database: Database,
) -> None:
    statements: list[tuple[str, bool]] = []
    inserted: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        words = statement.split()  # "SELECT ...", "INSERT INTO audit_events ..."
        if words[0] != "BEGIN":  # SQLite's BEGIN IMMEDIATE
            statements.append((" ".join(words[:3:2]), bool(_[-1])))  # and whether executemany
            inserted.append(statement)

    event.listen(database.engine.sync_engine, "before_cursor_execute", seen)
    try:
        async with database.transaction() as session:
            for number in range(3):
                await append_event(
                    session, actor="a", subject=f"Task/{number}", action="task.received"
                )
                await session.execute(select(AuditEvent.id).limit(1))
            # Nothing of the transaction reads them back before its end.
            assert statements == [("SELECT FROM", False)] * 3
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", seen)
    # One statement for the three: sqlite3's executemany, or on PostgreSQL one INSERT of
    # three groups of VALUES.
    assert statements[3:] == [("INSERT audit_events", database.dialect == "sqlite")]
    if database.dialect == "postgresql":
        assert inserted[-1].count("), (") == 2
    async with database.transaction() as session:
        subjects = (await session.scalars(select(AuditEvent.subject).order_by(AuditEvent.id))).all()
    assert subjects == ["Task/0", "Task/1", "Task/2"]


async def test_an_unsealed_sealed_event_is_detected(database: Database) -> None:
    # Turning a sealed event back into an unsealed one (to edit it and have it sealed again)
    # leaves a gap in the chain.
    await _append(database, 3)
    await _tamper(
        database,
        update(AuditEvent)
        .where(AuditEvent.sequence == 2)
        .values(sequence=None, previous_hash=None, event_hash=None, reason="edited"),
    )
    async with database.transaction() as session:
        report = await verify_chain(session)
    assert (report.ok, report.first_bad_sequence, report.unsealed) == (False, 2, 1)


async def test_appends_do_not_wait_for_each_other(postgres_database: Database) -> None:
    # Before, an append locked the chain's head until its transaction committed: a second
    # step (or replica) appending meanwhile waited for the first one's commit.
    first_in = asyncio.Event()
    release = asyncio.Event()

    async def slow() -> None:
        async with postgres_database.transaction() as session:
            await append_event(session, actor="a", subject="s/1", action="slow")
            first_in.set()
            await release.wait()

    holder = asyncio.ensure_future(slow())
    await first_in.wait()
    try:
        async with asyncio.timeout(5):
            async with postgres_database.transaction() as session:
                await append_event(session, actor="a", subject="s/2", action="fast")
    finally:
        release.set()
        await holder
    async with postgres_database.transaction() as session:
        assert await seal_events(session) == 2
    assert (await _verify(postgres_database))[:2] == (True, None)


async def test_a_second_sealer_skips_while_the_first_holds_the_head(
    postgres_database: Database,
) -> None:
    await _append(postgres_database, 1)
    await _append(postgres_database, 2, seal=False)
    async with postgres_database.transaction() as first:
        await first.execute(text("SELECT 1 FROM audit_head FOR UPDATE"))
        async with asyncio.timeout(5), postgres_database.transaction() as second:
            assert await seal_events(second) == 0  # no wait, nothing sealed twice
    async with postgres_database.transaction() as session:
        assert await seal_events(session) == 2
    assert await _verify(postgres_database) == (True, None, None, 3)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsf_bridge", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_verify_exit_codes(database: Database, migrated_url: str) -> None:
    await _append(database, 3)
    intact = _cli("audit", "verify", "--db-url", migrated_url)
    assert intact.returncode == 0, intact.stderr
    assert "intact: 3 events" in intact.stdout

    await _tamper(database, update(AuditEvent).where(AuditEvent.sequence == 2).values(actor="x"))
    broken = _cli("audit", "verify", "--db-url", migrated_url)
    assert broken.returncode == 1
    assert "BROKEN at event 2" in broken.stderr


async def test_a_study_uid_in_a_failure_reaches_neither_the_trail_nor_its_audit_events(
    database: Database,
) -> None:
    """The requesting site's failure quotes the archive ("study <UID> is not in the archive"),
    a bridge error whose message the handler's failure keeps; the instance's failure event
    carried that UID, and ``audit export --format fhir`` put it in ``outcomeDesc``."""
    import json

    from dsf_bridge.dsf.audit_events import audit_event_resource
    from dsf_bridge.logs import uid_digest
    from dsf_bridge.plugins.inference import (
        REQUEST_INVALID,
        InferenceRequestError,
        inference_failed,
    )
    from dsf_bridge.plugins.invocation import failure_message
    from dsf_bridge.plugins.registry import HandlerContext
    from dsf_bridge.store import export_events

    study = "1.2.826.0.1.3680043.8.498.77312904551"
    ctx = HandlerContext(
        "InferenceFailed",
        "InferenceFailed",
        "bk",
        {
            "errorCode": REQUEST_INVALID,
            "errorMessage": f"study {study} is not in the archive at https://pacs.example.org",
        },
    )
    with pytest.raises(InferenceRequestError) as raised:
        inference_failed(ctx)
    reason = failure_message(raised.value, "InferenceFailed", "Failed", None)
    assert study in reason
    async with database.transaction() as session:
        await append_event(
            session, actor="bridge", subject="instance/x", action="instance.failed", reason=reason
        )
        await seal_events(session)
    async with database.transaction() as session:
        [event] = [event async for event in export_events(session)]
        assert (await verify_chain(session)).ok
    resource = audit_event_resource(event, "site-a.example.org")
    assert study not in json.dumps(event) + json.dumps(resource)
    assert f"study uid:{uid_digest(study)} is not in the archive" in resource["outcomeDesc"]
