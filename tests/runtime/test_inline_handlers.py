"""Handlers a start reaches run before the start's transaction, which records their outcomes
too (issue 11; Camunda runs a synchronous service task in the transaction that reached it):
within the runtime's ``inline_handler_budget``, once each, and a crash anywhere loses nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from typing import Any

import pytest
import structlog
from sqlalchemy import event, select

from dsf_bridge.engine import load_process
from dsf_bridge.errors import ProcessExecutionError, StoreError
from dsf_bridge.plugins.registry import HandlerContext, HandlerRegistry
from dsf_bridge.runtime.processes import FaultPoint, ProcessRuntime, RuntimeSettings
from dsf_bridge.store import Database, verify_chain
from dsf_bridge.store import repository as repo
from dsf_bridge.store.tables import AuditEvent, Job, ProcessInstance, TaskSeen
from dsf_bridge.telemetry import REGISTRY
from tests.runtime.test_dispatch import _first_round
from tests.runtime.test_processes import FakeGateway
from tests.runtime.test_shutdown import KEY, MODEL, SlowWork, _runtime, _statuses

_TWO_STEPS = """<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
    xmlns:camunda="http://camunda.org/schema/1.0/bpmn" id="TwoSteps"
    targetNamespace="http://bpmn.io/schema/bpmn">
  <bpmn:process id="testorg_twoSteps" isExecutable="true" camunda:versionTag="1.0">
    <bpmn:startEvent id="Start">
      <bpmn:outgoing>f1</bpmn:outgoing>
      <bpmn:messageEventDefinition messageRef="m_start" />
    </bpmn:startEvent>
    <bpmn:serviceTask id="First" camunda:class="org.test.First">
      <bpmn:incoming>f1</bpmn:incoming>
      <bpmn:outgoing>f2</bpmn:outgoing>
    </bpmn:serviceTask>
    <bpmn:serviceTask id="Second" camunda:class="org.test.Second">
      <bpmn:incoming>f2</bpmn:incoming>
      <bpmn:outgoing>f3</bpmn:outgoing>
    </bpmn:serviceTask>
    <bpmn:exclusiveGateway id="Check" default="f5">
      <bpmn:incoming>f3</bpmn:incoming>
      <bpmn:outgoing>f4</bpmn:outgoing>
      <bpmn:outgoing>f5</bpmn:outgoing>
    </bpmn:exclusiveGateway>
    <bpmn:endEvent id="Done">
      <bpmn:incoming>f4</bpmn:incoming>
      <bpmn:incoming>f5</bpmn:incoming>
    </bpmn:endEvent>
    <bpmn:sequenceFlow id="f1" sourceRef="Start" targetRef="First" />
    <bpmn:sequenceFlow id="f2" sourceRef="First" targetRef="Second" />
    <bpmn:sequenceFlow id="f3" sourceRef="Second" targetRef="Check" />
    <bpmn:sequenceFlow id="f4" sourceRef="Check" targetRef="Done">
      <bpmn:conditionExpression>${strict &amp;&amp; missing}</bpmn:conditionExpression>
    </bpmn:sequenceFlow>
    <bpmn:sequenceFlow id="f5" sourceRef="Check" targetRef="Done" />
  </bpmn:process>
  <bpmn:message id="m_start" name="start" />
</bpmn:definitions>
"""
_TWO_KEY = "testorg_twoSteps"


class Crash(BaseException):
    """The simulated kill: no handler in the runtime catches a BaseException."""


def _settings(**changes: Any) -> RuntimeSettings:
    return dataclasses.replace(
        RuntimeSettings(
            lease=dt.timedelta(seconds=60),
            idle_poll=dt.timedelta(milliseconds=50),
            shutdown_grace=dt.timedelta(seconds=5),
        ),
        **changes,
    )


async def _two_steps(
    database: Database,
    runs: list[str],
    *,
    owner: str,
    strict: bool = False,
    sets: tuple[str, object] | None = None,
    second_takes: float = 0.0,
    **settings: Any,
) -> ProcessRuntime:
    """The two-step process deployed: First records its run and sets ``strict`` (or ``sets``,
    a name and a value), Second records its run and takes ``second_takes`` seconds."""
    registry = HandlerRegistry()

    @registry.service("org.test.First")
    def first(ctx: HandlerContext) -> None:
        runs.append("First")
        ctx.set(*(sets or ("strict", strict)))

    @registry.service("org.test.Second")
    async def second(ctx: HandlerContext) -> None:
        runs.append("Second")
        await asyncio.sleep(second_takes)

    runtime = ProcessRuntime(database, FakeGateway(), owner=owner, settings=_settings(**settings))
    definition = load_process(_TWO_STEPS.encode(), "two_steps.bpmn", resource_version="1.0")
    await runtime.deploy(definition, registry, plugin="test", model_hash="t" * 64)
    return runtime


def _record(runtime: ProcessRuntime) -> list[tuple[FaultPoint, str]]:
    reached: list[tuple[FaultPoint, str]] = []
    runtime.fault_hook = lambda point, detail: reached.append((point, detail))
    return reached


async def _running(runtime: ProcessRuntime) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    worker = asyncio.create_task(runtime.run_forever(stop))
    await _first_round(runtime)
    return stop, worker


async def _until(condition: Any, seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.01)):
        if await condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def _run_start(
    runtime: ProcessRuntime,
    business_key: str,
    *,
    process: str = _TWO_KEY,
    until: Any = None,
) -> None:
    """With the workers running, deliver Task t-1 starting ``process``, wait for ``until``
    (by default: t-1 completed), stop the workers."""
    stop, worker = await _running(runtime)
    await runtime.deliver(
        process, message_name="start", business_key=business_key, task_id="t-1", task_version="2"
    )
    await _until(until or (lambda: _completed(runtime, "t-1")))
    stop.set()
    await asyncio.wait_for(worker, 10)


async def _failed_start(runtime: ProcessRuntime, business_key: str) -> tuple[str, str]:
    """:func:`_run_start` until a Task is failed; the failed Task's id and error."""
    gateway: FakeGateway = runtime.gateway  # type: ignore[assignment]

    async def failed() -> bool:
        return bool(gateway.failed)

    await _run_start(runtime, business_key, until=failed)
    ((task_id, message),) = gateway.failed
    return task_id, message


async def _actions(database: Database) -> list[str]:
    async with database.transaction() as session:
        rows = await session.scalars(
            select(AuditEvent.action)
            .where(AuditEvent.subject.like("instance/%"))
            .order_by(AuditEvent.id)
        )
        return list(rows)


def _writes(database: Database, *starts: str) -> list[str]:
    """The statements that begin with one of ``starts`` (upper case), as the database receives
    them from now on."""
    written: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith(starts):
            written.append(statement)

    event.listen(database.engine.sync_engine, "before_cursor_execute", seen)
    return written


def _job_inserts(database: Database) -> list[str]:
    """The statements that write a job."""
    return _writes(database, "INSERT INTO JOBS")


async def test_handlers_done_within_the_budget_commit_with_the_start(database: Database) -> None:
    """Both handlers run before the start's one commit; no job is ever written for them; the
    audit trail still has a step per handler, in order, and the chain verifies."""
    runs: list[str] = []
    runtime = await _two_steps(database, runs, owner="inline")
    reached = _record(runtime)
    jobs = _job_inserts(database)
    rows = _writes(database, "INSERT INTO PROCESS_INSTANCES", "UPDATE PROCESS_INSTANCES")
    stop, worker = await _running(runtime)
    await runtime.deliver(
        _TWO_KEY, message_name="start", business_key="bk-inline", task_id="t-1", task_version="2"
    )
    # The instance's row written once, as the two handlers' steps left it.
    assert [statement.split()[0] for statement in rows] == ["INSERT"]
    committed = [detail for point, detail in reached if point is FaultPoint.STEP_COMMITTED]
    ran = [detail for point, detail in reached if point is FaultPoint.HANDLER_RAN]
    # Both handlers ran before anything was committed; then the one transaction's steps.
    assert ran == ["org.test.First", "org.test.Second"]
    first_commit = next(i for i, (p, _) in enumerate(reached) if p is FaultPoint.STEP_COMMITTED)
    assert all(i < first_commit for i, (p, _) in enumerate(reached) if p is FaultPoint.HANDLER_RAN)
    assert committed == ["instance.started", "handler.completed", "handler.completed"]
    await _until(lambda: _completed(runtime, "t-1"))
    stop.set()
    await asyncio.wait_for(worker, 10)
    assert runs == ["First", "Second"]
    assert jobs == []
    assert await _statuses(database) == ["completed"]
    assert await _actions(database) == [
        "instance.started",
        "handler.completed",
        "handler.completed",
        "instance.completed",
    ]
    async with database.transaction() as session:
        (instance,) = await repo.all_instances(session)
        assert instance.version == 3  # one version per step, as if each had committed
        row = await session.get(ProcessInstance, instance.id)
        assert row is not None and row.status == "completed" and row.ended_at is not None
        seen = (await session.scalars(select(TaskSeen.instance_id))).all()
        assert seen == [instance.id]
        assert (await verify_chain(session)).ok


async def _completed(runtime: ProcessRuntime, task_id: str) -> bool:
    return task_id in runtime.gateway.completed  # type: ignore[attr-defined]


async def test_a_handler_slower_than_the_budget_goes_on_in_its_job_and_runs_once(
    database: Database,
) -> None:
    """The start commits when the budget runs out: the instance is there, waiting at the
    service task with its job leased to this bridge, while the handler goes on; the job
    takes its outcome (the handler is not called a second time)."""
    work = SlowWork()
    runtime = await _runtime(database, work, owner="slow", grace=5)
    runtime.settings = dataclasses.replace(
        runtime.settings, inline_handler_budget=dt.timedelta(milliseconds=20)
    )
    stop, worker = await _running(runtime)
    await asyncio.wait_for(
        runtime.deliver(
            KEY, message_name="start", business_key="bk-slow", task_id="t-1", task_version="2"
        ),
        5,
    )
    assert work.started.is_set()
    assert await _statuses(database) == ["running"]
    async with database.transaction() as session:
        held = (await session.scalars(select(Job.lease_owner))).all()
    assert held == ["slow"]  # no polling round may call it again
    work.release.set()
    await _until(lambda: _completed(runtime, "t-1"))
    stop.set()
    await asyncio.wait_for(worker, 10)
    assert work.runs == 1
    assert await _statuses(database) == ["completed"]
    assert await _actions(database) == [
        "instance.started",
        "handler.completed",
        "instance.completed",
    ]


async def test_with_a_budget_of_zero_every_handler_runs_in_a_job(database: Database) -> None:
    runs: list[str] = []
    runtime = await _two_steps(database, runs, owner="jobs", inline_handler_budget=dt.timedelta(0))
    reached = _record(runtime)
    jobs = _job_inserts(database)
    await _run_start(runtime, "bk-jobs")
    assert runs == ["First", "Second"]
    assert len(jobs) == 2
    order = [(p, d) for p, d in reached if p in (FaultPoint.STEP_COMMITTED, FaultPoint.HANDLER_RAN)]
    assert order[0] == (FaultPoint.STEP_COMMITTED, "instance.started")  # before any handler
    assert order[1] == (FaultPoint.HANDLER_RAN, "org.test.First")


@pytest.mark.parametrize("budget", [dt.timedelta(milliseconds=50), dt.timedelta(0)])
async def test_an_engine_error_after_a_handler_fails_the_instance_inline_or_not(
    database: Database, budget: dt.timedelta
) -> None:
    """The step after the second handler fails in the engine (a condition on a variable that
    does not exist): a handler's outcome continuing a path fails the instance with the error,
    whether the handler ran inline or in its job, and the Task is failed with the same words."""
    runs: list[str] = []
    runtime = await _two_steps(
        database, runs, owner="erring", strict=True, inline_handler_budget=budget
    )
    task_id, message = await _failed_start(runtime, "bk-err")
    assert runs == ["First", "Second"]
    assert await _statuses(database) == ["failed"]
    assert task_id == "t-1"
    assert "Cannot resolve identifier 'missing'" in message
    assert (await _actions(database))[-1] == "instance.failed"


@pytest.mark.parametrize(
    "crash_at",
    [
        (FaultPoint.HANDLER_RAN, "org.test.Second"),
        (FaultPoint.STEP_WRITTEN, "handler.completed"),
        (FaultPoint.STEP_COMMITTED, "instance.started"),
    ],
)
async def test_a_crash_around_inline_handlers_loses_nothing_and_sends_one_result(
    database: Database, crash_at: tuple[FaultPoint, str]
) -> None:
    """Killed after a handler ran but before the start committed (nothing is written: the
    Task version is delivered again, as intake's recovery of its claim does, and the handlers
    run again, at least once as every handler), or right after the commit (the Task version
    is taken in: delivering it again is refused, and the completing PUT is sent once)."""
    runs: list[str] = []
    first = await _two_steps(database, runs, owner="killed")
    dead = False

    def hook(point: FaultPoint, detail: str) -> None:
        nonlocal dead
        if dead or (point, detail) == crash_at:
            dead = True
            raise Crash(f"{point.value} {detail}")

    first.fault_hook = hook
    stop, worker = await _running(first)
    with pytest.raises(Crash):
        await first.deliver(
            _TWO_KEY, message_name="start", business_key="bk-k", task_id="t-1", task_version="2"
        )
    stop.set()
    await asyncio.gather(worker, return_exceptions=True)
    committed = crash_at[0] is FaultPoint.STEP_COMMITTED
    async with database.transaction() as session:
        instances = (await session.scalars(select(ProcessInstance.status))).all()
    assert instances == (["completed"] if committed else [])

    second = await _two_steps(database, runs, owner="restarted")
    stop, worker = await _running(second)
    if committed:
        with pytest.raises(Exception, match="delivered already"):
            await second.deliver(
                _TWO_KEY, message_name="start", business_key="bk-k", task_id="t-1", task_version="2"
            )
        await second.run_until_idle()
    else:
        await second.deliver(
            _TWO_KEY, message_name="start", business_key="bk-k", task_id="t-1", task_version="2"
        )
        await _until(lambda: _completed(second, "t-1"))
    stop.set()
    await asyncio.wait_for(worker, 10)
    sent = first.gateway.completed + second.gateway.completed  # type: ignore[attr-defined]
    assert sent == ["t-1"]
    assert await _statuses(database) == ["completed"]
    async with database.transaction() as session:
        assert (await verify_chain(session)).ok


async def test_a_start_for_a_key_a_running_instance_has_runs_no_handler(
    database: Database,
) -> None:
    """The message goes to the running instance (DSF's rule), so no handler of a new instance
    may run first: the look for one comes before the handlers."""
    work = SlowWork()
    runtime = await _runtime(database, work, owner="looked", grace=1)
    runtime.settings = dataclasses.replace(
        runtime.settings, inline_handler_budget=dt.timedelta(milliseconds=20)
    )
    stop, worker = await _running(runtime)
    await runtime.deliver(
        KEY, message_name="start", business_key="bk-same", task_id="t-1", task_version="2"
    )
    await asyncio.wait_for(work.started.wait(), 5)
    with pytest.raises(Exception, match="Unable to correlate"):
        await runtime.deliver(
            KEY, message_name="start", business_key="bk-same", task_id="t-2", task_version="2"
        )
    assert work.runs == 1
    work.release.set()
    await _until(lambda: _completed(runtime, "t-1"))
    stop.set()
    await asyncio.wait_for(worker, 10)
    assert work.runs == 1


async def test_a_made_up_business_key_is_not_looked_up(database: Database) -> None:
    """A Task without a business key gets a new one (as in the DSF BPE): no instance can have
    it, so the start neither looks for one nor guards its insert with the look."""
    runs: list[str] = []
    runtime = await _two_steps(database, runs, owner="new-key")
    statements: list[str] = []
    event.listen(
        database.engine.sync_engine,
        "before_cursor_execute",
        lambda _c, _k, statement, *_a: statements.append(statement),
    )
    stop, worker = await _running(runtime)
    await runtime.deliver(
        _TWO_KEY,
        message_name="start",
        business_key="bk-made-up",
        new_business_key=True,
        task_id="t-1",
        task_version="2",
    )
    await runtime.deliver(
        _TWO_KEY, message_name="start", business_key="bk-given", task_id="t-2", task_version="2"
    )
    await _until(lambda: _completed(runtime, "t-2"))
    stop.set()
    await asyncio.wait_for(worker, 10)
    lookups = [s for s in statements if "EXISTS" in s.upper() and "business_key" in s]
    # The given key is looked up (before the handlers, and in the insert); the made-up not.
    assert len(lookups) == 2
    assert runs == ["First", "Second"] * 2


class Counting:
    """The one-step process's handler: counts its calls and those that finished, sleeps
    ``seconds``, and keeps the log context it ran in."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.calls = 0
        self.finished = 0
        self.started = asyncio.Event()
        self.contexts: list[dict[str, Any]] = []
        self.running = 0
        self.most_at_once = 0

    def registry(self) -> HandlerRegistry:
        registry = HandlerRegistry()

        @registry.service("org.test.Work")
        async def work(ctx: HandlerContext) -> None:
            self.calls += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.contexts.append(dict(structlog.contextvars.get_contextvars()))
            self.started.set()
            try:
                await asyncio.sleep(self.seconds)
            finally:
                self.running -= 1
            self.finished += 1

        return registry


async def _one_step(
    database: Database, work: Counting, owner: str, budget: dt.timedelta
) -> ProcessRuntime:
    settings = _settings(inline_handler_budget=budget)
    runtime = ProcessRuntime(database, FakeGateway(), owner=owner, settings=settings)
    definition = load_process(MODEL.read_bytes(), MODEL.name, resource_version="1.0")
    await runtime.deploy(definition, work.registry(), plugin="test", model_hash="h" * 64)
    return runtime


_BUDGETS = pytest.mark.parametrize(
    "budget", [dt.timedelta(milliseconds=300), dt.timedelta(0)], ids=["inline", "in-a-job"]
)


@_BUDGETS
async def test_a_stop_while_a_start_waits_for_its_handler_never_runs_it_twice_at_once(
    database: Database, budget: dt.timedelta
) -> None:
    """SIGTERM while the start waits for its handler. In a job (the start committed first)
    the stopping bridge drains it. Inline, nothing awaits the call after the start's commit
    any more: it is cancelled before the commit and its job left to the next bridge, which
    calls the handler again (at least once, as for a job cancelled by a stop), never while
    the first call runs, and the Task completes once."""
    work = Counting(seconds=0.6)
    first = await _one_step(database, work, "stopping", budget)
    stop, worker = await _running(first)
    delivering = _delivering(first, "bk-stop")
    await asyncio.wait_for(work.started.wait(), 5)
    stop.set()
    await delivering
    await asyncio.wait_for(worker, 10)
    second = await _one_step(database, work, "taking-over", budget)
    stop, worker = await _running(second)
    await _until(lambda: _completed_anywhere((first, second), "t-1"))
    await asyncio.sleep(0.8)  # a second call would have finished by now
    stop.set()
    await asyncio.wait_for(worker, 10)
    assert work.most_at_once == 1
    assert work.finished == 1
    assert work.calls == (2 if budget else 1)
    assert await _statuses(database) == ["completed"]
    assert (first.gateway.completed + second.gateway.completed) == ["t-1"]  # type: ignore[attr-defined]


def _delivering(runtime: ProcessRuntime, business_key: str) -> asyncio.Future[str]:
    """The start of Task t-1 delivered to ``runtime``, under way."""
    return asyncio.ensure_future(
        runtime.deliver(
            KEY, message_name="start", business_key=business_key, task_id="t-1", task_version="2"
        )
    )


async def _completed_anywhere(runtimes: tuple[ProcessRuntime, ...], task_id: str) -> bool:
    return any(task_id in r.gateway.completed for r in runtimes)  # type: ignore[attr-defined]


@_BUDGETS
async def test_a_start_cancelled_while_its_handler_runs_leaves_no_handler_running(
    database: Database, budget: dt.timedelta
) -> None:
    """The delivery is cancelled (the subscription's shutdown past its grace) while the start
    waits for its handler: nothing was written, so the call must not go on either."""
    work = Counting(seconds=0.2)
    runtime = await _one_step(database, work, "cancelled", budget)
    stop, worker = await _running(runtime)
    delivering = _delivering(runtime, "bk-c")
    await asyncio.sleep(0.05)
    delivering.cancel()
    await asyncio.gather(delivering, return_exceptions=True)
    await asyncio.sleep(0.4)
    stop.set()
    await asyncio.wait_for(worker, 10)
    if not await _statuses(database):
        assert work.finished == 0  # cancelled with the start
    else:  # committed before the cancel (in a job): its job ran the handler
        assert work.finished == 1


@_BUDGETS
async def test_the_handler_and_its_step_log_with_its_element(
    database: Database, budget: dt.timedelta, capsys: pytest.CaptureFixture[str]
) -> None:
    work = Counting()
    runtime = await _one_step(database, work, "logs", budget)
    await _run_start(runtime, "bk-l", process=KEY)
    ((context),) = work.contexts
    assert context.get("element_id") == "Work"
    assert context.get("instance_id")
    stepped = [line for line in capsys.readouterr().out.splitlines() if "instance.stepped" in line]
    assert any("element_id=Work" in line and "CompleteTasks" in line for line in stepped)


def _step_seconds() -> tuple[float, float]:
    total = count = 0.0
    for metric in REGISTRY.collect():
        if metric.name == "dsf_bridge_step_duration_seconds":
            for sample in metric.samples:
                if sample.labels.get("process") == _TWO_KEY:
                    if sample.name.endswith("_sum"):
                        total += sample.value
                    elif sample.name.endswith("_count"):
                        count += sample.value
    return total, count


@_BUDGETS
async def test_each_handler_step_is_observed_once_with_its_own_duration(
    database: Database, budget: dt.timedelta
) -> None:
    """First takes no time, Second 0.5 s: two observations adding up to about 0.5 s and the
    transactions, inline or not (not Second's time twice)."""
    runtime = await _two_steps(
        database, [], owner="metrics", second_takes=0.5, inline_handler_budget=budget
    )
    stop, worker = await _running(runtime)
    before = _step_seconds()
    await runtime.deliver(
        _TWO_KEY, message_name="start", business_key="bk-m", task_id="t-1", task_version="2"
    )
    await _until(lambda: _completed(runtime, "t-1"))
    stop.set()
    await asyncio.wait_for(worker, 10)
    after = _step_seconds()
    assert after[1] - before[1] == 2
    # Second's 0.5 s twice would be 1.0; the margin takes a slow moment of a loaded machine.
    assert 0.5 <= after[0] - before[0] < 0.9


@_BUDGETS
async def test_a_variable_the_store_cannot_hold_fails_the_instance_inline_or_not(
    database: Database, budget: dt.timedelta
) -> None:
    """The first handler sets a value JSON cannot hold: refused where it is set, as an error
    of the handler, so the instance fails with a message naming the variable and the
    handler's line, inline or not (before, PostgreSQL's driver raised it in the write and the
    job ran again every lease)."""
    runs: list[str] = []
    runtime = await _two_steps(
        database,
        runs,
        owner="json",
        sets=("when", dt.datetime.now(dt.UTC)),
        inline_handler_budget=budget,
    )
    task_id, message = await _failed_start(runtime, "bk-j")
    assert runs == ["First"]
    assert await _statuses(database) == ["failed"]
    assert task_id == "t-1"
    assert "variable 'when' cannot be stored" in message
    assert "test_inline_handlers.py:" in message  # the handler's line


@pytest.mark.parametrize(
    "value", [float("nan"), "a\x00b", {"nested": ["ok", "a\x00b"]}], ids=["nan", "nul", "deep"]
)
def test_a_value_postgresql_cannot_keep_is_refused_where_it_is_set(value: object) -> None:
    """JSON would take these, PostgreSQL's JSONB not: refused on every database alike."""
    context = HandlerContext(handler="h", element_id="E", business_key="bk", variables={})
    with pytest.raises(ProcessExecutionError, match="variable 'odd' cannot be stored"):
        context.set("odd", value)
    with pytest.raises(ProcessExecutionError, match="variable 'odd' cannot be stored"):
        context.set_local("odd", value)
    context.set("fine", {"list": [1, 2.5, "text", None, True]})
    assert context.updates == {"fine": {"list": [1, 2.5, "text", None, True]}}


async def test_a_passing_store_error_of_inline_steps_fails_the_start_without_handing_over(
    database: Database,
) -> None:
    """A store error that passes (a connection lost) is the start's, not its steps': nothing
    is written and no job takes an outcome; intake takes the Task in again later."""
    runs: list[str] = []
    runtime = await _two_steps(database, runs, owner="passing")

    def hook(point: FaultPoint, detail: str) -> None:
        if (point, detail) == (FaultPoint.STEP_WRITTEN, "handler.completed"):
            raise StoreError("database unavailable: connection lost", retryable=True)

    runtime.fault_hook = hook
    stop, worker = await _running(runtime)
    with pytest.raises(StoreError, match="connection lost"):
        await runtime.deliver(
            _TWO_KEY, message_name="start", business_key="bk-p", task_id="t-1", task_version="2"
        )
    stop.set()
    await asyncio.wait_for(worker, 10)
    assert runs == ["First", "Second"]
    assert await _statuses(database) == []
    async with database.transaction() as session:
        assert (await session.scalars(select(Job))).all() == []


async def test_a_start_whose_inline_steps_cannot_be_written_hands_the_outcome_to_its_job(
    database: Database,
) -> None:
    """Writing the inline steps fails for good (not a passing store error, not a refusal of
    the start): the start is written as without inline calls, and the first handler's job
    takes the outcome it holds, without calling that handler again."""
    runs: list[str] = []
    runtime = await _two_steps(database, runs, owner="handing-over")
    failed = False

    def hook(point: FaultPoint, detail: str) -> None:
        nonlocal failed
        if not failed and (point, detail) == (FaultPoint.STEP_WRITTEN, "handler.completed"):
            failed = True
            raise StoreError("database error: value out of range", retryable=False)

    runtime.fault_hook = hook
    jobs = _job_inserts(database)
    await _run_start(runtime, "bk-h")
    assert failed
    # First is not called again (its job holds its outcome); Second, whose outcome was lost
    # with the steps that could not be written, is called again by its job.
    assert runs == ["First", "Second", "Second"]
    assert len(jobs) == 2  # First's, holding its outcome; then Second's
    assert await _statuses(database) == ["completed"]
    assert runtime.gateway.completed == ["t-1"]  # type: ignore[attr-defined]
    assert await _actions(database) == [
        "instance.started",
        "handler.completed",
        "handler.completed",
        "instance.completed",
    ]


async def test_two_starts_at_once_with_one_business_key_create_one_instance(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two Tasks with the same business key at once (two replicas, say): DSF's rule sends the
    second to the running instance, which does not wait for it ("Unable to correlate"). The
    first start's transaction stays open after its insert until the second has inserted too:
    on PostgreSQL both inserts found no running instance before the key was locked."""
    work = SlowWork()
    runtime = await _runtime(database, work, owner="racing", grace=1)
    create_instance = repo.create_instance
    calls = 0

    async def slow_first(*args: Any, **kwargs: Any) -> repo.InstanceRecord:
        nonlocal calls
        calls += 1
        first = calls == 1
        record = await create_instance(*args, **kwargs)
        if first:
            await asyncio.sleep(0.3)  # the other start runs its insert meanwhile
        return record

    monkeypatch.setattr(repo, "create_instance", slow_first)
    results = await asyncio.gather(
        *(
            runtime.deliver(
                KEY, message_name="start", business_key="bk-same", task_id=t, task_version="2"
            )
            for t in ("t-1", "t-2")
        ),
        return_exceptions=True,
    )
    assert await _statuses(database) == ["running"]  # the handler's job waits: no worker
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1
    assert "Unable to correlate" in str(refused[0])
