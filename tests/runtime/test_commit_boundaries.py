"""Every commit boundary of a request/reply lifecycle, one crash each (issue 10), on SQLite and
PostgreSQL, over the sandbox network with the real DSF gateway.

A recording run lists the boundaries (:class:`FaultPoint`) in the order a lifecycle reaches
them; then, for each, a runtime is stopped there as a kill would stop it (its open transaction
rolls back, nothing after the point runs), and a second runtime, started later with another
owner, finishes what is left, as a restarted bridge with intake's redelivery would. Each time
the instance completes, exactly one request Task reached the other site and the audit chain
verifies.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from dsf_bridge.dsf.tasks import input_values
from dsf_bridge.errors import StoreError
from dsf_bridge.runtime.processes import FaultPoint, ProcessRuntime
from dsf_bridge.sandbox.network import SandboxNetwork
from dsf_bridge.store import Database, verify_chain
from dsf_bridge.store import repository as repo
from dsf_bridge.store.tables import Job, OutboxEntry, ProcessInstance
from tests.runtime.sending import (
    KEY,
    PROVIDER_DEFINITION,
    close,
    runtime_for,
    site_client,
    site_config,
)
from tests.sandbox.harness import task_profile

REQUESTER = "Site_A"
PROVIDER = "Site_B"
REQUEST_PROFILE = "http://test.org/fhir/StructureDefinition/task-request|1.0"


class Crash(BaseException):
    """The simulated kill: a BaseException, so that no handler in the runtime catches it."""


@dataclass
class CrashAt:
    """Fault hook: records each boundary reached; at the ``index``-th it kills the runtime,
    which stays dead (every later boundary raises too)."""

    index: int | None = None
    reached: list[tuple[FaultPoint, str]] = field(default_factory=list)
    dead: bool = False

    def __call__(self, point: FaultPoint, detail: str) -> None:
        if self.dead:
            raise Crash("already dead")
        self.reached.append((point, detail))
        if self.index is not None and len(self.reached) - 1 == self.index:
            self.dead = True
            raise Crash(f"{point} {detail}")


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[SandboxNetwork]:
    async with SandboxNetwork(tmp_path / "net", [REQUESTER, PROVIDER]) as net:
        client, _ = site_client(site_config(net, PROVIDER, PROVIDER))
        async with client:
            await client.create(PROVIDER_DEFINITION)
            await client.create(task_profile(REQUEST_PROFILE))
        yield net


def _requests(net: SandboxNetwork, business_key: str) -> list[dict[str, Any]]:
    return [
        task
        for task in net.servers[PROVIDER].service.store.all("Task")
        if input_values(task, "business-key") == [business_key]
    ]


async def _status(database: Database, business_key: str) -> str | None:
    """The status of the instance with ``business_key``, None if it was never started."""
    async with database.transaction() as session:
        statuses = (
            await session.scalars(
                select(ProcessInstance.status).where(ProcessInstance.business_key == business_key)
            )
        ).all()
    assert len(statuses) <= 1, statuses
    return statuses[0] if statuses else None


async def _awaits_reply(database: Database, business_key: str) -> bool:
    async with database.transaction() as session:
        for instance_id in await repo.instances_waiting_for(session, "reply"):
            record = await repo.load_instance(session, instance_id)
            if record is not None and record.business_key == business_key:
                return True
    return False


async def _advance(runtime: ProcessRuntime, business_key: str) -> None:
    """What a bridge does for one lifecycle, from wherever the store stands: start it (intake
    redelivers a start Task not taken in), work, take the reply in while it is awaited (intake
    redelivers a reply not taken in)."""
    if await _status(runtime.database, business_key) is None:
        await runtime.start(
            KEY,
            message_name="start",
            business_key=business_key,
            variables={"target": {"organizationIdentifier": PROVIDER}},
        )
    await runtime.run_until_idle()
    if await _awaits_reply(runtime.database, business_key):
        await runtime.correlate(
            message_name="reply",
            business_key=business_key,
            variables={"result": 42},
            requester=PROVIDER,
        )
    await runtime.run_until_idle()


def _later() -> dt.datetime:
    """The restarted bridge's clock: past the dead one's leases, before the reply's timeout."""
    return dt.datetime.now(dt.UTC) + dt.timedelta(minutes=2)


async def test_a_crash_at_any_commit_boundary_loses_and_repeats_nothing(
    network: SandboxNetwork, database: Database
) -> None:
    config = site_config(network, REQUESTER, PROVIDER)
    recorder = CrashAt()
    runtime, gateway = await runtime_for(database, config, owner="recording")
    runtime.fault_hook = recorder
    try:
        await _advance(runtime, "bk-clean")
    finally:
        await close(gateway)
    assert await _status(database, "bk-clean") == "completed"
    boundaries = recorder.reached
    points = {point for point, _ in boundaries}
    # The lifecycle passes every kind of boundary, the send's and the steps'.
    assert points == set(FaultPoint), points
    assert (FaultPoint.EFFECT_PERFORMED, "send-task") in boundaries
    assert (FaultPoint.STEP_WRITTEN, "send.completed") in boundaries
    assert (FaultPoint.STEP_WRITTEN, "send.queued") in boundaries  # the send job's own commit
    assert (FaultPoint.HANDLER_RAN, "org.test.SendRequest") in boundaries

    for index, (point, detail) in enumerate(boundaries):
        business_key = f"bk-{index}"
        doomed, gateway = await runtime_for(database, config, owner=f"doomed-{index}")
        crash = CrashAt(index)
        doomed.fault_hook = crash
        try:
            with pytest.raises(Crash):
                await _advance(doomed, business_key)
        finally:
            await close(gateway)
        # It died where it was meant to, on the same way as the recording run.
        assert crash.reached == boundaries[: index + 1]

        restarted, gateway = await runtime_for(
            database, config, owner=f"restarted-{index}", clock=_later
        )
        try:
            await _advance(restarted, business_key)
        finally:
            await close(gateway)
        where = f"crash at boundary {index}: {point} {detail}"
        assert await _status(database, business_key) == "completed", where
        assert len(_requests(network, business_key)) == 1, where

    async with database.transaction() as session:
        report = await verify_chain(session)
    assert report.ok, (report.problem, report.record_problems)


@dataclass
class StoreLostAt:
    """Fault hook: the store goes away inside the transaction of the step ``action``: once, or
    every time with ``repeat``."""

    action: str
    repeat: bool = False
    lost: int = 0

    def __call__(self, point: FaultPoint, detail: str) -> None:
        if (
            point is FaultPoint.STEP_WRITTEN
            and detail == self.action
            and (self.repeat or not self.lost)
        ):
            self.lost += 1
            raise StoreError("database unavailable: connection refused", retryable=True)


async def _leases(database: Database) -> list[tuple[str | None, int]]:
    async with database.transaction() as session:
        jobs = (await session.execute(select(Job.lease_owner, Job.retries_left))).all()
        entries = (
            await session.execute(
                select(OutboxEntry.lease_owner, OutboxEntry.attempts).where(
                    OutboxEntry.status == "pending"
                )
            )
        ).all()
    return [(owner, number) for owner, number in [*jobs, *entries]]


@pytest.mark.parametrize("action", ["send.completed", "handler.completed"])
async def test_work_done_but_not_recorded_is_given_back_at_once(
    network: SandboxNetwork, database: Database, action: str
) -> None:
    """The store goes away in the commit after a send reached its target, or after a handler
    ran: the worker gives the lease back (no job retry used up) instead of holding it until it
    runs out, and the next round, with the store back, finishes with one request sent."""
    config = site_config(network, REQUESTER, PROVIDER)
    lost = StoreLostAt(action)
    runtime, gateway = await runtime_for(database, config, owner="only")
    runtime.fault_hook = lost
    business_key = f"bk-lost-{action}"
    try:
        await runtime.start(
            KEY,
            message_name="start",
            business_key=business_key,
            variables={"target": {"organizationIdentifier": PROVIDER}},
        )
        while not lost.lost:
            await runtime.run_once()
        held = await _leases(database)
        assert held, "the interrupted work is still there"
        assert all(owner is None for owner, _ in held), held  # nobody holds it
        if action == "handler.completed":
            assert [retries for _, retries in held] == [3]  # no retry used up
        # Due again within the first retry delay, not after the 60 s lease.
        runtime.clock = lambda: dt.datetime.now(dt.UTC) + dt.timedelta(seconds=6)
        await runtime.run_until_idle()
    finally:
        await close(gateway)
    assert await _awaits_reply(database, business_key)
    assert len(_requests(network, business_key)) == 1


async def test_a_store_error_that_repeats_ends_in_an_incident_not_a_loop(
    network: SandboxNetwork, database: Database
) -> None:
    """A 'retryable' store error that comes back every time (a statement timeout, a full disk)
    gives the job back a few times without using a retry, then uses its retries, then leaves
    it out of retries for an operator: the handler is not run for ever."""
    config = site_config(network, REQUESTER, PROVIDER)
    always = StoreLostAt("handler.completed", repeat=True)
    moment = [dt.datetime.now(dt.UTC)]
    runtime, gateway = await runtime_for(database, config, owner="only", clock=lambda: moment[0])
    runtime.fault_hook = always
    try:
        await runtime.start(
            KEY,
            message_name="start",
            business_key="bk-always",
            variables={"target": {"organizationIdentifier": PROVIDER}},
        )
        for _ in range(40):
            await runtime.run_once()
            moment[0] += dt.timedelta(minutes=1)
    finally:
        await close(gateway)
    async with database.transaction() as session:
        retries_left = (await session.scalars(select(Job.retries_left))).all()
    # Out of retries, parked where an operator sees it (dsf-bridge instances incidents).
    assert retries_left == [-1]
    # Five leases given back without using a retry, then a try and its three retries.
    assert always.lost == 5 + 1 + 3, always.lost


async def test_other_leases_do_not_count_as_interruptions(
    network: SandboxNetwork, database: Database
) -> None:
    """A job leased many times for other reasons (postponed behind a busy instance, taken over
    after a crash) still gets its lease back without using a retry when the store goes away
    under it: only interruptions count towards the bound."""
    config = site_config(network, REQUESTER, PROVIDER)
    lost = StoreLostAt("handler.completed")
    runtime, gateway = await runtime_for(database, config, owner="only")
    runtime.fault_hook = lost
    try:
        await runtime.start(
            KEY,
            message_name="start",
            business_key="bk-leased-often",
            variables={"target": {"organizationIdentifier": PROVIDER}},
        )
        while not lost.lost:
            async with database.transaction() as session:  # every job leased often before
                await session.execute(update(Job).values(attempts=10))
            await runtime.run_once()
    finally:
        await close(gateway)
    async with database.transaction() as session:
        rows = (await session.execute(select(Job.retries_left, Job.interruptions))).all()
    assert [tuple(row) for row in rows] == [(3, 1)]
