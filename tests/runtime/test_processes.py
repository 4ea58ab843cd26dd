"""The durable runtime on real SQLite and PostgreSQL: lifecycles, retries, restarts, audit."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from dsf_bridge.engine import CorrelationError, load_process
from dsf_bridge.errors import ProcessExecutionError, RemoteError, StoreError
from dsf_bridge.plugins.registry import HandlerContext, HandlerRegistry, SendContext
from dsf_bridge.runtime.ports import OutgoingTask, UserTaskRequest
from dsf_bridge.runtime.processes import (
    FaultPoint,
    MessageHeldError,
    ProcessRuntime,
    RuntimeSettings,
)
from dsf_bridge.store import Database, verify_chain
from dsf_bridge.store import repository as repo
from dsf_bridge.store.tables import AuditEvent, Job, OutboxEntry, ProcessInstance, Timer

MODEL = Path(__file__).with_name("request_reply.bpmn")
KEY = "testorg_requestReply"
T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=dt.UTC)
FAST = RuntimeSettings(
    lease=dt.timedelta(seconds=30),
    job_retry_delay=dt.timedelta(seconds=1),
    outbox_retry_delays=(dt.timedelta(seconds=1), dt.timedelta(seconds=2)),
)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += dt.timedelta(**delta)


@dataclass
class FakeGateway:
    """The DSF side in memory; ``failures`` are raised by the next sends, in order."""

    sent: list[OutgoingTask] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    # Outputs written with the completing or failing PUT, by Task id.
    outputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    user_tasks: list[UserTaskRequest] = field(default_factory=list)
    failures: list[Exception] = field(default_factory=list)
    send_attempts: int = 0
    cancelled_user_tasks: list[str] = field(default_factory=list)

    async def send_task(self, task: OutgoingTask) -> str:
        self.send_attempts += 1
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append(task)
        return f"Task/remote-{len(self.sent)}"

    async def complete_task(
        self, task_id: str, *, outputs: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        self.completed.append(task_id)
        self.outputs.setdefault(task_id, []).extend(dict(o) for o in outputs)

    async def fail_task(
        self, task_id: str, message: str, *, outputs: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        self.failed.append((task_id, message))
        self.outputs.setdefault(task_id, []).extend(dict(o) for o in outputs)

    async def create_user_task(self, request: UserTaskRequest) -> str:
        self.user_tasks.append(request)
        return f"QuestionnaireResponse/{len(self.user_tasks)}"

    async def cancel_user_task(self, user_task_id: str) -> None:
        self.cancelled_user_tasks.append(user_task_id)


@dataclass
class Calls:
    prepare: int = 0
    prepare_failures: int = 0
    results: list[object] = field(default_factory=list)
    timeouts: int = 0


def handlers(calls: Calls, *, alternative_business_key: bool = False) -> HandlerRegistry:
    registry = HandlerRegistry()

    @registry.service("org.test.Prepare")
    async def prepare(ctx: HandlerContext) -> None:
        calls.prepare += 1
        if calls.prepare_failures:
            calls.prepare_failures -= 1
            raise RuntimeError("archive not reachable")
        ctx.set("studyUid", "1.2.3")

    @registry.message_send("org.test.SendRequest")
    def send_request(ctx: SendContext) -> None:
        ctx.add_input("http://test.org/fhir/CodeSystem/omi", "study", ctx.get("studyUid"))
        if alternative_business_key:
            ctx.use_alternative_business_key()

    @registry.service("org.test.StoreResult")
    def store_result(ctx: HandlerContext) -> None:
        calls.results.append(ctx.get("result"))

    @registry.service("org.test.HandleTimeout")
    def handle_timeout(ctx: HandlerContext) -> None:
        calls.timeouts += 1
        # The bridge's own error: its message goes on the Task (another exception's does not).
        raise ProcessExecutionError("timeout: no reply within 5 minutes")

    return registry


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def gateway() -> FakeGateway:
    return FakeGateway()


async def _runtime(
    database: Database,
    gateway: FakeGateway,
    clock: Clock,
    calls: Calls,
    owner: str = "a",
    *,
    registry: HandlerRegistry | None = None,
) -> ProcessRuntime:
    runtime = ProcessRuntime(database, gateway, owner=owner, clock=clock, settings=FAST)
    definition = load_process(MODEL.read_bytes(), MODEL.name, resource_version="1.0")
    await runtime.deploy(
        definition, registry or handlers(calls), plugin="test", model_hash="h" * 64
    )
    return runtime


async def _count(database: Database, table: type) -> int:
    async with database.transaction() as session:
        return int((await session.execute(select(func.count()).select_from(table))).scalar_one())


async def _status(database: Database, instance_id: str) -> str:
    async with database.transaction() as session:
        record = await repo.load_instance(session, instance_id)
    assert record is not None
    return record.status


async def test_request_reply_lifecycle(
    database: Database, gateway: FakeGateway, clock: Clock, calls: Calls
) -> None:
    runtime = await _runtime(database, gateway, clock, calls)
    instance_id = await runtime.start(
        KEY, message_name="start", business_key="bk-1", task_id="start-task"
    )
    await runtime.run_until_idle()

    assert calls.prepare == 1
    (sent,) = gateway.sent
    assert sent.message_name == "request"
    assert sent.business_key == "bk-1"
    assert sent.inputs == (
        {"system": "http://test.org/fhir/CodeSystem/omi", "code": "study", "value": "1.2.3"},
    )
    assert await _status(database, instance_id) == "running"
    assert await _count(database, Timer) == 1

    replied = await runtime.correlate(
        message_name="reply",
        business_key="bk-1",
        variables={"result": {"muscle": 29.6}},
        task_id="reply-task",
    )
    await runtime.run_until_idle()

    assert replied == instance_id
    assert calls.results == [{"muscle": 29.6}]
    assert await _status(database, instance_id) == "completed"
    assert sorted(gateway.completed) == ["reply-task", "start-task"]
    assert await _count(database, Timer) == 0
    assert await _count(database, Job) == 0
    async with database.transaction() as session:
        report = await verify_chain(session)
        actions = (
            await session.scalars(select(AuditEvent.action).order_by(AuditEvent.sequence))
        ).all()
        sent_rows = await repo.tasks_of_instance(session, instance_id, "outgoing")
    assert report.ok
    assert actions[0] == "process.deployed"
    for action in ("instance.started", "task.sent", "message.correlated", "instance.completed"):
        assert action in actions
    assert sent_rows == ["remote-1"]  # the id of "Task/remote-1"


async def test_timeout_path_fails_the_start_task(
    database: Database, gateway: FakeGateway, clock: Clock, calls: Calls
) -> None:
    runtime = await _runtime(database, gateway, clock, calls)
    instance_id = await runtime.start(KEY, message_name="start", business_key="bk-2", task_id="t2")
    await runtime.run_until_idle()
    clock.advance(minutes=4)
    assert await runtime.run_until_idle() == 0  # not due yet
    clock.advance(minutes=2)
    await runtime.run_until_idle()

    assert calls.timeouts == 1
    assert await _status(database, instance_id) == "failed"
    ((task_id, message),) = gateway.failed
    assert task_id == "t2"
    assert "timeout" in message
    with pytest.raises(CorrelationError, match="Unable to correlate"):
        await runtime.correlate(message_name="reply", business_key="bk-2", task_id="late")


async def test_a_timer_whose_step_crashes_fires_later_and_holds_up_no_other_work(
    database: Database, gateway: FakeGateway, clock: Clock, calls: Calls
) -> None:
    """A timer whose step crashes (a bug of the bridge's own) is logged and fires again after
    the lease's length; the round goes on with the work it leased, and later rounds do not
    meet the timer first and fail. Before, the crash left the round before its leased work
    ran, and every later round met the timer again."""
    runtime = await _runtime(database, gateway, clock, calls)
    waiting = await runtime.start(KEY, message_name="start", business_key="bk-t", task_id="tt")
    await runtime.run_until_idle()
    crashed: list[str] = []

    def bug(point: FaultPoint, detail: str) -> None:
        if point is FaultPoint.STEP_WRITTEN and detail == "timer.fired":
            crashed.append(detail)
            raise RuntimeError("a bug in the timer's step")

    runtime.fault_hook = bug
    clock.advance(minutes=6)  # the reply's timer is due
    other = await runtime.start(KEY, message_name="start", business_key="bk-o", task_id="to")
    await runtime.run_until_idle()  # never raises
    assert crashed == ["timer.fired"]
    assert calls.prepare == 2  # the other instance's work ran in the same rounds
    assert [task.business_key for task in gateway.sent] == ["bk-t", "bk-o"]
    await runtime.run_until_idle()
    assert crashed == ["timer.fired"]  # not again before its new moment
    runtime.fault_hook = None
    clock.advance(seconds=FAST.lease.total_seconds())
    await runtime.run_until_idle()
    assert calls.timeouts == 1
    assert await _status(database, waiting) == "failed"
    assert await _status(database, other) == "running"


async def test_a_timer_that_fails_for_its_own_instance_holds_up_no_later_timer(
    database: Database, gateway: FakeGateway, clock: Clock, calls: Calls
) -> None:
    """A timer whose step fails for a reason of its own instance (its definition no longer
    deployed, say: a plugin left out at start) is deferred by the lease's length; the timers
    due after it fire, and the round does not fail. Before, it came first in every round and
    failed it, so no later timer fired and the readiness check turned red."""
    runtime = await _runtime(database, gateway, clock, calls)
    stuck = await runtime.start(KEY, message_name="start", business_key="bk-s", task_id="ts")
    await runtime.run_until_idle()
    clock.advance(seconds=30)
    later = await runtime.start(KEY, message_name="start", business_key="bk-l", task_id="tl")
    await runtime.run_until_idle()
    real_of_record = runtime.deployments.of_record

    def of_record(record: repo.InstanceRecord) -> Any:
        if record.id == stuck:
            raise ProcessExecutionError("Process not found: not deployed at this site")
        return real_of_record(record)

    runtime.deployments.of_record = of_record  # type: ignore[method-assign]
    clock.advance(minutes=6)  # both timers due, the stuck one first
    for _ in range(3):
        await runtime.run_once()  # never raises
    assert calls.timeouts == 1
    assert await _status(database, later) == "failed"
    assert await _status(database, stuck) == "running"
    runtime.deployments.of_record = real_of_record  # type: ignore[method-assign]
    clock.advance(seconds=FAST.lease.total_seconds())
    await runtime.run_until_idle()
    assert calls.timeouts == 2
    assert await _status(database, stuck) == "failed"


async def test_the_work_a_round_leased_runs_even_when_its_timers_fail(
    database: Database, gateway: FakeGateway, clock: Clock, calls: Calls
) -> None:
    """The store failing under the timers (the round fails, the timer stays due) does not
    leave the jobs and effects the round leased unrun until their leases run out."""
    runtime = await _runtime(database, gateway, clock, calls)
    await runtime.start(KEY, message_name="start", business_key="bk-w", task_id="tw")
    await runtime.start(KEY, message_name="start", business_key="bk-x", task_id="tx")
    await runtime.run_until_idle()  # the first instance's job, its send, its timer
    clock.advance(minutes=6)
    other = await runtime.start(KEY, message_name="start", business_key="bk-y", task_id="ty")

    async def store_away() -> int:
        raise StoreError("database unavailable: connection refused", retryable=True)

    runtime.timers.fire_due = store_away  # type: ignore[method-assign]
    before = await _jobs_of(database, other)
    assert before  # the third instance's first job, due now
    with pytest.raises(StoreError, match="connection refused"):
        await runtime.run_once()
    assert not set(before) & set(await _jobs_of(database, other))  # it ran in that round
    assert await _status(database, other) == "running"


async def _jobs_of(database: Database, instance_id: str) -> list[int]:
    async with database.transaction() as session:
        return list(
            (await session.scalars(select(Job.id).where(Job.instance_id == instance_id))).all()
        )


async def test_unknown_business_key_does_not_correlate(
    database: Database, gateway: FakeGateway, clock: Clock, calls: Calls
) -> None:
    runtime = await _runtime(database, gateway, clock, calls)
    with pytest.raises(CorrelationError, match="Unable to correlate Task"):
        await runtime.correlate(message_name="reply", business_key="nobody", task_id="x")


async def test_a_failing_handler_is_fatal_as_in_dsf_even_at_an_async_element(
    database: Database, gateway: FakeGateway, clock: Clock, calls: Calls
) -> None:
    """DSF's delegate wrapper catches the exception: Tasks failed, instance ended, no retry."""
    calls.prepare_failures = 2
    runtime = await _runtime(database, gateway, clock, calls)
    instance_id = await runtime.start(KEY, message_name="start", business_key="bk-3", task_id="t3")
    await runtime.run_until_idle()
    for _ in range(2):
        clock.advance(seconds=10)
        await runtime.run_until_idle()
    assert calls.prepare == 1
    assert gateway.sent == []
    assert await _status(database, instance_id) == "failed"
    ((task_id, message),) = gateway.failed
    assert task_id == "t3"
    # What and where, not the exception's message (it may quote data: it is in the local log).
    assert re.fullmatch(
        r"Process testorg_requestReply has fatal error in step Prepare, reason: RuntimeError "
        r"in handler org\.test\.Prepare at element Prepare, tests/runtime/test_processes\.py:\d+",
        message,
    )


async def test_send_is_retried_on_transient_errors_and_delivered_once(
    database: Database, gateway: FakeGateway, clock: Clock, calls: Calls
) -> None:
    gateway.failures = [
        RemoteError("503 Service Unavailable", retryable=True, status=503),
        RemoteError("503 Service Unavailable", retryable=True, status=503),
    ]
    runtime = await _runtime(database, gateway, clock, calls)
    instance_id = await runtime.start(KEY, message_name="start", business_key="bk-4")
    await runtime.run_until_idle()
    assert gateway.sent == []
    clock.advance(seconds=1)
    await runtime.run_until_idle()
    clock.advance(seconds=2)
    await runtime.run_until_idle()
    assert gateway.send_attempts == 3
    assert len(gateway.sent) == 1
    async with database.transaction() as session:
        record = await repo.load_instance(session, instance_id)
        subs = await repo.find_subscriptions(
            session, message_name="reply", business_key="bk-4", correlation_key=None
        )
    assert record is not None
    assert len(subs) == 1


async def test_refused_send_fails_the_instance_with_the_reason(
    database: Database, gateway: FakeGateway, clock: Clock, calls: Calls
) -> None:
    gateway.failures = [RemoteError("403 Forbidden: requester not authorized", status=403)]
    runtime = await _runtime(database, gateway, clock, calls)
    instance_id = await runtime.start(KEY, message_name="start", business_key="bk-5", task_id="t5")
    await runtime.run_until_idle()
    assert await _status(database, instance_id) == "failed"
    ((task_id, message),) = gateway.failed
    assert task_id == "t5"
    assert "403 Forbidden" in message
    assert gateway.send_attempts == 1


async def test_a_bug_in_performing_an_effect_is_retried_then_fails_the_instance(
    database: Database, gateway: FakeGateway, clock: Clock, calls: Calls
) -> None:
    """An exception of the bridge's own while an effect is performed (a payload it cannot
    read, say) meets the effect's retries like a failure the network may heal: tried again,
    then the instance is told and fails, saying what went wrong. Before, it escaped the
    worker's round (stopping the bridge), and the entry kept its lease to be tried again
    when that ran out, for ever."""
    gateway.failures = [KeyError("profile"), KeyError("profile"), KeyError("profile")]
    runtime = await _runtime(database, gateway, clock, calls)
    instance_id = await runtime.start(KEY, message_name="start", business_key="bk-b", task_id="tb")
    for _ in range(4):
        await runtime.run_until_idle()  # never raises: the round goes on
        clock.advance(seconds=2)
    assert gateway.send_attempts == 3  # the try and its two retries (FAST)
    assert await _status(database, instance_id) == "failed"
    ((task_id, message),) = gateway.failed
    assert task_id == "tb"
    assert "internal error: KeyError: 'profile'" in message


@pytest.mark.parametrize("rounds_before_crash", [0, 1, 2, 3, 4])
async def test_restart_at_any_step_reaches_the_same_end(
    database: Database, gateway: FakeGateway, clock: Clock, calls: Calls, rounds_before_crash: int
) -> None:
    """A bridge that dies after any worker round leaves work that a new bridge finishes.

    Rounds: async continuation, prepare handler, send handler (Task queued), send performed.
    """
    first = await _runtime(database, gateway, clock, calls, owner="first")
    instance_id = await first.start(KEY, message_name="start", business_key="bk-6", task_id="t6")
    for _ in range(rounds_before_crash):
        await first.run_once()
    # The first bridge is gone; the leases it held expire.
    clock.advance(minutes=1)
    second = await _runtime(database, gateway, clock, calls, owner="second")
    await second.run_until_idle()
    await second.correlate(message_name="reply", business_key="bk-6", task_id="r6")
    await second.run_until_idle()

    assert await _status(database, instance_id) == "completed"
    assert len(gateway.sent) == 1
    assert calls.prepare == 1
    assert sorted(gateway.completed) == ["r6", "t6"]


async def test_a_crashed_workers_leased_job_is_taken_over(
    database: Database, gateway: FakeGateway, clock: Clock, calls: Calls
) -> None:
    first = await _runtime(database, gateway, clock, calls, owner="first")
    instance_id = await first.start(KEY, message_name="start", business_key="bk-7")
    async with database.transaction() as session:
        claimed = await repo.claim_jobs(session, owner="first", now=clock(), lease=FAST.lease)
    assert len(claimed) == 1  # "first" dies holding this lease

    second = await _runtime(database, gateway, clock, calls, owner="second")
    assert await second.run_until_idle() == 0
    clock.advance(seconds=31)
    await second.run_until_idle()
    assert calls.prepare == 1
    assert len(gateway.sent) == 1
    assert await _status(database, instance_id) == "running"


async def test_state_stays_small(
    database: Database, gateway: FakeGateway, clock: Clock, calls: Calls
) -> None:
    runtime = await _runtime(database, gateway, clock, calls)
    await runtime.start(KEY, message_name="start", business_key="bk-8")
    await runtime.run_until_idle()
    async with database.transaction() as session:
        state = (await session.scalars(select(ProcessInstance.state))).one()
    assert len(json.dumps(state, separators=(",", ":"))) < 2048


async def test_outbox_keeps_sends_that_did_not_happen(
    database: Database, gateway: FakeGateway, clock: Clock, calls: Calls
) -> None:
    """Killed between the commit that queues a send and the send: it happens once later."""
    first = await _runtime(database, gateway, clock, calls, owner="first")
    await first.start(KEY, message_name="start", business_key="bk-9")
    for _ in range(5):  # async continuation, prepare, send handler: then the Task is queued
        if await _count(database, OutboxEntry):
            break
        await first._run_due_jobs()
    assert await _count(database, OutboxEntry) == 1
    assert gateway.sent == []

    second = await _runtime(database, gateway, clock, calls, owner="second")
    await second.run_until_idle()
    await second.run_until_idle()
    assert len(gateway.sent) == 1


async def test_a_reply_that_overtakes_the_commit_of_its_send_is_held_not_refused(
    database: Database, clock: Clock, calls: Calls
) -> None:
    """The remote site answers before this site recorded the send: the runtime neither
    correlates nor refuses the reply (MessageHeldError), however long the send takes; once the
    send is recorded, the same reply correlates, and listeners heard of the resolution."""
    outcomes: list[BaseException | str] = []
    resolved: list[bool] = []

    class FastRemote(FakeGateway):
        async def send_task(self, task: OutgoingTask) -> str:
            location = await super().send_task(task)
            # The remote answers at once; this side has not committed the send, and takes long.
            try:
                outcomes.append(
                    await runtime.deliver(
                        KEY, message_name="reply", business_key=task.business_key, task_id="r"
                    )
                )
            except MessageHeldError as exc:
                outcomes.append(exc)
            resolved.clear()
            await asyncio.sleep(0.5)
            return location

    runtime = await _runtime(database, FastRemote(), clock, calls)
    runtime.on_send_resolved(lambda: resolved.append(True))
    instance_id = await runtime.start(KEY, message_name="start", business_key="bk-fast")
    await runtime.run_until_idle()
    (held,) = outcomes
    assert isinstance(held, MessageHeldError)
    assert held.business_key == "bk-fast"
    assert resolved, "the commit that recorded the send told no listener"
    assert not await runtime.sends_in_flight("bk-fast")
    replied = await runtime.deliver(
        KEY, message_name="reply", business_key="bk-fast", variables={"result": "late"}
    )
    assert replied == instance_id
    await runtime.run_until_idle()
    assert calls.results == ["late"]
    assert await _status(database, instance_id) == "completed"


async def test_a_declared_reply_is_accepted_only_from_the_organization_asked(
    database: Database, gateway: FakeGateway, clock: Clock, calls: Calls
) -> None:
    """Issue 10: a third organization that learnt the business key cannot answer for the one
    asked, when the plugin declares the reply (``replies_only_from_recipients``); the refusal
    leaves the instance waiting for the real answer."""
    registry = handlers(calls)
    registry.replies_only_from_recipients("reply")
    runtime = await _runtime(database, gateway, clock, calls, registry=registry)
    instance_id = await runtime.start(
        KEY,
        message_name="start",
        business_key="bk-asked",
        variables={"target": {"organizationIdentifier": "provider.example.org"}},
    )
    await runtime.run_until_idle()
    assert [sent.target for sent in gateway.sent] == [
        {"organizationIdentifier": "provider.example.org"}
    ]

    for intruder in ("intruder.example.org", None):
        with pytest.raises(
            CorrelationError,
            match=r"^Unable to correlate Task forged: message 'reply' is accepted only from the "
            r"organization the request went to, not from ",
        ):
            await runtime.deliver(
                KEY,
                message_name="reply",
                business_key="bk-asked",
                variables={"result": "invented"},
                task_id="forged",
                requester=intruder,
            )
    assert await _status(database, instance_id) == "running"
    replied = await runtime.deliver(
        KEY,
        message_name="reply",
        business_key="bk-asked",
        variables={"result": "real"},
        requester="provider.example.org",
    )
    assert replied == instance_id
    await runtime.run_until_idle()
    assert calls.results == ["real"]
    assert await _status(database, instance_id) == "completed"


async def test_a_start_message_for_a_running_business_key_correlates_as_the_dsf_bpe_does(
    database: Database, gateway: FakeGateway, clock: Clock, calls: Calls
) -> None:
    """DSF's TaskHandler: a running instance with the Task's business key takes the message
    (here it waits for another one: "Unable to correlate Task"), no second instance starts;
    a message that starts nothing, for a business key no instance has, is "Process with start
    message-name ... not found"."""
    runtime = await _runtime(database, gateway, clock, calls)
    first = await runtime.start(KEY, message_name="start", business_key="bk-1")
    await runtime.run_until_idle()
    assert await _status(database, first) == "running"  # waits for its reply

    with pytest.raises(CorrelationError, match=r"^Unable to correlate Task again"):
        await runtime.deliver(
            KEY, message_name="start", business_key="bk-1", task_id="again", actor="remote"
        )
    with pytest.raises(
        CorrelationError, match=r"^Process with start message-name 'reply' not found"
    ):
        await runtime.deliver(KEY, message_name="reply", business_key="bk-unknown")
    async with database.transaction() as session:
        started = (
            await session.execute(
                select(func.count()).where(AuditEvent.action == "instance.started")
            )
        ).scalar_one()
    assert started == 1
    # Another business key starts its own instance.
    second = await runtime.deliver(KEY, message_name="start", business_key="bk-2")
    assert second != first


async def test_versions_side_by_side_each_task_goes_to_the_version_it_names(
    database: Database, gateway: FakeGateway, clock: Clock, calls: Calls
) -> None:
    """An instance started on 1.0 finishes on 1.0 after 1.1 is deployed; a Task routes by the
    version in its instantiatesCanonical; a start without a version takes the newest."""
    runtime = await _runtime(database, gateway, clock, calls)
    old = await runtime.deliver(KEY, message_name="start", business_key="bk-old", version="1.0")
    await runtime.run_until_idle()
    newer = MODEL.read_bytes().replace(b'camunda:versionTag="1.0"', b'camunda:versionTag="1.1"')
    definition = load_process(newer, MODEL.name, resource_version="1.1")
    await runtime.deploy(definition, handlers(calls), plugin="test 1.1", model_hash="i" * 64)
    assert runtime.versions(KEY) == ["1.0", "1.1"]
    assert runtime.process(KEY) is runtime.process(KEY, "1.1")

    new = await runtime.deliver(KEY, message_name="start", business_key="bk-new", version="1.1")
    default = await runtime.start(KEY, message_name="start", business_key="bk-default")
    await runtime.run_until_idle()
    # The reply for the 1.0 instance, named 1.0, reaches it; named 1.1 it reaches nothing.
    with pytest.raises(CorrelationError, match=r"^Process with start message-name 'reply'"):
        await runtime.deliver(KEY, message_name="reply", business_key="bk-old", version="1.1")
    replied = await runtime.deliver(
        KEY,
        message_name="reply",
        business_key="bk-old",
        version="1.0",
        variables={"result": "old"},
    )
    await runtime.run_until_idle()
    assert replied == old
    assert await _status(database, old) == "completed"
    old_version, new_version = runtime.process(KEY, "1.0"), runtime.process(KEY, "1.1")
    assert old_version is not None and new_version is not None
    async with database.transaction() as session:
        definitions = {
            iid: record.definition_id
            for iid in (old, new, default)
            if (record := await repo.load_instance(session, iid)) is not None
        }
    assert definitions == {
        old: old_version.definition_id,
        new: new_version.definition_id,
        default: new_version.definition_id,
    }


_OUTPUTS_MODEL = b"""<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
    xmlns:camunda="http://camunda.org/schema/1.0/bpmn" id="outputs"
    targetNamespace="http://bpmn.io/schema/bpmn">
  <bpmn:process id="testorg_outputs" isExecutable="true" camunda:versionTag="1.0">
    <bpmn:startEvent id="Start"><bpmn:outgoing>f1</bpmn:outgoing>
      <bpmn:messageEventDefinition messageRef="m_start" /></bpmn:startEvent>
    <bpmn:serviceTask id="Work" camunda:class="org.test.Work" camunda:asyncBefore="true">
      <bpmn:extensionElements>
        <camunda:failedJobRetryTimeCycle>R3/PT1S</camunda:failedJobRetryTimeCycle>
      </bpmn:extensionElements>
      <bpmn:incoming>f1</bpmn:incoming><bpmn:outgoing>f2</bpmn:outgoing>
    </bpmn:serviceTask>
    <bpmn:userTask id="Ask" camunda:formKey="http://test.org/fhir/Questionnaire/q|1.0">
      <bpmn:incoming>f2</bpmn:incoming><bpmn:outgoing>f3</bpmn:outgoing>
    </bpmn:userTask>
    <bpmn:endEvent id="End"><bpmn:incoming>f3</bpmn:incoming></bpmn:endEvent>
    <bpmn:sequenceFlow id="f1" sourceRef="Start" targetRef="Work" />
    <bpmn:sequenceFlow id="f2" sourceRef="Work" targetRef="Ask" />
    <bpmn:sequenceFlow id="f3" sourceRef="Ask" targetRef="End" />
  </bpmn:process>
  <bpmn:message id="m_start" name="start" />
</bpmn:definitions>
"""


def _output(text: str) -> dict[str, Any]:
    return {
        "type": {"coding": [{"system": "http://test.org/fhir/CodeSystem/t", "code": "x"}]},
        "valueString": text,
    }


async def _outputs_runtime(
    database: Database, gateway: FakeGateway, clock: Clock, attempts: list[int]
) -> ProcessRuntime:
    registry = HandlerRegistry()

    @registry.service("org.test.Work")
    def work(ctx: HandlerContext) -> None:
        attempts.append(1)
        ctx.add_task_output("start-task", _output(f"attempt {len(attempts)}"))
        for number in range(12):  # more than one digit: order must not be by name
            ctx.add_task_output("start-task", _output(f"value {number}"))
        if len(attempts) < 3:
            raise RuntimeError(f"archive not reachable ({len(attempts)})")

    runtime = ProcessRuntime(database, gateway, owner="a", clock=clock, settings=FAST)
    definition = load_process(_OUTPUTS_MODEL, "outputs.bpmn", resource_version="1.0")
    await runtime.deploy(definition, registry, plugin="test", model_hash="o" * 64)
    return runtime


async def _run_for(runtime: ProcessRuntime, clock: Clock, seconds: int) -> None:
    for _ in range(seconds):
        await runtime.run_until_idle()
        clock.advance(seconds=1)
    await runtime.run_until_idle()


async def test_task_outputs_keep_their_order(
    database: Database, gateway: FakeGateway, clock: Clock
) -> None:
    """On both stores (PostgreSQL's JSONB keeps no key order): the outputs come out in the
    order they were added."""
    attempts: list[int] = [1, 2]  # the handler succeeds at once
    runtime = await _outputs_runtime(database, gateway, clock, attempts)
    instance_id = await runtime.start(
        "testorg_outputs", message_name="start", business_key="bk-o", task_id="start-task"
    )
    await _run_for(runtime, clock, 2)
    assert len(gateway.user_tasks) == 1  # waits at the user task now
    await runtime.complete_user_task(gateway.user_tasks[0].user_task_id, {})
    await runtime.run_until_idle()
    assert await _status(database, instance_id) == "completed"
    texts = [o["valueString"] for o in gateway.outputs["start-task"]]
    assert texts == ["attempt 3", *(f"value {n}" for n in range(12))]


async def test_a_failing_handlers_outputs_go_with_the_failing_put(
    database: Database, gateway: FakeGateway, clock: Clock
) -> None:
    """As a DSF delegate's error handling: what the handler added before it raised is written
    with the PUT that fails the Task, in order, after DSF's error output."""
    attempts: list[int] = []
    runtime = await _outputs_runtime(database, gateway, clock, attempts)
    instance_id = await runtime.start(
        "testorg_outputs", message_name="start", business_key="bk-f", task_id="start-task"
    )
    await _run_for(runtime, clock, 5)
    assert len(attempts) == 1
    assert await _status(database, instance_id) == "failed"
    ((task_id, message),) = gateway.failed
    assert task_id == "start-task"
    assert re.search(r"reason: RuntimeError in handler org\.test\.Work at element Work, ", message)
    texts = [o["valueString"] for o in gateway.outputs["start-task"]]
    assert texts == ["attempt 1", *(f"value {n}" for n in range(12))]


class FlakyLocalServer(FakeGateway):
    """The local FHIR server is down for a while: creating the user task's form fails."""

    outage: int = 0

    async def create_user_task(self, request: UserTaskRequest) -> str:
        if self.outage:
            self.outage -= 1
            raise RemoteError("local FHIR server unavailable (503)", retryable=True, status=503)
        return await super().create_user_task(request)


async def test_a_local_server_outage_does_not_fail_a_user_task(
    database: Database, clock: Clock
) -> None:
    """More failures than the outbox's retry delays: the form is created once the server is
    back, as DSF's DefaultUserTaskListener retries forever; the instance never fails."""
    gateway = FlakyLocalServer()
    gateway.outage = len(FAST.outbox_retry_delays) + 3
    attempts: list[int] = [1, 2]  # the handler succeeds at once
    runtime = await _outputs_runtime(database, gateway, clock, attempts)
    instance_id = await runtime.start(
        "testorg_outputs", message_name="start", business_key="bk-u", task_id="start-task"
    )
    await _run_for(runtime, clock, 20)
    assert gateway.outage == 0
    assert len(gateway.user_tasks) == 1
    assert await _status(database, instance_id) == "running"
    assert gateway.failed == []


async def test_a_user_task_ended_by_its_boundary_event_leaves_its_response_as_dsf(
    database: Database, gateway: FakeGateway, clock: Clock
) -> None:
    """DSF registers only a 'create' task listener: the QuestionnaireResponse of a user task
    that a boundary event ended is left as it is; the bridge sends nothing for it."""
    registry = HandlerRegistry()

    @registry.service("org.test.Work")
    def work(ctx: HandlerContext) -> None:
        return None

    late = _OUTPUTS_MODEL.replace(
        b'<bpmn:endEvent id="End">',
        b'<bpmn:boundaryEvent id="Late" attachedToRef="Ask"><bpmn:timerEventDefinition>'
        b"<bpmn:timeDuration>PT1M</bpmn:timeDuration></bpmn:timerEventDefinition>"
        b'</bpmn:boundaryEvent><bpmn:endEvent id="Gone" />'
        b'<bpmn:sequenceFlow id="f4" sourceRef="Late" targetRef="Gone" />'
        b'<bpmn:endEvent id="End">',
    )
    runtime = ProcessRuntime(database, gateway, owner="a", clock=clock, settings=FAST)
    await runtime.deploy(
        load_process(late, "late.bpmn", resource_version="1.0"),
        registry,
        plugin="test",
        model_hash="l" * 64,
    )
    instance_id = await runtime.start(
        "testorg_outputs", message_name="start", business_key="bk-l", task_id="start-task"
    )
    await _run_for(runtime, clock, 5)
    assert len(gateway.user_tasks) == 1
    clock.advance(minutes=2)
    await _run_for(runtime, clock, 2)
    assert await _status(database, instance_id) == "completed"
    assert gateway.cancelled_user_tasks == []


async def test_a_reply_to_a_task_sent_with_the_alternative_business_key_reaches_its_instance(
    database: Database, gateway: FakeGateway, clock: Clock, calls: Calls
) -> None:
    """DSF's alternative business key (API v2 ALTERNATIVE, v1 setAlternativeBusinessKey): the
    request carries a key of its own, the reply carries it back, and intake's rules (running
    instance, correlation, a reply overtaking the send's commit) treat it as the instance's."""
    registry = handlers(calls, alternative_business_key=True)
    runtime = await _runtime(database, gateway, clock, calls, registry=registry)
    instance_id = await runtime.start(KEY, message_name="start", business_key="bk-own")
    await runtime.run_until_idle()
    (sent,) = gateway.sent
    assert sent.business_key != "bk-own"
    uuid.UUID(sent.business_key)  # a fresh UUID, as DSF makes it

    # A start message with the alternative key finds the running instance, not a new one.
    with pytest.raises(CorrelationError, match=r"^Unable to correlate Task"):
        await runtime.deliver(KEY, message_name="start", business_key=sent.business_key)
    replied = await runtime.deliver(
        KEY, message_name="reply", business_key=sent.business_key, variables={"result": "alt"}
    )
    await runtime.run_until_idle()
    assert replied == instance_id
    assert calls.results == ["alt"]
    assert await _status(database, instance_id) == "completed"
    # The instance's own key still works for what it is: nothing waits any more.
    with pytest.raises(CorrelationError):
        await runtime.correlate(message_name="reply", business_key="bk-own")


_SEND_FIELDS = """<bpmn:extensionElements>
  <camunda:field name="instantiatesCanonical">
    <camunda:string>http://test.org/bpe/Process/provide|1.0</camunda:string></camunda:field>
  <camunda:field name="messageName"><camunda:string>request</camunda:string></camunda:field>
  <camunda:field name="profile">
    <camunda:string>http://test.org/fhir/StructureDefinition/task-request|1.0</camunda:string>
  </camunda:field>
</bpmn:extensionElements>"""
_PARALLEL_SENDS = f"""<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
    xmlns:camunda="http://camunda.org/schema/1.0/bpmn" id="par" targetNamespace="http://x">
  <bpmn:process id="testorg_par" isExecutable="true" camunda:versionTag="1.0">
    <bpmn:startEvent id="Start"><bpmn:outgoing>f1</bpmn:outgoing>
      <bpmn:messageEventDefinition messageRef="m_start" /></bpmn:startEvent>
    <bpmn:parallelGateway id="Fork"><bpmn:incoming>f1</bpmn:incoming>
      <bpmn:outgoing>a1</bpmn:outgoing><bpmn:outgoing>b1</bpmn:outgoing></bpmn:parallelGateway>
    <bpmn:sendTask id="SendA" camunda:class="org.test.Send">{_SEND_FIELDS}
      <bpmn:incoming>a1</bpmn:incoming><bpmn:outgoing>a2</bpmn:outgoing></bpmn:sendTask>
    <bpmn:sendTask id="SendB" camunda:class="org.test.Send">{_SEND_FIELDS}
      <bpmn:incoming>b1</bpmn:incoming><bpmn:outgoing>b2</bpmn:outgoing></bpmn:sendTask>
    <bpmn:intermediateCatchEvent id="ReplyA"><bpmn:incoming>a2</bpmn:incoming>
      <bpmn:outgoing>a3</bpmn:outgoing><bpmn:messageEventDefinition messageRef="m_reply" />
    </bpmn:intermediateCatchEvent>
    <bpmn:intermediateCatchEvent id="ReplyB"><bpmn:incoming>b2</bpmn:incoming>
      <bpmn:outgoing>b3</bpmn:outgoing><bpmn:messageEventDefinition messageRef="m_reply2" />
    </bpmn:intermediateCatchEvent>
    <bpmn:parallelGateway id="Join"><bpmn:incoming>a3</bpmn:incoming>
      <bpmn:incoming>b3</bpmn:incoming><bpmn:outgoing>f9</bpmn:outgoing></bpmn:parallelGateway>
    <bpmn:endEvent id="End"><bpmn:incoming>f9</bpmn:incoming></bpmn:endEvent>
    <bpmn:sequenceFlow id="f1" sourceRef="Start" targetRef="Fork" />
    <bpmn:sequenceFlow id="a1" sourceRef="Fork" targetRef="SendA" />
    <bpmn:sequenceFlow id="b1" sourceRef="Fork" targetRef="SendB" />
    <bpmn:sequenceFlow id="a2" sourceRef="SendA" targetRef="ReplyA" />
    <bpmn:sequenceFlow id="b2" sourceRef="SendB" targetRef="ReplyB" />
    <bpmn:sequenceFlow id="a3" sourceRef="ReplyA" targetRef="Join" />
    <bpmn:sequenceFlow id="b3" sourceRef="ReplyB" targetRef="Join" />
    <bpmn:sequenceFlow id="f9" sourceRef="Join" targetRef="End" />
  </bpmn:process>
  <bpmn:message id="m_start" name="start" />
  <bpmn:message id="m_reply" name="reply" />
  <bpmn:message id="m_reply2" name="reply2" />
</bpmn:definitions>
""".encode()


async def test_sends_side_by_side_share_the_one_alternative_business_key(
    database: Database, gateway: FakeGateway, clock: Clock
) -> None:
    """Two sends prepared in parallel branches, each asking for the alternative business key,
    get the same one, and the replies to both reach the instance."""
    registry = HandlerRegistry()

    @registry.message_send("org.test.Send")
    def send(ctx: SendContext) -> None:
        ctx.use_alternative_business_key()

    runtime = ProcessRuntime(database, gateway, owner="a", clock=clock, settings=FAST)
    definition = load_process(_PARALLEL_SENDS, "par.bpmn", resource_version="1.0")
    await runtime.deploy(definition, registry, plugin="t", model_hash="p" * 64)
    instance_id = await runtime.start("testorg_par", message_name="start", business_key="own")
    await runtime.run_until_idle()
    keys = {t.business_key for t in gateway.sent}
    assert len(gateway.sent) == 2
    assert len(keys) == 1 and "own" not in keys
    (key,) = keys
    for message in ("reply", "reply2"):
        assert await runtime.deliver("testorg_par", message_name=message, business_key=key) == (
            instance_id
        )
    await runtime.run_until_idle()
    assert await _status(database, instance_id) == "completed"
