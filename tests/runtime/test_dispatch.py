"""Work a step queues is run right after its commit, not found by a polling round (issue 11),
and drains or is given back as a round's work is when the bridge stops."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt

import pytest
from sqlalchemy import func, select

from dsf_bridge.engine import load_process
from dsf_bridge.errors import ConcurrencyError
from dsf_bridge.plugins.registry import HandlerContext, HandlerRegistry
from dsf_bridge.runtime.jobs import JobWorker
from dsf_bridge.runtime.processes import ProcessRuntime, RuntimeSettings
from dsf_bridge.store import Database
from dsf_bridge.store import repository as repo
from dsf_bridge.store.kinds import JobKind
from dsf_bridge.store.tables import AuditEvent, Job, OutboxEntry, ProcessInstance
from tests.runtime.test_processes import FakeGateway
from tests.runtime.test_shutdown import KEY, MODEL, SlowWork, _leases, _runtime, _statuses


async def _counted_rounds(runtime: object) -> list[int]:
    rounds = [0]
    run_once = runtime.run_once  # type: ignore[attr-defined]

    async def counting() -> int:
        rounds[0] += 1
        return int(await run_once())

    runtime.run_once = counting  # type: ignore[attr-defined]
    return rounds


async def _first_round(runtime: ProcessRuntime) -> None:
    for _ in range(1000):
        if runtime.heartbeat is not None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the worker loop never finished a round")


async def test_a_step_runs_its_handler_job_and_its_effects_without_a_polling_round(
    database: Database,
) -> None:
    work = SlowWork()
    work.release.set()
    runtime = await _runtime(database, work, owner="dispatching", grace=5)
    runtime.settings = dataclasses.replace(runtime.settings, idle_poll=dt.timedelta(hours=1))
    rounds = await _counted_rounds(runtime)
    stop = asyncio.Event()
    worker = asyncio.create_task(runtime.run_forever(stop))
    await _first_round(runtime)  # it found nothing
    assert rounds == [1]

    await runtime.deliver(
        KEY, message_name="start", business_key="bk-dispatch", task_id="t-1", task_version="2"
    )
    for _ in range(500):
        if await _statuses(database) == ["completed"]:
            break
        await asyncio.sleep(0.01)
    assert await _statuses(database) == ["completed"]
    for _ in range(500):  # the completing PUT follows the commit of the last step
        if runtime.gateway.completed:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.01)
    assert runtime.gateway.completed == ["t-1"]  # type: ignore[attr-defined]
    assert work.runs == 1
    assert rounds == [1]  # nothing woke the loop: the job and the effect ran after the commits
    stop.set()
    await asyncio.wait_for(worker, 10)
    async with database.transaction() as session:
        assert (await session.scalars(select(Job))).all() == []
        entries = (await session.scalars(select(OutboxEntry))).all()
    assert [(entry.kind, entry.status, entry.attempts) for entry in entries] == [
        ("complete-task", "done", 1)
    ]


async def test_a_dispatched_job_drains_within_the_grace_period(database: Database) -> None:
    work = SlowWork()
    runtime = await _runtime(database, work, owner="dispatch-drain", grace=30)
    stop = asyncio.Event()
    worker = asyncio.create_task(runtime.run_forever(stop))
    await _first_round(runtime)
    await runtime.start(KEY, message_name="start", business_key="bk-dispatch-drain")
    await asyncio.wait_for(work.started.wait(), 10)

    stop.set()
    await asyncio.sleep(0.3)
    assert not worker.done()  # draining the dispatched handler, not abandoning it
    work.release.set()
    await asyncio.wait_for(worker, 10)
    assert await _statuses(database) == ["completed"]
    assert await _leases(database) == []


async def test_a_dispatched_job_past_the_grace_is_cancelled_and_given_back(
    database: Database,
) -> None:
    work = SlowWork()
    first = await _runtime(database, work, owner="dispatch-late", grace=0.2)
    stop = asyncio.Event()
    worker = asyncio.create_task(first.run_forever(stop))
    await _first_round(first)
    await first.start(KEY, message_name="start", business_key="bk-dispatch-late")
    await asyncio.wait_for(work.started.wait(), 10)
    assert await _leases(database) == ["dispatch-late"]  # queued leased, never polled for

    stop.set()
    await asyncio.wait_for(worker, 5)
    assert await _leases(database) == [None]  # given back, not left to run out
    work.release.set()
    second = await _runtime(database, work, owner="next", grace=30)
    assert await second.run_until_idle() >= 1
    assert await _statuses(database) == ["completed"]


async def test_dispatched_work_is_bounded_and_the_rest_left_to_the_rounds(
    database: Database,
) -> None:
    """Sixty starts at once run at most ``dispatch_limit`` handlers right after their commits,
    plus a round's ``batch``; all of them complete."""
    work = SlowWork()
    runtime = await _runtime(database, work, owner="bounded", grace=5)
    runtime.settings = dataclasses.replace(runtime.settings, dispatch_limit=5, batch=3)
    runtime._dispatcher.limit = 5
    running: list[int] = []

    stop = asyncio.Event()
    worker = asyncio.create_task(runtime.run_forever(stop))
    await _first_round(runtime)
    for number in range(60):
        await runtime.start(KEY, message_name="start", business_key=f"bk-bound-{number}")
    await asyncio.sleep(0.5)
    running.append(work.runs)
    work.release.set()
    for _ in range(1000):
        if await _statuses(database) == ["completed"] * 60:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(worker, 20)
    assert 0 < running[0] <= 5 + 3, running
    assert await _statuses(database) == ["completed"] * 60


async def test_a_job_that_waited_for_its_instance_renews_its_lease() -> None:
    """A run that queued behind others on its instance renews its lease before it runs, even
    when it arrives in the moment the lock's holder lets go (the lock then looks free)."""
    worker = JobWorker(object())  # type: ignore[arg-type]
    gate = asyncio.Event()
    renewed: list[int] = []

    async def run(job: repo.ClaimedJob) -> None:
        if job.id == 1:
            await gate.wait()

    async def renew(job: repo.ClaimedJob) -> bool:
        renewed.append(job.id)
        return True

    worker.run_or_retry = run  # type: ignore[method-assign]
    worker._renewed = renew  # type: ignore[method-assign]

    def job(number: int) -> repo.ClaimedJob:
        return repo.ClaimedJob(number, "instance-x", JobKind.HANDLER, {}, 1, 3)

    first = asyncio.ensure_future(worker._one_by_one([job(1)]))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(worker._one_by_one([job(2)]))
    await asyncio.sleep(0)
    gate.set()  # the first ends in the next step; the third arrives in that same step
    third = asyncio.ensure_future(worker._one_by_one([job(3)]))
    await asyncio.gather(first, second, third)
    assert renewed == [2, 3]
    assert worker._instances == {}


async def test_events_are_sealed_while_a_round_runs_a_long_job(database: Database) -> None:
    """Sealing runs apart from the rounds: a round waiting for a long handler does not leave
    the audit events of other steps unsealed."""
    work = SlowWork()
    runtime = await _runtime(database, work, owner="sealing", grace=1)
    # Queued before the loop runs: a polling round claims this handler job and waits for it.
    await runtime.start(KEY, message_name="start", business_key="bk-round")
    stop = asyncio.Event()
    worker = asyncio.create_task(runtime.run_forever(stop))
    await asyncio.wait_for(work.started.wait(), 5)
    await runtime.start(KEY, message_name="start", business_key="bk-later")
    unsealed = -1
    for _ in range(100):  # idle_poll is 50 ms here
        async with database.transaction() as session:
            unsealed = int(
                await session.scalar(
                    select(func.count())
                    .select_from(AuditEvent)
                    .where(AuditEvent.sequence.is_(None))
                )
                or 0
            )
        if unsealed == 0:
            break
        await asyncio.sleep(0.05)
    work.release.set()
    stop.set()
    await asyncio.wait_for(worker, 20)
    assert unsealed == 0


async def _working_on(
    runtime: ProcessRuntime, business_key: str
) -> tuple[asyncio.Event, asyncio.Task[None]]:
    """The worker loop running (one round done) and a Task delivered that starts an instance."""
    stop = asyncio.Event()
    worker = asyncio.create_task(runtime.run_forever(stop))
    await _first_round(runtime)
    await runtime.deliver(
        KEY, message_name="start", business_key=business_key, task_id="t-1", task_version="2"
    )
    return stop, worker


async def _completed_then_stopped(
    database: Database, stop: asyncio.Event, worker: asyncio.Task[None]
) -> None:
    """Wait until the one instance completed, then stop the worker loop."""
    for _ in range(500):
        if await _statuses(database) == ["completed"]:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(worker, 10)
    assert await _statuses(database) == ["completed"]


async def test_a_dispatched_handler_job_steps_the_instance_without_reading_it(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit that queued the handler job hands the instance on as it saved it: the job's
    step does not read it again (a round trip of every step, and its whole state)."""
    reads: list[str] = []
    load_instance = repo.load_instance

    async def counted(session: object, instance_id: str) -> repo.InstanceRecord | None:
        reads.append(instance_id)
        return await load_instance(session, instance_id)  # type: ignore[arg-type]

    monkeypatch.setattr(repo, "load_instance", counted)
    work = SlowWork()
    work.release.set()
    runtime = await _runtime(database, work, owner="known", grace=5)
    stop, worker = await _working_on(runtime, "bk-known")
    await _completed_then_stopped(database, stop, worker)
    assert work.runs == 1
    assert reads == []
    async with database.transaction() as session:
        assert (await session.scalars(select(Job))).all() == []


async def test_a_job_whose_instance_moved_on_meanwhile_replays_on_the_instance_as_it_is(
    database: Database,
) -> None:
    """Another step changed the instance while the handler ran: the step on the instance as
    the job's commit left it fails to save, and is replayed on the instance read then. The
    other step's change stays; the handler is not run again."""
    work = SlowWork()
    runtime = await _runtime(database, work, owner="replaying", grace=5)
    stop, worker = await _working_on(runtime, "bk-moved")
    await asyncio.wait_for(work.started.wait(), 10)
    async with database.transaction() as session:
        (instance_id,) = (await session.scalars(select(ProcessInstance.id))).all()
        record = await repo.load_instance(session, instance_id)
        assert record is not None
        state = {**record.state, "vars": {**record.state["vars"], "moved": "meanwhile"}}
        await repo.save_instance(
            session, record, state=state, status=record.status, now=dt.datetime.now(dt.UTC)
        )
    work.release.set()
    await _completed_then_stopped(database, stop, worker)
    assert work.runs == 1
    async with database.transaction() as session:
        final = await repo.load_instance(session, instance_id)
        assert (await session.scalars(select(Job))).all() == []
    assert final is not None
    assert final.state["vars"]["moved"] == "meanwhile"
    assert final.version == record.version + 2  # the change in between, then the job's step


async def test_the_step_that_ends_an_instance_removes_its_job_and_the_others_at_once(
    database: Database,
) -> None:
    """The job whose step ended the instance and the instance's other jobs go in one
    statement; an operator's request stays (it is answered ``operator.refused``), another
    instance's job stays, and a lease lost to another worker undoes it all."""
    now = dt.datetime.now(dt.UTC)
    async with database.transaction() as session:
        definition_id = await repo.deploy_definition(
            session, process_key="p", version="1.0", plugin="test", model_hash="h" * 64
        )
        for instance_id in ("i-1", "i-2"):
            await repo.create_instance(
                session,
                instance_id=instance_id,
                definition_id=definition_id,
                business_key=f"bk-{instance_id}",
                status="running",
                state={},
                now=now,
            )
        ids = {}
        for name, instance_id, kind in (
            ("ours", "i-1", JobKind.HANDLER),
            ("sibling", "i-1", JobKind.HANDLER),
            ("operator", "i-1", JobKind.OPERATOR),
            ("other", "i-2", JobKind.HANDLER),
        ):
            ids[name] = await repo.enqueue_job(
                session, kind=kind, payload={}, due_at=now, instance_id=instance_id
            )
    async with database.transaction() as session:
        claimed = await repo.claim_jobs(
            session, owner="me", now=now, lease=dt.timedelta(minutes=1), limit=10
        )
    assert {job.id for job in claimed} == set(ids.values())

    async def remaining() -> set[int]:
        async with database.transaction() as session:
            return set((await session.scalars(select(Job.id))).all())

    with pytest.raises(ConcurrencyError):
        async with database.transaction() as session:
            await repo.complete_job_ending(session, ids["ours"], "someone-else", "i-1")
    assert await remaining() == set(ids.values())

    async with database.transaction() as session:
        removed = await repo.complete_job_ending(session, ids["ours"], "me", "i-1")
    assert removed == 1
    assert await remaining() == {ids["operator"], ids["other"]}


async def _tampering_runtime(database: Database, calls: list[dict[str, object]]) -> ProcessRuntime:
    registry = HandlerRegistry()

    @registry.service("org.test.Work")
    async def work(ctx: HandlerContext) -> None:
        task = ctx.get("task")
        assert isinstance(task, dict)
        calls.append(dict(task))
        # A handler that changes a variable's value in place and then fails: its changes are
        # rolled back (nothing of it reaches the instance).
        task["tampered"] = len(calls)
        raise RuntimeError("boom")

    settings = RuntimeSettings(
        lease=dt.timedelta(seconds=60),
        idle_poll=dt.timedelta(milliseconds=50),
        shutdown_grace=dt.timedelta(seconds=5),
        job_retry_delay=dt.timedelta(hours=1),
    )
    runtime = ProcessRuntime(database, FakeGateway(), owner="tamper", settings=settings)
    definition = load_process(MODEL.read_bytes(), MODEL.name, resource_version="1.0")
    await runtime.deploy(definition, registry, plugin="test", model_hash="h" * 64)
    return runtime


async def test_a_failed_handlers_in_place_change_does_not_reach_the_instance(
    database: Database,
) -> None:
    """The dispatched job's step must not start from an instance state that shares its
    values with the variables the handler was given: a failing handler's in-place change
    would be saved (and a polling round's run of the same job would not save it)."""
    calls: list[dict[str, object]] = []
    runtime = await _tampering_runtime(database, calls)
    stop = asyncio.Event()
    worker = asyncio.create_task(runtime.run_forever(stop))
    await _first_round(runtime)
    await runtime.deliver(
        KEY,
        message_name="start",
        business_key="bk-tamper",
        task_id="t-1",
        task_version="2",
        variables={"task": {"id": "t-1", "inputs": []}},
    )
    for _ in range(500):
        async with database.transaction() as session:
            instances = await repo.all_instances(session)
        if calls and instances and instances[0].version > 1:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(worker, 10)
    assert len(calls) == 1
    (instance,) = instances
    assert instance.version > 1  # the failed step was written
    task = instance.state["vars"]["task"]
    assert "tampered" not in task
