"""A harness that runs process definitions with their handlers on the real runtime, for tests.

It is the production :class:`~dsf_bridge.runtime.processes.ProcessRuntime` (the same stepping,
effect writing, job, timer and outbox workers, the same migrations) over an in-memory SQLite
store, with a fake DSF gateway that records what would go on the wire and a fake clock that
only :meth:`ProcessHarness.advance` moves. Tests and production therefore cannot drift: every
step is written to SQL and read back, as after a restart, and handlers (plain or ``async``)
run inside the test's event loop::

    async with ProcessHarness([definition], handlers, services={...}) as harness:
        instance = await harness.start("dsfdev_ping", "startPing", business_key="bk")
        await harness.advance(seconds=60)
        assert instance.status == "completed"
        assert [task.message_name for task in harness.sent] == ["ping"]

What the DSF side would see is recorded: :attr:`ProcessHarness.sent` (Tasks posted),
:attr:`ProcessHarness.task_status` (the Tasks taken in, completed or failed, by business key),
:attr:`ProcessHarness.user_tasks` (QuestionnaireResponses created) and
:meth:`ProcessHarness.task_outputs`.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dsf_bridge.dsf.tasks import task_outputs
from dsf_bridge.engine import state as instance_state
from dsf_bridge.engine.events import SignalReceived
from dsf_bridge.engine.model import ProcessDefinition
from dsf_bridge.errors import ProcessExecutionError
from dsf_bridge.plugins.registry import Handler, HandlerContext, HandlerRegistry
from dsf_bridge.runtime.effects import SIGNAL_SUBSCRIPTION
from dsf_bridge.runtime.ports import OutgoingTask, UserTaskRequest
from dsf_bridge.runtime.processes import ProcessRuntime, RuntimeSettings
from dsf_bridge.store import Database, reasons_of, upgrade_in_place
from dsf_bridge.store import repository as repo

__all__ = ["Instance", "ProcessHarness", "SentTask", "UserTask"]

# What a send element produced, as the runtime hands it to the DSF gateway.
SentTask = OutgoingTask

_EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
# How many moments advance() steps through at most: a model that keeps itself busy is a bug.
_MAX_MOMENTS = 100_000
# Workers answer at once: the fake clock decides what is due, never a real wait.
_SETTINGS = RuntimeSettings(
    idle_poll=dt.timedelta(milliseconds=10),
    job_retry_delay=dt.timedelta(seconds=5),
)


@dataclass
class UserTask:
    """A QuestionnaireResponse the runtime created for a user task, still open."""

    instance: str
    user_task_id: str
    element_id: str
    form_key: str


@dataclass
class _Clock:
    now: dt.datetime

    def __call__(self) -> dt.datetime:
        return self.now


@dataclass
class _Gateway:
    """The DSF side in memory: what would be posted, completed, failed and created."""

    harness: ProcessHarness
    sent: list[OutgoingTask] = field(default_factory=list)
    outputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    user_tasks: list[UserTaskRequest] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    async def send_task(self, task: OutgoingTask) -> str:
        self.sent.append(task)
        return f"Task/sent-{len(self.sent)}"

    async def complete_task(
        self, task_id: str, *, outputs: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        self.harness._finished(task_id, "completed", outputs)

    async def fail_task(
        self, task_id: str, message: str, *, outputs: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        self.harness._finished(task_id, f"failed: {message}", outputs)

    async def create_user_task(self, request: UserTaskRequest) -> str:
        self.user_tasks.append(request)
        return f"QuestionnaireResponse/{len(self.user_tasks)}"

    async def cancel_user_task(self, user_task_id: str) -> None:
        self.cancelled.append(user_task_id)


@dataclass
class Instance:
    """One process instance, as the store holds it after the harness's last call."""

    id: str
    business_key: str
    _harness: ProcessHarness = field(repr=False)

    @property
    def state(self) -> dict[str, Any]:
        return self._harness._states[self.id]

    @property
    def status(self) -> str:
        """running, completed or failed (as the runtime stores it)."""
        return instance_state.instance_status(self.state).label

    @property
    def variables(self) -> Mapping[str, Any]:
        return instance_state.process_variables(self.state)

    @property
    def tokens(self) -> list[instance_state.TokenView]:
        """Where the instance stands: its tokens, oldest first."""
        return instance_state.tokens(self.state)

    @property
    def waiting_for(self) -> list[instance_state.Wait]:
        """What it waits for: catch events, event-based gateways and boundary events."""
        return instance_state.waiting_for(self.state)

    @property
    def incidents(self) -> list[instance_state.Incident]:
        """Executions whose job used up its retries (the instance stays running)."""
        return instance_state.incidents(self.state)


class ProcessHarness:
    """Runs the given definitions on the real runtime; use as an async context manager.

    ``services`` are what handlers reach (``HandlerContext.services``); ``now`` is where the
    fake clock starts; ``settings`` tune the runtime (retry delays, leases). As in production,
    a definition naming a handler that ``handlers`` lacks is refused; ``stub_missing=True``
    registers a stub for each instead, which fails its step if a test reaches it (for tests
    of one path through a large model).
    """

    def __init__(
        self,
        definitions: Sequence[ProcessDefinition],
        handlers: HandlerRegistry,
        *,
        now: dt.datetime | None = None,
        services: Mapping[str, object] | None = None,
        settings: RuntimeSettings | None = None,
        stub_missing: bool = False,
    ) -> None:
        self.definitions = list(definitions)
        self.handlers = handlers
        self.stub_missing = stub_missing
        self.services: Mapping[str, object] = dict(services or {})
        self.settings = settings or _SETTINGS
        self.clock = _Clock(now or _EPOCH)
        self.gateway = _Gateway(self)
        # What the DSF side saw of the Tasks taken in: status by business key, outputs by id.
        self.task_status: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.instances: dict[str, Instance] = {}
        self._states: dict[str, dict[str, Any]] = {}
        self._task_keys: dict[str, str] = {}
        self._task_ids = itertools.count(1)
        self._signals: list[str] = []
        self._database: Database | None = None
        self._runtime: ProcessRuntime | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> ProcessHarness:
        database = Database("sqlite:///:memory:")
        try:
            await upgrade_in_place(database)
            runtime = ProcessRuntime(
                database,
                self.gateway,
                owner="harness",
                clock=self.clock,
                settings=self.settings,
                services=self.services,
            )
            counted = _counted(self.handlers, self.calls)
            if self.stub_missing:
                for name in counted.missing(self.definitions):
                    counted.register(name, "stub", _stub)
            for definition in self.definitions:
                digest = hashlib.sha256(repr(definition).encode()).hexdigest()
                await runtime.deploy(definition, counted, plugin="harness", model_hash=digest)
        except BaseException:
            await database.dispose()
            raise
        self._database, self._runtime = database, runtime
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._database is not None:
            await self._database.dispose()
        self._database = self._runtime = None

    @property
    def runtime(self) -> ProcessRuntime:
        if self._runtime is None:
            raise RuntimeError("use the harness as 'async with ProcessHarness(...) as harness'")
        return self._runtime

    # -- driving --------------------------------------------------------------------------------

    async def start(
        self,
        process_key: str,
        message_name: str | None,
        *,
        business_key: str,
        variables: Mapping[str, object] | None = None,
        task_id: str | None = None,
    ) -> Instance:
        """Start an instance as a Task with ``message_name`` would (``None``: the none start
        event), then run what is due; the Task is recorded taken in (``task_status``)."""
        task_id = task_id or self._new_task(business_key)
        instance_id = await self.runtime.start(
            process_key,
            business_key=business_key,
            message_name=message_name,
            variables=variables,
            task_id=task_id,
        )
        await self.run_jobs()
        return self.instances[instance_id]

    async def message(
        self,
        message_name: str,
        *,
        business_key: str,
        correlation_key: str | None = None,
        variables: Mapping[str, object] | None = None,
        task_id: str | None = None,
        requester: str | None = None,
    ) -> Instance:
        """Deliver a Task to the waiting instance it correlates with (DSF rules: "Unable to
        correlate Task" when none or more than one waits), then run what is due.
        ``requester`` is the organization identifier of the Task's requester: a message the
        plugin accepts only from the organization asked is refused without the right one."""
        task_id = task_id or self._new_task(business_key)
        instance_id = await self.runtime.correlate(
            message_name=message_name,
            business_key=business_key,
            correlation_key=correlation_key,
            variables=variables,
            task_id=task_id,
            requester=requester,
        )
        await self.run_jobs()
        return self.instances[instance_id]

    async def complete_user_task(
        self, element_id: str, variables: Mapping[str, object] | None = None
    ) -> None:
        """Answer the open user task at ``element_id`` (its QuestionnaireResponse completed)."""
        for user_task in self.user_tasks:
            if user_task.element_id == element_id:
                await self.runtime.complete_user_task(user_task.user_task_id, variables)
                await self.run_jobs()
                return
        raise AssertionError(f"no open user task {element_id!r}")

    async def signal(self, signal_name: str) -> None:
        """Deliver a signal from outside (Camunda's ``signalEventReceived``): every instance
        waiting for it gets it, each in a step of its own; then run what is due."""
        async with self.runtime.database.transaction() as session:
            waiting = await repo.instances_waiting_for(
                session, f"{SIGNAL_SUBSCRIPTION}{signal_name}"
            )
        for instance_id in sorted(waiting):
            await self.runtime.stepper.apply(
                instance_id,
                lambda now: SignalReceived(signal_name, now),
                action="signal.received",
                reason=f"{signal_name} (from the test)",
            )
        await self.run_jobs()

    async def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``, running timers, jobs and retries at the
        moments they fall due, in order."""
        target = self.clock.now + dt.timedelta(seconds=seconds)
        for _ in range(_MAX_MOMENTS):
            await self.run_jobs()
            async with self.runtime.database.transaction() as session:
                due = await repo.next_due(session)
            if due is None or due > target:
                break
            if due <= self.clock.now:
                # Due now, yet the runtime left it (held by a lease): wait the lease out.
                due = self.clock.now + self.runtime.settings.lease
            self.clock.now = due
        else:
            raise AssertionError(f"still busy after {_MAX_MOMENTS} moments of advance()")
        self.clock.now = target
        await self.run_jobs()

    async def run_jobs(self) -> None:
        """Run what is due at the clock's time (jobs, timers, sends) until nothing is."""
        await self.runtime.run_until_idle()
        await self._refresh()

    # -- what happened ----------------------------------------------------------------------------

    @property
    def now(self) -> dt.datetime:
        return self.clock.now

    @property
    def sent(self) -> list[OutgoingTask]:
        """The Tasks posted to other sites, in order."""
        return self.gateway.sent

    @property
    def user_tasks(self) -> list[UserTask]:
        """User tasks whose QuestionnaireResponse was created and that still wait."""
        open_tasks: list[UserTask] = []
        for request in self.gateway.user_tasks:
            instance_id, _, token = request.user_task_id.partition("/")
            state = self._states.get(instance_id)
            if state is None or request.user_task_id in self.gateway.cancelled:
                continue
            element = next(
                (
                    t.element
                    for t in instance_state.tokens(state)
                    if t.id == token and t.phase is instance_state.Phase.USER_TASK
                ),
                None,
            )
            if element is not None:
                open_tasks.append(
                    UserTask(instance_id, request.user_task_id, element, request.form_key)
                )
        return open_tasks

    @property
    def signals(self) -> list[str]:
        """Signals thrown so far, in order (the runtime delivered each to its catchers)."""
        return list(self._signals)

    async def open_timers(self) -> int:
        async with self.runtime.database.transaction() as session:
            return await repo.count_timers(session)

    def handler_calls(self, name: str) -> int:
        return sum(1 for _, handler in self.calls if handler == name)

    def task_outputs(self, task_id: str) -> list[dict[str, Any]]:
        """The outputs of Task ``task_id``: those its completing or failing PUT carried, or,
        while it is still open, those handlers added (:meth:`HandlerContext.add_task_output`)."""
        if task_id in self.gateway.outputs:
            return self.gateway.outputs[task_id]
        return [o for state in self._states.values() for o in _outputs(state, task_id)]

    # -- inside ---------------------------------------------------------------------------------

    def _new_task(self, business_key: str) -> str:
        task_id = f"harness-{next(self._task_ids)}"
        self._task_keys[task_id] = business_key
        return task_id

    def _finished(self, task_id: str, status: str, outputs: Sequence[Mapping[str, Any]]) -> None:
        self.task_status[self._task_keys.get(task_id, task_id)] = status
        self.gateway.outputs[task_id] = [dict(output) for output in outputs]

    async def _refresh(self) -> None:
        async with self.runtime.database.transaction() as session:
            for record in await repo.all_instances(session):
                self._states[record.id] = record.state
                if record.id not in self.instances:
                    self.instances[record.id] = Instance(record.id, record.business_key, self)
            thrown = await reasons_of(session, "signal.thrown")
        # The effect writer's reason: "<signal> to <n> other instance(s)".
        self._signals = [reason.rsplit(" to ", 1)[0] for reason in thrown]


def _outputs(state: Mapping[str, Any], task_id: str) -> list[dict[str, Any]]:
    return task_outputs(instance_state.process_variables(state), task_id)


def _counted(handlers: HandlerRegistry, calls: list[tuple[str, str]]) -> HandlerRegistry:
    """``handlers`` with every call recorded in ``calls`` (kind, class name) first."""
    counted = HandlerRegistry()
    for name in handlers.names():
        registered = handlers.get(name)
        if registered is not None:
            counted.register(
                name, registered.kind, _recording(registered.function, registered.kind, calls)
            )
    counted.replies_only_from_recipients(*handlers.reply_only_from_recipients)
    return counted


def _recording(function: Handler, kind: str, calls: list[tuple[str, str]]) -> Handler:
    # ``wraps``: a failure's location is looked up in the handler's module through the wrapper.
    @functools.wraps(function)
    def call(ctx: HandlerContext) -> Any:
        calls.append((kind, ctx.handler))
        return function(ctx)

    return call


def _stub(ctx: HandlerContext) -> None:
    # The bridge's own error: its message, which names no patient, reaches the failed Task.
    raise ProcessExecutionError(f"handler {ctx.handler} is a stub of the test harness")
