"""The repository on real SQLite and PostgreSQL: locking, leases, idempotency, cursors."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from sqlalchemy import event, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from dsf_bridge.errors import ConcurrencyError, StoreError, TaskAlreadyDeliveredError
from dsf_bridge.store import Database, queries
from dsf_bridge.store import repository as repo
from dsf_bridge.store.kinds import JobKind, OutboxKind, TaskSeenStatus
from dsf_bridge.store.tables import Job, OutboxEntry, ProcessInstance, TaskSeen

T0 = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
LEASE = dt.timedelta(seconds=30)


async def _definition(database: Database) -> int:
    async with database.transaction() as session:
        return await repo.deploy_definition(
            session, process_key="dsfdev_ping", version="1.0", plugin="ping", model_hash="a" * 64
        )


async def _instance(database: Database, instance_id: str = "i-1") -> repo.InstanceRecord:
    definition_id = await _definition(database)
    async with database.transaction() as session:
        return await repo.create_instance(
            session,
            instance_id=instance_id,
            definition_id=definition_id,
            business_key="bk-1",
            status="running",
            state={"v": 1, "tokens": []},
            now=T0,
        )


@pytest.mark.parametrize("unless_running", [False, True])
async def test_an_instance_created_ended_is_written_with_its_end_and_version(
    database: Database, unless_running: bool
) -> None:
    """A start whose steps in the same transaction ended the instance writes the row once, as
    they left it: ended at the start's time, at the version after those steps."""
    definition_id = await _definition(database)
    async with database.transaction() as session:
        record = await repo.create_instance(
            session,
            instance_id="i-ended",
            definition_id=definition_id,
            business_key="bk-ended",
            status="completed",
            state={"v": 1, "tokens": []},
            now=T0,
            unless_running=unless_running,
            version=3,
        )
        assert record.version == 3
    async with database.transaction() as session:
        row = await session.get(ProcessInstance, "i-ended")
    assert row is not None
    assert (row.status, row.version, row.ended_at, row.created_at) == ("completed", 3, T0, T0)
    running = await _instance(database)
    async with database.transaction() as session:
        row = await session.get(ProcessInstance, running.id)
    assert row is not None and row.ended_at is None and row.version == 1


async def test_redeploy_keeps_the_id_and_updates_the_hash(database: Database) -> None:
    first = await _definition(database)
    async with database.transaction() as session:
        again = await repo.deploy_definition(
            session, process_key="dsfdev_ping", version="1.0", plugin="ping", model_hash="b" * 64
        )
        other = await repo.deploy_definition(
            session, process_key="dsfdev_ping", version="1.1", plugin="ping", model_hash="c" * 64
        )
    assert again == first
    assert other != first


async def test_an_instance_is_not_created_while_one_with_its_business_key_runs(
    database: Database,
) -> None:
    running = await _instance(database)  # "bk-1", running
    async with database.transaction() as session:
        await repo.set_alternative_business_key(session, running.id, "alt-1")
        other_definition = await repo.deploy_definition(
            session, process_key="dsfdev_pong", version="1.0", plugin="ping", model_hash="b" * 64
        )

    async def create(instance_id: str, business_key: str, definition_id: int) -> str:
        async with database.transaction() as session:
            record = await repo.create_instance(
                session,
                instance_id=instance_id,
                definition_id=definition_id,
                business_key=business_key,
                status="running",
                state={"v": 1, "tokens": []},
                now=T0,
                unless_running=True,
            )
            return record.id

    for business_key in ("bk-1", "alt-1"):  # its own and its alternative business key
        with pytest.raises(repo.InstanceRunningError):
            await create("i-2", business_key, running.definition_id)
    assert await create("i-3", "bk-1", other_definition) == "i-3"  # another process
    assert await create("i-4", "bk-2", running.definition_id) == "i-4"
    async with database.transaction() as session:
        await session.execute(
            update(ProcessInstance)
            .where(ProcessInstance.id == running.id)
            .values(status="completed")
        )
    assert await create("i-2", "bk-1", running.definition_id) == "i-2"  # it ended
    async with database.transaction() as session:
        created = await session.scalars(select(ProcessInstance.id).order_by(ProcessInstance.id))
        assert created.all() == ["i-1", "i-2", "i-3", "i-4"]
        again = await repo.load_instance(session, "i-2")
    assert again is not None
    assert (again.business_key, again.status, again.state, again.version) == (
        "bk-1",
        "running",
        {"v": 1, "tokens": []},
        1,
    )


async def test_optimistic_locking_rejects_a_stale_write(database: Database) -> None:
    record = await _instance(database)
    async with database.transaction() as session:
        saved = await repo.save_instance(
            session, record, state={"v": 1, "step": 2}, status="waiting", now=T0
        )
    assert saved.version == 2

    with pytest.raises(ConcurrencyError) as caught:
        async with database.transaction() as session:
            await repo.save_instance(
                session, record, state={"stale": True}, status=TaskSeenStatus.IN_PROGRESS, now=T0
            )
    assert caught.value.retryable

    async with database.transaction() as session:
        loaded = await repo.load_instance(session, "i-1")
    assert loaded is not None
    assert loaded.state == {"v": 1, "step": 2}
    assert (loaded.status, loaded.version) == ("waiting", 2)


async def test_subscriptions_correlate_by_business_and_correlation_key(
    database: Database,
) -> None:
    await _instance(database)
    subs = [
        repo.SubscriptionKey("e1", "pong", "pong", "bk-1", "ck-a"),
        repo.SubscriptionKey("e2", "pong", "pong", "bk-1", "ck-b"),
    ]
    async with database.transaction() as session:
        await repo.replace_subscriptions(session, "i-1", subs)
        by_key = await repo.find_subscriptions(
            session, message_name="pong", business_key="bk-1", correlation_key="ck-b"
        )
        by_business_key = await repo.find_subscriptions(
            session, message_name="pong", business_key="bk-1", correlation_key=None
        )
        wrong = await repo.find_subscriptions(
            session, message_name="pong", business_key="bk-2", correlation_key=None
        )
        await repo.replace_subscriptions(session, "i-1", subs[:1])
        after_replace = await repo.find_subscriptions(
            session, message_name="pong", business_key="bk-1", correlation_key=None
        )
    assert by_key == [("i-1", subs[1])]
    assert [sub.execution_id for _, sub in by_business_key] == ["e1", "e2"]
    assert wrong == []
    assert after_replace == [("i-1", subs[0])]


async def test_due_timers_come_back_in_order_and_time_zone_aware(database: Database) -> None:
    await _instance(database)
    timers = [
        repo.TimerKey("t1", "timeout", T0 + dt.timedelta(minutes=5)),
        repo.TimerKey("t2", "timeout", T0 + dt.timedelta(minutes=1)),
        repo.TimerKey("t3", "timeout", T0 + dt.timedelta(hours=1)),
    ]
    async with database.transaction() as session:
        for timer in timers:
            await repo.add_timer(session, "i-1", timer)
    async with database.transaction() as session:
        due = await repo.due_timers(session, T0 + dt.timedelta(minutes=10))
        assert await repo.next_timer_due(session) == T0 + dt.timedelta(minutes=1)
    assert [timer.timer_id for _, timer in due] == ["t2", "t1"]
    assert due[0][1].due_at == T0 + dt.timedelta(minutes=1)
    assert due[0][1].due_at.tzinfo is not None

    async with database.transaction() as session:
        await repo.cancel_timer(session, "i-1", "t2")
        await repo.cancel_timer(session, "i-1", "t2")  # already gone: no error
        later = await repo.due_timers(session, T0 + dt.timedelta(days=1))
    assert [timer.timer_id for _, timer in later] == ["t1", "t3"]


async def test_job_lease_retry_and_exhaustion(database: Database) -> None:
    async with database.transaction() as session:
        job_id = await repo.enqueue_job(
            session, kind=JobKind.CONTINUE, payload={"element": "a"}, due_at=T0, retries=1
        )
    async with database.transaction() as session:
        claimed = await repo.claim_jobs(session, owner="w1", now=T0, lease=LEASE)
        nothing_for_w2 = await repo.claim_jobs(session, owner="w2", now=T0, lease=LEASE)
    assert [job.id for job in claimed] == [job_id]
    assert claimed[0].attempts == 1
    assert nothing_for_w2 == []

    # The lease expires: another worker takes the job over; the first lost it.
    later = T0 + LEASE + dt.timedelta(seconds=1)
    async with database.transaction() as session:
        taken_over = await repo.claim_jobs(session, owner="w2", now=later, lease=LEASE)
    assert [job.attempts for job in taken_over] == [2]
    with pytest.raises(ConcurrencyError):
        async with database.transaction() as session:
            await repo.complete_job(session, job_id, "w1")

    async with database.transaction() as session:
        left = await repo.retry_job(session, job_id, "w2", error="boom", retry_at=later)
    assert left == 0
    async with database.transaction() as session:
        (again,) = await repo.claim_jobs(session, owner="w2", now=later, lease=LEASE)
        assert await repo.retry_job(session, again.id, "w2", error="boom", retry_at=later) == -1
    async with database.transaction() as session:
        assert await repo.claim_jobs(session, owner="w2", now=later, lease=LEASE) == []


async def test_completed_job_is_gone(database: Database) -> None:
    async with database.transaction() as session:
        job_id = await repo.enqueue_job(session, kind=JobKind.HANDLER, payload={}, due_at=T0)
    async with database.transaction() as session:
        await repo.claim_jobs(session, owner="w1", now=T0, lease=LEASE)
        await repo.complete_job(session, job_id, "w1")
    async with database.transaction() as session:
        later = T0 + dt.timedelta(hours=1)
        assert await repo.claim_jobs(session, owner="w1", now=later, lease=LEASE) == []


async def test_task_seen_is_idempotent(database: Database) -> None:
    async with database.transaction() as session:
        first = await repo.record_task_seen(
            session,
            task_id="t1",
            task_version="1",
            role="incoming",
            status=TaskSeenStatus.REQUESTED,
        )
        again = await repo.record_task_seen(
            session,
            task_id="t1",
            task_version="1",
            role="incoming",
            status=TaskSeenStatus.REQUESTED,
        )
        newer = await repo.record_task_seen(
            session,
            task_id="t1",
            task_version="2",
            role="incoming",
            status=TaskSeenStatus.IN_PROGRESS,
        )
    assert (first, again, newer) == (True, False, True)


async def test_taking_in_a_task_marks_its_claim_and_is_refused_the_second_time(
    database: Database,
) -> None:
    instance = await _instance(database)
    async with database.transaction() as session:
        await repo.record_task_seen(
            session, task_id="t1", task_version="3", role="incoming", status=TaskSeenStatus.CLAIMING
        )
    claimed = await _seen(database, "t1")
    async with database.transaction() as session:
        await repo.take_in_task(
            session, task_id="t1", task_version="4", claimed_version="3", instance_id="i-1"
        )
    rows = await _seen(database, "t1")
    assert rows == {
        "3": (TaskSeenStatus.TAKEN_IN, "i-1", claimed["3"][2]),  # when it was claimed
        "4": (TaskSeenStatus.IN_PROGRESS, "i-1", rows["4"][2]),
    }
    # Taken in again (another claim of an older version): the whole transaction is refused,
    # on PostgreSQL at its commit, and what it wrote before is rolled back with it.
    async with database.transaction() as session:
        await repo.record_task_seen(
            session, task_id="t1", task_version="2", role="incoming", status=TaskSeenStatus.CLAIMING
        )

    async def again() -> None:
        async with database.transaction() as session:
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

    with pytest.raises(TaskAlreadyDeliveredError, match="Task/t1 version 4 was delivered"):
        await again()
    assert await _seen(database, "t9") == {}
    after = await _seen(database, "t1")
    assert after["2"][:2] == (TaskSeenStatus.CLAIMING, None)
    assert (after["3"], after["4"]) == (rows["3"], rows["4"])
    # Another table's duplicate key is a store error as ever, not a Task delivered already.

    async def duplicate_instance() -> None:
        async with database.transaction() as session:
            await repo.take_in_task(
                session, task_id="t5", task_version="2", claimed_version="1", instance_id="i-1"
            )
            await repo.create_instance(
                session,
                instance_id="i-1",
                definition_id=instance.definition_id,
                business_key="bk-2",
                status="running",
                state={"v": 1, "tokens": []},
                now=T0,
            )

    with pytest.raises(StoreError) as refused:
        await duplicate_instance()
    assert not isinstance(refused.value, TaskAlreadyDeliveredError)
    assert await _seen(database, "t5") == {}
    # The claimed version itself taken in: refused when recorded, else recorded and marked.
    with pytest.raises(TaskAlreadyDeliveredError):
        async with database.transaction() as session:
            await repo.take_in_task(
                session, task_id="t1", task_version="3", claimed_version="3", instance_id="i-1"
            )
    async with database.transaction() as session:
        await repo.take_in_task(
            session, task_id="t2", task_version="1", claimed_version="1", instance_id="i-1"
        )
        await repo.take_in_task(
            session, task_id="t3", task_version="2", claimed_version=None, instance_id="i-1"
        )
    assert (await _seen(database, "t2"))["1"][:2] == (TaskSeenStatus.TAKEN_IN, "i-1")
    assert list(await _seen(database, "t3")) == ["2"]
    assert (await _seen(database, "t3"))["2"][:2] == (TaskSeenStatus.IN_PROGRESS, "i-1")


async def _seen(database: Database, task_id: str) -> dict[str, tuple[object, ...]]:
    async with database.transaction() as session:
        rows = await session.execute(
            select(
                TaskSeen.task_version, TaskSeen.status, TaskSeen.instance_id, TaskSeen.seen_at
            ).where(TaskSeen.task_id == task_id)
        )
        return {row[0]: tuple(row[1:]) for row in rows}


async def test_tasks_of_an_instance_by_role(database: Database) -> None:
    await _instance(database)
    async with database.transaction() as session:
        for task_id, version, role in (
            ("a", "1", "incoming"),
            ("a", "2", "incoming"),
            ("b", "1", "outgoing"),
            ("c", "1", "incoming"),
        ):
            await repo.record_task_seen(
                session,
                task_id=task_id,
                task_version=version,
                role=role,
                status=TaskSeenStatus.IN_PROGRESS,
                instance_id="i-1",
            )
        incoming = await repo.tasks_of_instance(session, "i-1", "incoming")
        outgoing = await repo.tasks_of_instance(session, "i-1", "outgoing")
    assert incoming == ["a", "c"]
    assert outgoing == ["b"]


async def test_outbox_enqueues_once_and_is_claimed_once(database: Database) -> None:
    async with database.transaction() as session:
        assert await repo.enqueue_outbox(
            session,
            idempotency_key="send:bk-1:pong",
            kind=OutboxKind.SEND_TASK,
            payload={"a": 1},
            now=T0,
        )
        assert not await repo.enqueue_outbox(
            session,
            idempotency_key="send:bk-1:pong",
            kind=OutboxKind.SEND_TASK,
            payload={"a": 2},
            now=T0,
        )
    async with database.transaction() as session:
        (entry,) = await repo.claim_outbox(session, owner="w1", now=T0, lease=LEASE)
    assert entry.payload == {"a": 1}

    async with database.transaction() as session:
        await repo.retry_outbox(
            session, entry.idempotency_key, "w1", error="503", retry_at=T0 + dt.timedelta(seconds=5)
        )
    async with database.transaction() as session:
        assert await repo.claim_outbox(session, owner="w1", now=T0, lease=LEASE) == []
        (retry,) = await repo.claim_outbox(
            session, owner="w1", now=T0 + dt.timedelta(seconds=5), lease=LEASE
        )
        assert retry.attempts == 2
        await repo.mark_outbox_done(
            session, retry.idempotency_key, "w1", result="Task/42/_history/1", now=T0
        )
    async with database.transaction() as session:
        later = T0 + dt.timedelta(hours=1)
        assert await repo.claim_outbox(session, owner="w1", now=later, lease=LEASE) == []
        with pytest.raises(ConcurrencyError):
            await repo.mark_outbox_failed(
                session, retry.idempotency_key, "w1", error="x", now=later
            )


async def test_cursor_only_moves_forward_and_keeps_the_time_zone(database: Database) -> None:
    cet = dt.timezone(dt.timedelta(hours=1))
    async with database.transaction() as session:
        assert await repo.get_cursor(session, "Task") is None
        first = await repo.advance_cursor(
            session, "Task", dt.datetime(2026, 11, 23, 13, 0, 0, 123000, tzinfo=cet)
        )
        older = await repo.advance_cursor(session, "Task", T0 - dt.timedelta(days=1))
        newer = await repo.advance_cursor(session, "Task", T0 + dt.timedelta(seconds=1))
    assert first == T0 + dt.timedelta(microseconds=123000)
    assert older == first
    assert newer == T0 + dt.timedelta(seconds=1)
    assert newer.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize("migrated_url", ["postgresql"], indirect=True)
async def test_concurrent_claims_never_share_work(database: Database) -> None:
    """Two replicas claiming at once on PostgreSQL get disjoint jobs (SKIP LOCKED)."""
    async with database.transaction() as session:
        for number in range(20):
            await repo.enqueue_job(session, kind=JobKind.HANDLER, payload={"n": number}, due_at=T0)

    async def worker(owner: str) -> list[int]:
        async with database.transaction() as session:
            jobs = await repo.claim_jobs(session, owner=owner, now=T0, lease=LEASE, limit=15)
            await asyncio.sleep(0.2)  # hold the row locks while the other worker claims
            return [job.id for job in jobs]

    first, second = await asyncio.gather(worker("a"), worker("b"))
    assert set(first).isdisjoint(second)
    assert len(first) + len(second) == 20


async def test_a_task_sent_to_the_own_site_is_both_sent_and_taken_in(database: Database) -> None:
    async with database.transaction() as session:
        sent = await repo.record_task_seen(
            session,
            task_id="t-self",
            task_version="1",
            role="outgoing",
            status=TaskSeenStatus.REQUESTED,
        )
        assert await repo.get_task_seen(session, "t-self", "1") is None  # not taken in yet
        taken = await repo.record_task_seen(
            session,
            task_id="t-self",
            task_version="1",
            role="incoming",
            status=TaskSeenStatus.CLAIMING,
        )
        incoming = await repo.get_task_seen(session, "t-self", "1")
        outgoing = await repo.get_task_seen(session, "t-self", "1", role="outgoing")
    assert (sent, taken) == (True, True)
    assert incoming is not None
    assert incoming.status == "claiming"
    assert outgoing is not None
    assert outgoing.status == "requested"


async def test_sends_in_flight_leaves_out_dead_jobs_and_ended_instances(
    database: Database,
) -> None:
    """A reply is held while its instance has a send in flight; a send job out of retries is
    never run again, and an ended instance sends nothing: neither may hold a reply forever."""
    await _instance(database)
    async with database.transaction() as session:
        job_id = await repo.enqueue_job(
            session, kind=JobKind.SEND, payload={}, due_at=T0, instance_id="i-1", retries=0
        )
        assert await repo.sends_in_flight(session, "bk-1") == 1
        assert await repo.sends_in_flight(session, "bk-other") == 0
    async with database.transaction() as session:
        await session.execute(update(Job).where(Job.id == job_id).values(retries_left=-1))
        assert await repo.sends_in_flight(session, "bk-1") == 0
        await session.execute(update(Job).where(Job.id == job_id).values(retries_left=0))
        await session.execute(
            update(ProcessInstance).where(ProcessInstance.id == "i-1").values(status="failed")
        )
        assert await repo.sends_in_flight(session, "bk-1") == 0


async def test_kinds_and_statuses_pass_one_codec(database: Database) -> None:
    """Job kinds, outbox kinds and Task-seen statuses are written as their text and read back
    as enum members; a misspelt value is refused where it is written, and a value this release
    does not know (a newer release wrote it) is an error naming the enum where it is read."""
    async with database.transaction() as session:
        job_id = await repo.enqueue_job(session, kind=JobKind.SIGNAL, payload={}, due_at=T0)
    async with database.transaction() as session:
        [claimed] = await repo.claim_jobs(
            session, owner="w", now=T0, lease=dt.timedelta(seconds=30)
        )
        raw = await session.scalar(text("SELECT kind FROM jobs WHERE id = :id"), {"id": job_id})
    assert claimed.kind is JobKind.SIGNAL
    assert raw == "signal"

    with pytest.raises(StoreError, match="'sgnal' is not a valid JobKind"):
        async with database.transaction() as session:
            await repo.enqueue_job(session, kind="sgnal", payload={}, due_at=T0)  # type: ignore[arg-type]

    async with database.transaction() as session:
        await session.execute(
            text("UPDATE jobs SET kind = 'teleport', lease_expires_at = NULL WHERE id = :id"),
            {"id": job_id},
        )
    # A worker leaves such a row alone (a newer release may run it) and claims the others.
    async with database.transaction() as session:
        other = await repo.enqueue_job(session, kind=JobKind.HANDLER, payload={}, due_at=T0)
    async with database.transaction() as session:
        claimed_now = await repo.claim_jobs(
            session, owner="w", now=T0, lease=dt.timedelta(seconds=30)
        )
    assert [job.id for job in claimed_now] == [other]
    # Read anyway (the API's view of the instance), it is an error naming the enum.
    with pytest.raises(StoreError, match="'teleport' is no JobKind this release knows"):
        async with database.transaction() as session:
            await session.get(Job, job_id)


class _Statements:
    """The statements a block runs on ``database``, with their parameters."""

    def __init__(self, database: Database) -> None:
        self.engine = database.engine.sync_engine
        self.executed: list[tuple[str, object]] = []

    def _record(
        self, _c: object, _cur: object, statement: str, parameters: object, *_: object
    ) -> None:
        self.executed.append((statement, parameters))

    def __enter__(self) -> list[tuple[str, object]]:
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self.executed

    def __exit__(self, *_: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)


async def _plans(
    database: Database, statements: list[tuple[str, object]]
) -> list[tuple[str, list[str]]]:
    """The database's own plan (``EXPLAIN``) of each statement, one line per plan step."""
    explain = "EXPLAIN QUERY PLAN " if database.dialect == "sqlite" else "EXPLAIN "
    plans = []
    async with database.transaction() as session:
        connection = await session.connection()
        for statement, parameters in statements:
            plan = await connection.exec_driver_sql(explain + statement, parameters)  # type: ignore[arg-type]
            plans.append((statement, [str(row[-1]) for row in plan]))
    return plans


@pytest.mark.parametrize("statistics", [False, True], ids=["no-statistics", "analyzed"])
async def test_looking_up_running_instances_by_key_reads_only_the_key_indexes(
    database: Database, statistics: bool
) -> None:
    """Every Task asks whether a running instance has its business key (starting one, a reply,
    a send in flight): with many instances waiting, the answer must come from the key columns'
    indexes, not from reading every running instance. Checked with the databases' own plans
    (``EXPLAIN``) of the statements the repository runs, with ANALYZE statistics and without
    (SQLite's default: nothing runs ANALYZE), while no instance has an alternative business
    key (the common case)."""
    async with database.transaction() as session:  # partial (migration 0007): NULLs left out
        definition = (
            "SELECT sql FROM sqlite_master WHERE name = :name"
            if database.dialect == "sqlite"
            else "SELECT indexdef FROM pg_indexes WHERE indexname = :name"
        )
        found = await session.execute(
            text(definition), {"name": "ix_process_instances_alternative_business_key"}
        )
        assert "alternative_business_key IS NOT NULL" in found.scalar_one()
    running = await _instance(database)
    definition_id = running.definition_id
    async with database.transaction() as session:
        rows = [
            {
                "id": f"w-{n}",
                "definition_id": definition_id,
                "business_key": f"bk-w-{n}",
                # Running, then as many completed; a waiting instance's state is about 1 KB.
                "status": "running" if 0 < n < 25_000 else "completed",
                "state": {"v": 1, "tk": {"1": {"p": "w"}}, "vars": {"note": "x" * 900}},
                "version": 1,
                "created_at": T0,
                "updated_at": T0,
            }
            for n in range(50_000)
        ]
        await session.execute(insert(ProcessInstance), rows)
        await repo.enqueue_job(
            session, kind=JobKind.SEND, payload={}, due_at=T0, instance_id=running.id, retries=0
        )
        # A backlog of sends (a target site down): the lookup must not read it all.
        backlog = [
            {
                "idempotency_key": f"send-{n}",
                "instance_id": f"w-{n}",
                "kind": OutboxKind.SEND_TASK,
                "payload": {},
                "status": "pending",
                "next_attempt_at": T0,
                "created_at": T0,
            }
            for n in range(1, 20_000, 4)
        ]
        await session.execute(insert(OutboxEntry), backlog)
        await repo.enqueue_outbox(
            session,
            idempotency_key="send-running",
            kind=OutboxKind.SEND_TASK,
            payload={},
            instance_id=running.id,
            now=T0,
        )
    if statistics:
        async with database.autocommit() as session:
            await session.execute(text("ANALYZE"))

    async def refused_start(session: AsyncSession, key: str) -> None:
        with pytest.raises(repo.InstanceRunningError):
            await repo.create_instance(
                session,
                instance_id="i-2",
                definition_id=definition_id,
                business_key=key,
                status="running",
                state={"v": 1, "tokens": []},
                now=T0,
                unless_running=True,
            )

    async def ask(session: AsyncSession, key: str, *, running: bool, sends: int) -> None:
        assert await repo.running_with_business_key(session, definition_id, key) is running
        assert await repo.any_running_with_business_key(session, key) is running
        assert await repo.sends_in_flight(session, key) == sends

    with _Statements(database) as executed:
        async with database.transaction() as session:
            await ask(session, "bk-1", running=True, sends=2)  # a job and an outbox entry
            await ask(session, "bk-w-0", running=False, sends=0)  # completed
            await ask(session, "bk-w-1", running=True, sends=1)
            await ask(session, "bk-w-2", running=True, sends=0)
            await refused_start(session, "bk-1")

    by_key = [
        (s, p)
        for s, p in executed
        if ("business_key" in s and "process_instances" in s) or "FROM outbox" in s
    ]
    # per key: running_with, any_running, the sends' instances, their count (when running);
    # the insert
    assert len(by_key) == 4 + 3 + 4 + 4 + 1
    for statement, lines in await _plans(database, by_key):
        assert any("process_instances" in line or "outbox" in line for line in lines), lines
        # Instances and outbox entries (which grow with the history and with a backlog) read
        # by an index on the key or the instance's id; jobs hold only pending work.
        for line in lines:
            assert "ix_process_instances_status" not in line, (statement, lines)
            assert "ix_outbox_pending" not in line, (statement, lines)
            if "process_instances" in line or "outbox" in line:
                assert not line.startswith("SCAN "), (statement, lines)
                assert "Seq Scan" not in line, (statement, lines)

    # The alternative business key answers as the own one does.
    async with database.transaction() as session:
        await repo.set_alternative_business_key(session, running.id, "alt-1")
    async with database.transaction() as session:
        await ask(session, "alt-1", running=True, sends=2)
        await refused_start(session, "alt-1")


@pytest.mark.parametrize("statistics", [False, True], ids=["no-statistics", "analyzed"])
async def test_unfinished_claims_and_the_counts_read_indexes_not_tables(
    database: Database, statistics: bool
) -> None:
    """Start-up recovery and the 30-second sweep of held replies read the unfinished claims
    through an index, not every Task version ever seen; on SQLite, where /metrics's counts run
    beside the bridge on the same file, the counts by status read indexes alone, not the rows
    (PostgreSQL picks its own way to aggregate a whole table)."""
    definition_id = await _definition(database)
    seen = [
        {
            "task_id": f"t-{n}",
            "task_version": "1",
            "role": "incoming",
            "status": TaskSeenStatus.TAKEN_IN,
            "instance_id": None,
            "seen_at": T0,
        }
        for n in range(20_000)
    ]
    for n, status in enumerate((TaskSeenStatus.HELD, TaskSeenStatus.CLAIMING) * 2):
        seen[n * 1000]["status"] = status
        seen[n * 1000]["seen_at"] = T0 - dt.timedelta(minutes=n)
    instances = [
        {
            "id": f"w-{n}",
            "definition_id": definition_id,
            "business_key": f"bk-w-{n}",
            "status": "running" if n % 10 == 0 else "completed",
            "state": {"v": 1, "tk": {}},
            "incidents": {10: 2, 20: 1, 11: 5}.get(n, 0),  # 11 has ended: not open
            "version": 1,
            "created_at": T0,
            "updated_at": T0,
        }
        for n in range(5_000)
    ]
    async with database.transaction() as session:
        await session.execute(insert(TaskSeen), seen)
        await session.execute(insert(ProcessInstance), instances)
    if statistics:
        async with database.autocommit() as session:
            await session.execute(text("ANALYZE"))
    with _Statements(database) as executed:
        async with database.transaction() as session:
            held = await repo.tasks_with_status(session, "incoming", TaskSeenStatus.HELD)
            claiming = await repo.tasks_with_status(session, "incoming", TaskSeenStatus.CLAIMING)
            refused = await repo.tasks_with_status(session, "incoming", TaskSeenStatus.REFUSED)
    assert [row.task_id for row in held] == ["t-2000", "t-0"]  # oldest first
    assert [row.task_id for row in claiming] == ["t-3000", "t-1000"]
    assert refused == []
    reads = [(sql, parameters) for sql, parameters in executed if sql.startswith("SELECT")]
    assert len(reads) == 3
    for statement, lines in await _plans(database, reads):
        assert any("ix_tasks_seen_role_status" in line for line in lines), (statement, lines)
        assert not any(line.startswith("SCAN tasks_seen") for line in lines), (statement, lines)
        assert not any("Seq Scan on tasks_seen" in line for line in lines), (statement, lines)

    with _Statements(database) as executed:
        async with database.transaction() as session:
            counts = await queries.count_store(session, T0)
    assert counts.tasks == {
        ("incoming", "started"): 19_996,
        ("incoming", "held"): 2,
        ("incoming", "claiming"): 2,
    }
    assert counts.incidents == {"dsfdev_ping": 3}
    assert counts.instances == {("dsfdev_ping", "running"): 500, ("dsfdev_ping", "completed"): 4500}
    if database.dialect != "sqlite":
        return
    whole = [
        (sql, parameters)
        for sql, parameters in executed
        if "GROUP BY" in sql and ("FROM tasks_seen" in sql or "FROM process_instances" in sql)
    ]
    assert len(whole) == 3  # instances and incidents, Task versions
    for statement, lines in await _plans(database, whole):
        steps = [line for line in lines if line.startswith(("SCAN", "SEARCH"))]
        assert steps, (statement, lines)
        assert all("COVERING INDEX" in line for line in steps), (statement, lines)


@pytest.mark.parametrize("statistics", [False, True], ids=["no-statistics", "analyzed"])
async def test_the_admin_pages_read_the_newest_rows_from_an_index_not_a_sort(
    database: Database, statistics: bool
) -> None:
    """The admin API's pages of instances and of Task versions, newest first, the first page
    and the next: each reads its rows from the top of an index (migration 0009), never sorts
    every instance or every Task version ever seen; and the pages are right."""
    definition_id = await _definition(database)
    count = 20_000
    async with database.transaction() as session:
        await session.execute(
            insert(ProcessInstance),
            [
                {
                    "id": f"w-{n:05}",
                    "definition_id": definition_id,
                    "business_key": f"bk-{n}",
                    # The 20 oldest failed; three running ones with an incident.
                    "status": "failed" if n < 20 else "running" if n % 10 == 0 else "completed",
                    "state": {"v": 1, "tk": {}},
                    "incidents": 1 if n in (100, 5000, 15000) else 0,
                    "version": 1,
                    # Pairs created at the same moment: the id orders them.
                    "created_at": T0 + dt.timedelta(seconds=n // 2),
                    "updated_at": T0,
                }
                for n in range(count)
            ],
        )
        await session.execute(
            insert(TaskSeen),
            [
                {
                    "task_id": f"t-{n:05}",
                    "task_version": "1",
                    "role": "outgoing" if n < 20 else "incoming",  # the 20 oldest: sent
                    "status": TaskSeenStatus.TAKEN_IN,
                    "instance_id": f"w-{n:05}",
                    "seen_at": T0 + dt.timedelta(seconds=n // 2),
                }
                for n in range(count)
            ],
        )
    if statistics:
        async with database.autocommit() as session:
            await session.execute(text("ANALYZE"))
    with _Statements(database) as executed:
        async with database.transaction() as session:
            first = await queries.list_instances(session, limit=3)
            second = await queries.list_instances(session, before=first[-1].id, limit=3)
            tasks = await queries.list_tasks(session, limit=3)
            older = await queries.list_tasks(
                session, before=queries.task_cursor(tasks[-1]), limit=3
            )
    assert [i.id for i in first + second] == [f"w-{n:05}" for n in range(count - 1, count - 7, -1)]
    # Same moment: by id, ascending, as the keyset cursor reads them.
    expected = [f"t-{n:05}" for n in (19_998, 19_999, 19_996, 19_997, 19_994, 19_995)]
    assert [t.task_id for t in tasks + older] == expected
    pages = [
        (sql, parameters)
        for sql, parameters in executed
        if "ORDER BY" in sql and ("FROM process_instances" in sql or "FROM tasks_seen" in sql)
    ]
    assert len(pages) == 4
    for statement, lines in await _plans(database, pages):
        table = "process_instances" if "FROM process_instances" in statement else "tasks_seen"
        index = (
            "ix_process_instances_created"
            if table == "process_instances"
            else ("ix_tasks_seen_seen_at")
        )
        assert any(index in line for line in lines), (statement, lines)
        # No sort of the whole table: SQLite may sort the rows of one moment (the right
        # part of the ORDER BY), PostgreSQL likewise (an incremental sort).
        assert not any(line.endswith("USE TEMP B-TREE FOR ORDER BY") for line in lines), lines
        assert not any(f"Seq Scan on {table}" in line for line in lines), (statement, lines)
        assert not any(line.strip().startswith("->  Sort ") for line in lines), lines

    # Filtered, and the incidents: the filter's index finds the few rows, which are sorted;
    # with statistics SQLite walked the whole time index instead (12 to 24 ms with 100,000).
    with _Statements(database) as executed:
        async with database.transaction() as session:
            failed = await queries.list_instances(session, status="failed", limit=3)
            failed += await queries.list_instances(
                session, status="failed", before=failed[-1].id, limit=3
            )
            sent = await queries.list_tasks(session, role="outgoing", limit=3)
            sent += await queries.list_tasks(
                session, role="outgoing", before=queries.task_cursor(sent[-1]), limit=3
            )
            incidents = await repo.states_with_incidents(session)
    assert [i.id for i in failed] == [f"w-{n:05}" for n in range(19, 13, -1)]
    assert [t.task_id for t in sent] == [f"t-{n:05}" for n in (18, 19, 16, 17, 14, 15)]
    assert [i for i, _key, _state in incidents] == ["w-00100", "w-05000", "w-15000"]
    filtered = [
        (sql, parameters)
        for sql, parameters in executed
        if "ORDER BY" in sql and ("FROM process_instances" in sql or "FROM tasks_seen" in sql)
    ]
    assert len(filtered) == 5
    if database.dialect != "sqlite":
        return  # PostgreSQL weighs both ways by its estimates, and chose well here
    for statement, lines in await _plans(database, filtered):
        index = "ix_process_instances" if "FROM process_instances" in statement else "ix_tasks_seen"
        assert any(f"SEARCH {index.removeprefix('ix_')}" in line for line in lines), lines
        assert not any("ix_process_instances_created" in line for line in lines), lines
        assert not any("ix_tasks_seen_seen_at" in line for line in lines), lines


@pytest.mark.parametrize("statistics", [False, True], ids=["plain", "analyzed"])
async def test_a_process_load_reads_the_latest_completed_instances_from_an_index(
    database: Database, statistics: bool
) -> None:
    """An OMI provider's heartbeat (``queries.process_load``): the running instances, and the
    latest completed ones over every deployed version, newest end first, each version's read
    from the top of ``ix_process_instances_completed`` (migration 0010), never sorted from the
    whole history; failed ones and other processes do not count."""
    async with database.transaction() as session:
        versions = [
            await repo.deploy_definition(
                session, process_key="omi_exec", version=v, plugin="omi", model_hash=v * 64
            )
            for v in ("1", "2")
        ]
        other = await repo.deploy_definition(
            session, process_key="other", version="1", plugin="o", model_hash="o" * 64
        )
    count = 6_000
    rows: list[dict[str, Any]] = []
    for n in range(count):
        ended = T0 + dt.timedelta(seconds=n)
        rows.append(
            {
                "id": f"e-{n:05}",
                # Both versions' instances interleaved; a few of another process, failed and
                # running ones among them.
                "definition_id": other if n % 7 == 0 else versions[n % 2],
                "business_key": f"bk-{n}",
                "status": "running" if n % 11 == 0 else "failed" if n % 13 == 0 else "completed",
                "state": {"v": 1, "tk": {}},
                "version": 1,
                "created_at": ended - dt.timedelta(seconds=n % 5),
                "updated_at": ended,
                "ended_at": None if n % 11 == 0 else ended,
            }
        )
    async with database.transaction() as session:
        await session.execute(insert(ProcessInstance), rows)
    if statistics:
        async with database.autocommit() as session:
            await session.execute(text("ANALYZE"))
    with _Statements(database) as executed:
        async with database.transaction() as session:
            load = await queries.process_load(session, "omi_exec", recent=5)
    expected = [
        row
        for row in reversed(rows)
        if row["definition_id"] != other and row["status"] == "completed"
    ][:5]
    assert load.recent_durations == tuple(
        float((row["ended_at"] - row["created_at"]).total_seconds()) for row in expected
    )
    assert load.running == sum(
        1 for row in rows if row["definition_id"] != other and row["status"] == "running"
    )
    latest = [(sql, parameters) for sql, parameters in executed if "ORDER BY" in sql]
    assert len(latest) == 2  # one per deployed version
    for statement, lines in await _plans(database, latest):
        assert any("ix_process_instances_completed" in line for line in lines), lines
        assert not any("TEMP B-TREE" in line for line in lines), lines
        assert not any(line.strip().startswith("->  Sort") for line in lines), lines
        assert not any("Seq Scan" in line for line in lines), (statement, lines)


async def test_task_facts_find_a_completion_queued_under_the_key_before_it_named_the_instance(
    database: Database,
) -> None:
    """Entries queued before the key named the instance (``complete:TASK``) still say how the
    bridge ended their Task."""
    async with database.transaction() as session:
        await repo.enqueue_outbox(
            session,
            idempotency_key="complete:t-old",
            kind=OutboxKind.COMPLETE_TASK,
            payload={"task_id": "t-old", "outputs": []},
            now=T0,
        )
        await repo.enqueue_outbox(  # another Task's, not asked for
            session,
            idempotency_key="fail:t-other",
            kind=OutboxKind.FAIL_TASK,
            payload={"task_id": "t-other", "outputs": [], "error": "x"},
            now=T0,
        )
        row = queries.TaskRow("t-old", "1", "incoming", TaskSeenStatus.IN_PROGRESS, None, T0)
        facts = await queries.task_facts(session, [row])
    assert (
        facts[("t-old", "incoming")].status_source
        == "set in-progress by the bridge; completed pending"
    )
