"""The audit trail covers the rows it describes: an instance or Task row edited behind the
bridge's back is found by ``audit verify`` and named, field by field (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import json

from sqlalchemy import delete, event, insert, select, update

from dsf_bridge.engine import load_process
from dsf_bridge.errors import RemoteError
from dsf_bridge.plugins.registry import HandlerContext, HandlerRegistry, SendContext
from dsf_bridge.runtime.processes import ProcessRuntime
from dsf_bridge.store import (
    ChainReport,
    Database,
    create_sync_engine,
    digest_payload,
    instance_record,
    seal_events,
    state_digest,
    verify_chain,
)
from dsf_bridge.store.tables import AuditEvent, ProcessInstance, TaskSeen
from tests.runtime.test_processes import FAST, Clock, FakeGateway
from tests.runtime.test_send_failures import KEY, MODEL, _run
from tests.served import cli

REFUSED = RemoteError("answered 403", retryable=False, status=403)


async def _instance(database: Database, *, fail: bool) -> str:
    """One instance of the send process run to its end (``failed`` when the send is
    refused), every event sealed; returns its id."""
    status, _, _ = await _run(database, REFUSED if fail else None, absorb=False)
    assert status == ("failed" if fail else "completed")
    async with database.transaction() as session:
        await seal_events(session)
        return str(await session.scalar(select(ProcessInstance.id)))


async def _report(database: Database) -> ChainReport:
    async with database.transaction() as session:
        return await verify_chain(session)


async def _edit(database: Database, statement: object) -> None:
    async with database.transaction() as session:
        await session.execute(statement)  # type: ignore[call-overload]


async def test_rows_as_written_verify_and_events_record_them(database: Database) -> None:
    instance_id = await _instance(database, fail=False)
    report = await _report(database)
    assert report.ok, (report.problem, report.record_problems)
    # The instance, the start Task's version taken in and the Task it sent.
    assert (report.records, report.record_problems) == (3, ())
    async with database.transaction() as session:
        texts = (
            await session.scalars(
                select(AuditEvent.record)
                .where(AuditEvent.record.is_not(None))
                .order_by(AuditEvent.id)
            )
        ).all()
    mine = [text for text in texts if text and f"process_instances/{instance_id}" in text]
    last = json.loads(mine[-1])
    columns = last[f"process_instances/{instance_id}"]
    assert columns["status"] == "completed"
    assert columns["process"] == f"{KEY}|1.0"
    assert columns["business_key"] == "bk-1"
    assert len(columns["state"]) == 64  # a digest, never the state


async def test_a_failed_instance_rewritten_completed_is_named(database: Database) -> None:
    instance_id = await _instance(database, fail=True)
    assert (await _report(database)).ok
    await _edit(
        database,
        update(ProcessInstance).where(ProcessInstance.id == instance_id).values(status="completed"),
    )
    report = await _report(database)
    assert not report.ok
    assert report.problem is None  # the chain of events itself is intact
    [problem] = report.record_problems
    assert problem.startswith(f"process instance {instance_id} was changed after event ")
    assert problem.endswith("status is 'completed', recorded 'failed'")


async def test_an_edited_state_is_named(database: Database) -> None:
    instance_id = await _instance(database, fail=False)
    async with database.transaction() as session:
        state = await session.scalar(
            select(ProcessInstance.state).where(ProcessInstance.id == instance_id)
        )
    assert isinstance(state, dict)
    await _edit(
        database,
        update(ProcessInstance)
        .where(ProcessInstance.id == instance_id)
        .values(state={**state, "edited": True}, version=ProcessInstance.version + 5),
    )
    [problem] = (await _report(database)).record_problems
    assert "state differs from the state recorded" in problem
    assert "version is" in problem and "recorded" in problem


async def test_an_incident_count_edited_apart_from_its_state_is_named(
    database: Database,
) -> None:
    """/metrics and the incident lists go by the count kept beside each state: a count edited
    alone (an incident hidden or invented) is named, as an edited state is."""
    instance_id = await _instance(database, fail=False)
    assert (await _report(database)).record_problems == ()
    await _edit(
        database,
        update(ProcessInstance).where(ProcessInstance.id == instance_id).values(incidents=3),
    )
    [problem] = (await _report(database)).record_problems
    assert f"process instance {instance_id}: its incident count is 3, its state has 0" in problem


async def test_an_edited_task_row_is_named(database: Database) -> None:
    await _instance(database, fail=False)
    await _edit(
        database,
        update(TaskSeen).where(TaskSeen.role == "outgoing").values(status="failed"),
    )
    [problem] = (await _report(database)).record_problems
    assert "(outgoing) was changed after event" in problem
    assert problem.endswith("status is 'failed', recorded 'requested'")


async def test_a_deleted_instance_row_is_named(database: Database) -> None:
    instance_id = await _instance(database, fail=False)
    await _edit(database, delete(TaskSeen))
    await _edit(database, delete(ProcessInstance).where(ProcessInstance.id == instance_id))
    problems = (await _report(database)).record_problems
    assert f"the process_instances row {instance_id} was deleted after event" in problems[0]
    assert len(problems) == 3  # and the two Task rows


async def test_an_edited_record_breaks_the_chain(database: Database) -> None:
    # Editing the record to match an edited row is no way around: the record is chained.
    instance_id = await _instance(database, fail=True)
    async with database.transaction() as session:
        event = (
            await session.scalars(
                select(AuditEvent)
                .where(AuditEvent.record.contains(f"process_instances/{instance_id}"))
                .order_by(AuditEvent.id.desc())
            )
        ).first()
        assert event is not None and event.record is not None
        event.record = event.record.replace('"failed"', '"completed"')
        sequence = event.sequence
    await _edit(
        database,
        update(ProcessInstance).where(ProcessInstance.id == instance_id).values(status="completed"),
    )
    report = await _report(database)
    assert (report.ok, report.first_bad_sequence, report.record_problems) == (False, sequence, ())
    assert (
        report.problem
        == f"event {sequence} was changed after it was written: its hash does not match"
    )


async def test_cli_verify_names_the_edited_instance(database: Database, migrated_url: str) -> None:
    instance_id = await _instance(database, fail=True)
    intact = cli("audit", "verify", "--db-url", migrated_url)
    assert intact.returncode == 0, intact.stderr
    assert "records intact: 2 rows as their last event recorded them" in intact.stdout
    await _edit(
        database,
        update(ProcessInstance).where(ProcessInstance.id == instance_id).values(status="completed"),
    )
    broken = cli("audit", "verify", "--db-url", migrated_url)
    assert broken.returncode == 1
    assert f"audit record BROKEN: process instance {instance_id} was changed" in broken.stderr
    assert "status is 'completed', recorded 'failed'" in broken.stderr


async def test_a_step_committed_while_verify_reads_is_no_edit(
    postgres_database: Database, postgres_url: str
) -> None:
    """PostgreSQL gives each statement of verify its own snapshot: a step that commits after
    the events were read and before the rows are leaves a row newer than the last record
    read. Verify looks again and finds that step's record."""
    instance_id = await _instance(postgres_database, fail=True)
    writer = create_sync_engine(postgres_url)
    stepped: list[bool] = []

    def a_step_commits(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if stepped or "FROM process_instances" not in statement:
            return
        stepped.append(True)
        # What a step writes in one transaction: the row and its event's record of it.
        with writer.begin() as connection:
            row = connection.execute(
                select(ProcessInstance).where(ProcessInstance.id == instance_id)
            ).one()
            connection.execute(
                update(ProcessInstance)
                .where(ProcessInstance.id == instance_id)
                .values(status="cancelled", version=row.version + 1)
            )
            connection.execute(
                insert(AuditEvent).values(
                    occurred_at=dt.datetime.now(dt.UTC),
                    actor="other-replica",
                    subject=f"instance/{instance_id}",
                    action="instance.cancelled",
                    reason="test",
                    record=json.dumps(
                        instance_record(
                            instance_id,
                            process=f"{KEY}|1.0",
                            business_key=row.business_key,
                            status="cancelled",
                            version=row.version + 1,
                            state_digest=digest_payload(row.state),
                        ),
                        sort_keys=True,
                        separators=(",", ":"),
                    ),
                )
            )

    engine = postgres_database.engine.sync_engine
    event.listen(engine, "before_cursor_execute", a_step_commits)
    try:
        report = await _report(postgres_database)
    finally:
        event.remove(engine, "before_cursor_execute", a_step_commits)
        writer.dispose()
    assert stepped == [True]
    assert (report.ok, report.record_problems) == (True, ())
    # And an edit is still one: the same check after a change without a record.
    await _edit(
        postgres_database,
        update(ProcessInstance).where(ProcessInstance.id == instance_id).values(status="failed"),
    )
    [problem] = (await _report(postgres_database)).record_problems
    assert problem.endswith("status is 'failed', recorded 'cancelled'")


async def test_whole_number_floats_set_by_a_handler_verify(database: Database) -> None:
    """PostgreSQL's JSONB gives ``1e16`` back as ``10000000000000000`` and ``-0.0`` as
    ``0.0``: a state digested as written differed from the state read back, and verify named
    an untouched instance whose last step set such a variable."""
    runtime = ProcessRuntime(
        database, FakeGateway(failures=[]), owner="a", clock=Clock(), settings=FAST
    )
    registry = HandlerRegistry()

    @registry.message_send("org.test.Send")
    def send(ctx: SendContext) -> None:
        ctx.throw_on_failure("not-reachable", forbidden="not-allowed")

    @registry.service("org.test.Record")
    def record(ctx: HandlerContext) -> None:  # measurements, as a handler sets them
        ctx.set("volume", 1e16)
        ctx.set("delta", -0.0)
        ctx.set("mean", 1.0)

    definition = load_process(MODEL, "send.bpmn", resource_version="1.0")
    await runtime.deploy(definition, registry, plugin="test", model_hash="h" * 64)
    await runtime.start(
        KEY,
        business_key="bk-1",
        task_id="start-task",
        variables={"target": {"organizationIdentifier": "Site_B"}},
    )
    await runtime.run_until_idle()
    async with database.transaction() as session:
        await seal_events(session)
    report = await _report(database)
    assert (report.ok, report.records, report.record_problems) == (True, 3, ())


async def test_a_state_recorded_with_the_earlier_digest_verifies(database: Database) -> None:
    """Records written before whole-number floats were digested as ints still match."""
    instance_id = await _instance(database, fail=False)
    async with database.transaction() as session:
        row = (
            await session.execute(select(ProcessInstance).where(ProcessInstance.id == instance_id))
        ).scalar_one()
        state = {**dict(row.state), "mean": 1.0}
        row.state = state
        row.version += 1
        await session.flush()
        await session.execute(
            insert(AuditEvent).values(
                occurred_at=dt.datetime.now(dt.UTC),
                actor="earlier-release",
                subject=f"instance/{instance_id}",
                action="instance.stepped",
                reason="test",
                record=json.dumps(
                    instance_record(
                        instance_id,
                        process=f"{KEY}|1.0",
                        business_key=row.business_key,
                        status=row.status,
                        version=row.version,
                        state_digest=digest_payload(state),
                    ),
                    sort_keys=True,
                    separators=(",", ":"),
                ),
            )
        )
    assert state_digest(state) != digest_payload(state)
    report = await _report(database)
    assert (report.ok, report.record_problems) == (True, ())


async def test_more_steps_than_were_looked_at_again_while_verify_reads_are_no_edits(
    postgres_database: Database, postgres_url: str
) -> None:
    """A busy store moves many rows while verify reads the events; each was looked at again
    with a query of its own, the first 200 only, and the rest were named as edits."""
    rows = 250

    def recorded(number: int, status: str) -> str:
        return json.dumps(
            {f"tasks_seen/incoming/t{number}/1": {"instance": None, "status": status}},
            sort_keys=True,
            separators=(",", ":"),
        )

    def event_of(number: int, status: str) -> dict[str, object]:
        return {
            "occurred_at": dt.datetime.now(dt.UTC),
            "actor": "bridge",
            "subject": f"Task/t{number}",
            "action": "task.failed",
            "reason": "test",
            "record": recorded(number, status),
        }

    async with postgres_database.transaction() as session:
        await session.execute(
            insert(TaskSeen),
            [
                {"task_id": f"t{n}", "task_version": "1", "role": "incoming", "status": "claiming"}
                for n in range(rows)
            ],
        )
        await session.execute(insert(AuditEvent), [event_of(n, "claiming") for n in range(rows)])
        await seal_events(session)
    assert (await _report(postgres_database)).ok
    writer = create_sync_engine(postgres_url)
    stepped: list[bool] = []

    def steps_commit(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if stepped or "FROM tasks_seen" not in statement:
            return
        stepped.append(True)
        with writer.begin() as connection:  # each Task's row and its event's record of it
            connection.execute(update(TaskSeen).values(status="failed"))
            connection.execute(insert(AuditEvent), [event_of(n, "failed") for n in range(rows)])

    engine = postgres_database.engine.sync_engine
    event.listen(engine, "before_cursor_execute", steps_commit)
    try:
        report = await _report(postgres_database)
    finally:
        event.remove(engine, "before_cursor_execute", steps_commit)
        writer.dispose()
    assert stepped == [True]
    assert (report.ok, report.records, report.record_problems[:1]) == (True, rows, ())
