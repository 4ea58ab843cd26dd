"""An in-memory harness that runs process definitions with their handlers, for plugin tests.

It performs the engine's effects the simple way (handlers called inline, sent Tasks recorded,
timers kept in a list and fired by :meth:`ProcessHarness.advance`) with a fake clock. With
``roundtrip_json=True`` every instance state is written to JSON and read back after every
step, as the runtime does when it stores states in SQL: a test that passes that way proves the
process survives a restart at any point.

The production runtime lives elsewhere; this harness is for process developers' unit tests,
our scenario tests and the benchmark.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from dsf_bridge.dsf.tasks import task_outputs
from dsf_bridge.engine import state as instance_state
from dsf_bridge.engine.correlation import correlate, message_subscriptions
from dsf_bridge.engine.events import (
    CallHandler,
    CancelTimer,
    CancelUserTask,
    CompleteTasks,
    CreateQuestionnaireResponse,
    Effect,
    Event,
    FailTasks,
    HandlerCompleted,
    HandlerFailed,
    JobDue,
    MessageReceived,
    ProcessCompleted,
    ProcessFailed,
    ScheduleJob,
    SendTask,
    SignalReceived,
    Start,
    StartTimer,
    ThrowSignal,
    TimerFired,
    UserTaskCompleted,
)
from dsf_bridge.engine.interpreter import step
from dsf_bridge.engine.model import ProcessDefinition
from dsf_bridge.plugins.invocation import context_for
from dsf_bridge.plugins.registry import BpmnError, HandlerContext, HandlerRegistry, SendContext

__all__ = ["Instance", "ProcessHarness", "SentTask"]


@dataclass
class SentTask:
    """A Task a send element produced: what the runtime would POST to the target."""

    instance: int
    element_id: str
    instantiates_canonical: str
    message_name: str
    profile: str
    business_key: str
    correlation_key: str | None
    target: Mapping[str, object] | None
    inputs: list[dict[str, object]]


@dataclass
class Instance:
    """One process instance the harness runs."""

    id: int
    definition: ProcessDefinition
    state: dict[str, Any]
    history: list[str] = field(default_factory=list)

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


@dataclass
class _Timer:
    timer_id: str
    instance: int
    due: datetime


@dataclass
class _UserTask:
    instance: int
    token: str
    element_id: str
    form_key: str


class ProcessHarness:
    """Runs instances of the given definitions in memory against a handler registry."""

    def __init__(
        self,
        definitions: list[ProcessDefinition],
        handlers: HandlerRegistry,
        *,
        now: datetime | None = None,
        roundtrip_json: bool = False,
        services: Mapping[str, object] | None = None,
    ) -> None:
        self.services: Mapping[str, object] = dict(services or {})
        self.definitions = {definition.key: definition for definition in definitions}
        self.handlers = handlers
        self.now = now or datetime(2026, 1, 1, tzinfo=UTC)
        self.roundtrip_json = roundtrip_json
        self.instances: dict[int, Instance] = {}
        self.sent: list[SentTask] = []
        self.timers: list[_Timer] = []
        self.user_tasks: list[_UserTask] = []
        self.signals: list[str] = []
        self.task_status: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.max_state_bytes = 0
        self._jobs: list[tuple[datetime, int, str]] = []
        self._queue: deque[tuple[Instance, Effect]] = deque()
        self._next = 1
        self._draining = False

    # -- driving ------------------------------------------------------------------------------

    def start(
        self,
        process_key: str,
        message_name: str | None,
        *,
        business_key: str,
        variables: Mapping[str, object] | None = None,
    ) -> Instance:
        definition = self.definitions[process_key]
        instance = Instance(self._next, definition, {})
        self._next += 1
        self.instances[instance.id] = instance
        self._apply(instance, None, Start(message_name, business_key, self.now, variables or {}))
        self.run_jobs()
        return instance

    def message(
        self,
        message_name: str,
        *,
        business_key: str,
        correlation_key: str | None = None,
        variables: Mapping[str, object] | None = None,
        task_id: str | None = None,
    ) -> Instance:
        """Deliver a Task to the waiting instance it correlates with (DSF rules)."""
        candidates = [
            (instance.id, message_subscriptions(instance.state))
            for instance in self.instances.values()
        ]
        instance_id, subscription = correlate(
            candidates,
            message_name=message_name,
            business_key=business_key,
            correlation_key=correlation_key,
            task_id=task_id,
        )
        instance = self.instances[instance_id]
        event = MessageReceived(
            message_name,
            self.now,
            correlation_key,
            variables or {},
            subscription.token,
            task_id,
        )
        self._apply(instance, instance.state, event)
        self.run_jobs()
        return instance

    def signal(self, signal_name: str) -> None:
        for instance in list(self.instances.values()):
            if instance_state.is_running(instance.state):
                self._apply(instance, instance.state, SignalReceived(signal_name, self.now))
        self.run_jobs()

    def complete_user_task(
        self, element_id: str, variables: Mapping[str, object] | None = None
    ) -> None:
        for user_task in self.user_tasks:
            if user_task.element_id == element_id:
                self.user_tasks.remove(user_task)
                instance = self.instances[user_task.instance]
                event = UserTaskCompleted(user_task.token, self.now, variables or {})
                self._apply(instance, instance.state, event)
                self.run_jobs()
                return
        raise AssertionError(f"no open user task {element_id!r}")

    def advance(self, seconds: float) -> None:
        """Move the clock forward, firing due timers and jobs in due order."""
        target = self.now + timedelta(seconds=seconds)
        while True:
            self.run_jobs()
            timers = [timer for timer in self.timers if timer.due <= target]
            jobs = [job for job in self._jobs if job[0] <= target]
            next_timer = min(timers, key=lambda t: t.due, default=None)
            next_job = min(jobs, key=lambda j: j[0], default=None)
            if next_job is not None and (next_timer is None or next_job[0] <= next_timer.due):
                self.now = max(self.now, next_job[0])
                continue  # run_jobs at the top of the loop runs it
            if next_timer is None:
                break
            self.timers.remove(next_timer)
            self.now = max(self.now, next_timer.due)
            instance = self.instances[next_timer.instance]
            self._apply(instance, instance.state, TimerFired(next_timer.timer_id, self.now))
        self.now = target

    def run_jobs(self) -> None:
        """Run due async continuations (in due order) until none is due."""
        while True:
            due = [job for job in self._jobs if job[0] <= self.now]
            if not due:
                return
            job = min(due, key=lambda j: j[0])
            self._jobs.remove(job)
            _, instance_id, token = job
            instance = self.instances[instance_id]
            self._apply(instance, instance.state, JobDue(token, self.now))

    # -- effects ------------------------------------------------------------------------------

    def _apply(self, instance: Instance, state: dict[str, Any] | None, event: Event) -> None:
        result = step(instance.definition, state, event)
        new_state = result.state
        text = instance_state.dumps(new_state)
        if self.roundtrip_json:
            new_state = instance_state.loads(text)
        instance.state = new_state
        self.max_state_bytes = max(self.max_state_bytes, len(text))
        instance.history.append(type(event).__name__)
        # Effects run in the order the engine emitted them, breadth first: a handler's own
        # effects queue up behind those of the step that called it.
        self._queue.extend((instance, effect) for effect in result.effects)
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue:
                queued_instance, effect = self._queue.popleft()
                self._perform(queued_instance, effect)
        finally:
            self._draining = False

    def _perform(self, instance: Instance, effect: Effect) -> None:
        if isinstance(effect, CallHandler):
            self.calls.append((effect.kind, effect.handler))
            context = context_for(effect, self.services)
            self._call(instance, effect.token, effect.handler, context)
        elif isinstance(effect, SendTask):
            self.calls.append(("send", effect.handler))
            send = context_for(effect, self.services)
            assert isinstance(send, SendContext)  # noqa: S101 - context_for's contract
            if self._call(instance, effect.token, effect.handler, send):
                self.sent.append(
                    SentTask(
                        instance.id,
                        effect.element_id,
                        send.instantiates_canonical,
                        send.message_name,
                        send.profile,
                        send.business_key,
                        send.correlation_key,
                        send.target,
                        send.inputs,
                    )
                )
        elif isinstance(effect, StartTimer):
            self.timers.append(_Timer(effect.timer_id, instance.id, effect.due))
        elif isinstance(effect, CancelTimer):
            self.timers = [t for t in self.timers if t.timer_id != effect.timer_id]
        elif isinstance(effect, ScheduleJob):
            self._jobs.append((effect.due, instance.id, effect.token))
        elif isinstance(effect, CreateQuestionnaireResponse):
            self.user_tasks.append(
                _UserTask(instance.id, effect.token, effect.element_id, effect.form_key)
            )
        elif isinstance(effect, CancelUserTask):
            self.user_tasks = [
                u
                for u in self.user_tasks
                if not (u.instance == instance.id and u.token == effect.token)
            ]
        elif isinstance(effect, ThrowSignal):
            self.signals.append(effect.signal_name)
        elif isinstance(effect, CompleteTasks):
            self.task_status[effect.business_key] = "completed"
        elif isinstance(effect, FailTasks):
            self.task_status[effect.business_key] = f"failed: {effect.message}"
        elif isinstance(effect, ProcessCompleted | ProcessFailed):
            pass  # the state says so already; the runtime uses these to update its indexes

    def _call(self, instance: Instance, token: str, name: str, context: HandlerContext) -> bool:
        registered = self.handlers.get(name)
        event: Event
        ok = False
        if registered is None:
            event = HandlerFailed(token, self.now, None, f"no handler registered for {name!r}")
        else:
            try:
                outcome = registered.function(context)
                if inspect.isawaitable(outcome):
                    asyncio.run(_await(outcome))
            except BpmnError as exc:
                event = HandlerFailed(
                    token, self.now, exc.code, exc.message, variables=context.updates
                )
            except Exception as exc:
                # As the runtime: Task outputs added before the failure are kept.
                event = HandlerFailed(
                    token,
                    self.now,
                    None,
                    f"{type(exc).__name__}: {exc}",
                    variables=context.task_output_updates,
                )
            else:
                ok = True
                event = HandlerCompleted(token, self.now, context.updates, context.local_updates)
        self._apply(instance, instance.state, event)
        return ok

    # -- queries ------------------------------------------------------------------------------

    def open_timers(self) -> int:
        return len(self.timers)

    def handler_calls(self, name: str) -> int:
        return sum(1 for _, handler in self.calls if handler == name)

    def task_outputs(self, task_id: str) -> list[dict[str, Any]]:
        """The outputs handlers added for Task ``task_id``
        (:meth:`HandlerContext.add_task_output`), which the runtime writes with the PUT that
        completes or fails the Task."""
        return [o for i in self.instances.values() for o in task_outputs(i.variables, task_id)]


async def _await(awaitable: Any) -> None:
    await awaitable
