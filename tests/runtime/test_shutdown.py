"""A stopping worker in temporal's style: no new round, the running one drains within the grace
period, then every lease is given back (on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dsf_bridge.engine import load_process
from dsf_bridge.errors import StoreError
from dsf_bridge.plugins.registry import HandlerContext, HandlerRegistry
from dsf_bridge.runtime.daemon import Bridge
from dsf_bridge.runtime.processes import ProcessRuntime, RuntimeSettings
from dsf_bridge.store import Database
from dsf_bridge.store import repository as repo
from dsf_bridge.store.tables import Job, ProcessInstance
from tests.runtime.test_processes import FakeGateway

MODEL = Path(__file__).with_name("one_step.bpmn")
KEY = "testorg_oneStep"


class SlowWork:
    """The service task's handler: it starts, then waits until released."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.runs = 0

    def registry(self) -> HandlerRegistry:
        registry = HandlerRegistry()

        @registry.service("org.test.Work")
        async def work(ctx: HandlerContext) -> None:
            self.runs += 1
            self.started.set()
            await self.release.wait()

        return registry


async def _runtime(
    database: Database, work: SlowWork, owner: str, grace: float, lease: float = 60
) -> ProcessRuntime:
    settings = RuntimeSettings(
        lease=dt.timedelta(seconds=lease),
        idle_poll=dt.timedelta(milliseconds=50),
        shutdown_grace=dt.timedelta(seconds=grace),
    )
    runtime = ProcessRuntime(database, FakeGateway(), owner=owner, settings=settings)
    definition = load_process(MODEL.read_bytes(), MODEL.name, resource_version="1.0")
    await runtime.deploy(definition, work.registry(), plugin="test", model_hash="h" * 64)
    return runtime


async def _leases(database: Database) -> list[str | None]:
    async with database.transaction() as session:
        return list((await session.scalars(select(Job.lease_owner))).all())


async def _statuses(database: Database) -> list[str]:
    async with database.transaction() as session:
        return list((await session.scalars(select(ProcessInstance.status))).all())


async def test_a_running_job_finishes_within_the_grace_period(database: Database) -> None:
    work = SlowWork()
    runtime = await _runtime(database, work, owner="stopping", grace=30)
    await runtime.start(KEY, message_name="start", business_key="bk-drain")
    stop = asyncio.Event()
    worker = asyncio.create_task(runtime.run_forever(stop))
    await asyncio.wait_for(work.started.wait(), 10)

    stop.set()
    await asyncio.sleep(0.3)
    assert not worker.done()  # draining, not abandoning the handler
    work.release.set()
    await asyncio.wait_for(worker, 10)

    assert await _statuses(database) == ["completed"]
    assert await _leases(database) == []
    assert work.runs == 1


async def test_past_the_grace_period_the_job_is_cancelled_and_its_lease_given_back(
    database: Database,
) -> None:
    work = SlowWork()
    first = await _runtime(database, work, owner="stopping", grace=0.2)
    await first.start(KEY, message_name="start", business_key="bk-abandon")
    stop = asyncio.Event()
    worker = asyncio.create_task(first.run_forever(stop))
    await asyncio.wait_for(work.started.wait(), 10)

    stop.set()
    await asyncio.wait_for(worker, 5)  # returns soon after the grace, never hangs
    assert await _leases(database) == [None]  # the job is there, held by nobody
    assert await _statuses(database) == ["running"]

    # Another bridge takes the job at once: without the release it would wait 60 s.
    work.release.set()
    second = await _runtime(database, work, owner="next", grace=30)
    assert await second.run_until_idle() >= 1
    assert await _statuses(database) == ["completed"]
    assert work.runs == 2  # at least once: the cancelled run is repeated


async def test_without_a_release_the_lease_would_hold_the_job(database: Database) -> None:
    """The counterpart that shows the release matters: a worker cancelled from outside (a
    crash-like stop with no graceful path) leaves its lease, and nobody else takes the job."""
    work = SlowWork()
    first = await _runtime(database, work, owner="killed", grace=30)
    await first.start(KEY, message_name="start", business_key="bk-killed")
    runner = asyncio.create_task(first.run_once())
    await asyncio.wait_for(work.started.wait(), 10)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)

    assert await _leases(database) == ["killed"]
    second = await _runtime(database, work, owner="next", grace=30)
    assert await second.run_until_idle() == 0


async def test_only_a_round_that_did_not_fail_is_a_sign_of_life(database: Database) -> None:
    """The readiness check reads the worker's heartbeat: rounds that fail (the store away)
    leave it where it was, so /ready turns red after stale_after instead of staying green."""
    work = SlowWork()
    runtime = await _runtime(database, work, owner="failing", grace=1)
    failing = True

    async def round_that_fails() -> int:
        if failing:
            raise StoreError("database unavailable: connection refused", retryable=True)
        return 0

    runtime.run_once = round_that_fails  # type: ignore[method-assign]
    stop = asyncio.Event()
    worker = asyncio.create_task(runtime.run_forever(stop))
    await asyncio.sleep(0.3)  # a few failed rounds (idle_poll 50 ms)
    assert runtime.heartbeat is None
    failing = False
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(worker, 5)
    assert runtime.heartbeat is not None


async def test_a_cancelled_round_unwinds_before_its_leases_are_given_back(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the grace period the round is cancelled and awaited until it has unwound (its
    transaction rolled back) before the leases are given back, never during the rollback."""
    work = SlowWork()
    runtime = await _runtime(database, work, owner="unwinding", grace=0.1)
    order: list[str] = []

    async def stuck_round() -> int:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.05)  # a rollback takes a moment
            order.append("unwound")
        return 0

    real_release = repo.release_leases

    async def release(session: Any, owner: str) -> int:
        order.append("released")
        released: int = await real_release(session, owner)
        return released

    runtime.run_once = stuck_round  # type: ignore[method-assign]
    monkeypatch.setattr(repo, "release_leases", release)
    stop = asyncio.Event()
    worker = asyncio.create_task(runtime.run_forever(stop))
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(worker, 5)
    assert order == ["unwound", "released"]


async def test_a_cancelled_worker_loop_unwinds_its_round_and_stays_cancelled(
    database: Database,
) -> None:
    """The loop's own task cancelled (the process stops otherwise): the round unwinds first,
    and the cancellation is not swallowed."""
    work = SlowWork()
    runtime = await _runtime(database, work, owner="cancelled", grace=5)
    unwound = asyncio.Event()

    async def stuck_round() -> int:
        try:
            await asyncio.sleep(60)
        finally:
            unwound.set()
        return 0

    runtime.run_once = stuck_round  # type: ignore[method-assign]
    worker = asyncio.create_task(runtime.run_forever(asyncio.Event()))
    await asyncio.sleep(0.1)
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(worker, 5)
    assert unwound.is_set()


async def test_a_start_committed_after_the_loop_gave_its_leases_back_is_given_back_at_the_end(
    postgres_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL a start may lease its job to this bridge while the worker loop runs and
    commit after the loop stopped and gave its leases back (the intake drains after the
    loop). The bridge's last look (``ProcessRuntime.release_leases``, which ``Bridge.run``
    calls after everything stopped) gives that lease back too: the next bridge need not wait
    for it to run out. (On SQLite the loop's release waits for the start's commit.)"""
    work = SlowWork()
    runtime = await _runtime(postgres_database, work, owner="stopping", grace=1)
    stop = asyncio.Event()
    worker = asyncio.create_task(runtime.run_forever(stop))
    await asyncio.sleep(0.2)  # the loop runs: a start's job is leased to it
    real_enqueue = repo.enqueue_job

    async def enqueue_then_stop(session: Any, **values: Any) -> int:
        job_id: int = await real_enqueue(session, **values)
        stop.set()  # the bridge stops before this start commits
        await asyncio.wait_for(asyncio.shield(worker), 10)
        return job_id

    monkeypatch.setattr(repo, "enqueue_job", enqueue_then_stop)
    await runtime.start(KEY, message_name="start", business_key="bk-late")
    assert worker.done()
    assert await _leases(postgres_database) == ["stopping"]  # the loop's release missed it

    assert await runtime.release_leases() == 1
    assert await _leases(postgres_database) == [None]
    work.release.set()
    next_bridge = await _runtime(postgres_database, work, owner="next", grace=30)
    assert await next_bridge.run_until_idle() >= 1  # at once, not after the lease
    assert await _statuses(postgres_database) == ["completed"]


async def test_a_bug_in_a_round_does_not_stop_the_worker_loop(database: Database) -> None:
    """An exception of the bridge's own out of a round (one piece of its work) is logged and
    the loop goes on, as for the work run after a commit: one bad piece of work must not
    stop the site. Such a round is no sign of life either."""
    work = SlowWork()
    runtime = await _runtime(database, work, owner="buggy", grace=1)
    rounds = 0
    past_the_bug = asyncio.Event()

    async def round_with_a_bug() -> int:
        nonlocal rounds
        rounds += 1
        if rounds <= 3:
            raise KeyError("a bug")
        past_the_bug.set()
        return 0

    runtime.run_once = round_with_a_bug  # type: ignore[method-assign]
    stop = asyncio.Event()
    worker = asyncio.create_task(runtime.run_forever(stop))
    await asyncio.wait(
        {worker, asyncio.ensure_future(past_the_bug.wait())},
        timeout=10,
        return_when=asyncio.FIRST_COMPLETED,
    )
    assert not worker.done()
    assert past_the_bug.is_set()
    for _ in range(100):
        if runtime.heartbeat is not None:
            break
        await asyncio.sleep(0.02)
    assert runtime.heartbeat is not None  # the rounds after the bug
    stop.set()
    await asyncio.wait_for(worker, 5)


async def test_a_stopping_bridge_gives_its_leases_back_after_everything_stopped() -> None:
    """``Bridge.run``'s last look: after its loops (the subscriptions' intake among them) have
    stopped, the runtime gives its leases back once more."""
    order: list[str] = []

    class Runtime:
        async def run_forever(self, stop: asyncio.Event) -> None:
            await stop.wait()
            order.append("worker loop stopped")

        async def release_leases(self) -> int:
            order.append("leases released")
            return 0

    class Subscription:
        async def run(self, stop: asyncio.Event) -> None:
            await stop.wait()
            await asyncio.sleep(0.05)  # the intake drains after the worker loop
            order.append("intake stopped")

    bridge = Bridge.__new__(Bridge)
    bridge.runtime = Runtime()  # type: ignore[assignment]
    bridge.subscriptions = [Subscription()]  # type: ignore[list-item]
    bridge.intake = None
    bridge.publication = None
    bridge.organization = None
    bridge.runtime_settings = RuntimeSettings(shutdown_grace=dt.timedelta(seconds=1))
    stop = asyncio.Event()
    running = asyncio.create_task(bridge.run(stop))
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(running, 5)
    assert order == ["worker loop stopped", "intake stopped", "leases released"]
