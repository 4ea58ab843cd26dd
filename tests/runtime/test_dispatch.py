"""Work a step queues is run right after its commit, not found by a polling round (issue 11),
and drains or is given back as a round's work is when the bridge stops."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt

from sqlalchemy import func, select

from dsf_bridge.runtime.jobs import JobWorker
from dsf_bridge.runtime.processes import ProcessRuntime
from dsf_bridge.store import Database
from dsf_bridge.store import repository as repo
from dsf_bridge.store.kinds import JobKind
from dsf_bridge.store.tables import AuditEvent, Job, OutboxEntry
from tests.runtime.test_shutdown import KEY, SlowWork, _leases, _runtime, _statuses


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
