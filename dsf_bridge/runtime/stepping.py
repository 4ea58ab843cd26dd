"""Instance stepping: the one caller of the engine.

Every event reaches an instance here (:meth:`InstanceStepper.create` for a start,
:meth:`InstanceStepper.write` for any later event, :meth:`InstanceStepper.apply` for an event
in a transaction of its own): the engine steps, the audit event is appended, the new state and
the records of the effects are written (:class:`~dsf_bridge.runtime.effects.EffectWriter`),
all in one transaction. After the commit (:meth:`InstanceStepper.committed`) the workers are
woken for the new work and the listeners told that a send may have resolved.

Instances are updated with optimistic locking; a lost race is replayed on the fresh state.

Every record logged while an instance steps (and by the handlers it calls) carries the step's
context, :func:`step_context`: process key and version, instance id, business key, the Task
being served and the element.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import structlog

from dsf_bridge.engine import state as instance_state
from dsf_bridge.engine.events import CallHandler, Event, Start
from dsf_bridge.engine.interpreter import Step
from dsf_bridge.engine.interpreter import step as engine_step
from dsf_bridge.engine.model import ProcessDefinition
from dsf_bridge.errors import ConcurrencyError, ProcessExecutionError
from dsf_bridge.logs import bound_context
from dsf_bridge.plugins.invocation import Invocation
from dsf_bridge.runtime.deployments import DeployedProcess
from dsf_bridge.runtime.effects import EffectWriter, InlineCall, StepRecord, created_here
from dsf_bridge.runtime.faults import FaultPoint, InstanceGoneError
from dsf_bridge.store import Records, Session, append_event, instance_record, state_digest
from dsf_bridge.store import repository as repo

if TYPE_CHECKING:
    from dsf_bridge.runtime.processes import ProcessRuntime

__all__ = ["InstanceStepper", "engine_step_of", "step_context", "task_id_of"]

log = structlog.get_logger("dsf_bridge.runtime")


def engine_step_of(
    definition: ProcessDefinition, state: Mapping[str, Any] | None, event: Event
) -> Step:
    """The engine's step: the only call of :func:`dsf_bridge.engine.interpreter.step` in the
    runtime (the effect writer steps a signal an instance throws to itself through it too)."""
    return engine_step(definition, state, event)


@contextmanager
def step_context(
    deployed: DeployedProcess,
    *,
    instance_id: str | None = None,
    business_key: str | None = None,
    task_id: str | None = None,
    element_id: str | None = None,
) -> Iterator[None]:
    """Bind the log context of a step of ``deployed``'s instance (values left ``None`` keep an
    outer binding: the Task bound at intake stays on the records of the step it causes)."""
    definition = deployed.definition
    if task_id is not None and structlog.contextvars.get_contextvars().get("task_id"):
        task_id = None  # the Task being taken in (intake's) is the one this step serves
    with bound_context(
        process=definition.key,
        process_version=definition.version_tag,
        instance_id=instance_id,
        business_key=business_key,
        task_id=task_id,
        element_id=element_id,
    ):
        yield


def task_id_of(variables: Mapping[str, Any]) -> str | None:
    """The id of the Task an instance serves now: the last one delivered to it (its ``task``
    variable, :func:`~dsf_bridge.runtime.intake.task_variables`), if a Task started it."""
    task = variables.get("task")
    task_id = task.get("id") if isinstance(task, Mapping) else None
    return task_id if isinstance(task_id, str) and task_id else None


# Most handler steps one transaction takes (run_inline): a loop of service tasks without a
# wait state commits every so many.
_MOST_INLINE_STEPS = 20


@dataclass(frozen=True)
class InlineStep:
    """A handler run before its step's transaction: the call, its outcome, the engine's step
    of the outcome, and when it was called and returned (``time.perf_counter()``)."""

    call: CallHandler
    outcome: Invocation
    result: Step
    started: float
    ended: float


@dataclass
class InlineRun:
    """What :meth:`InstanceStepper.run_inline` ran: the handler steps to write after the
    first step, in order, and the call still under way when its budget ran out."""

    steps: list[InlineStep] = field(default_factory=list)
    running: InlineCall | None = None

    def call_of(self, position: int) -> InlineCall | None:
        """The inline call of the step at ``position`` (0: the first step, ``i``: the step
        of ``steps[i - 1]``)."""
        if position < len(self.steps):
            return InlineCall(self.steps[position].call.token)
        return self.running if position == len(self.steps) else None

    def cancel(self) -> None:
        """The steps were not written: stop the call still under way (no job awaits it)."""
        if self.running is not None and self.running.running is not None:
            self.running.running.cancel()

    def handed_over(self) -> InlineRun:
        """The first handler's outcome handed to its job instead of written here: the start
        as it would be without inline calls, its handler called once already (``steps`` is
        not empty)."""
        first = self.steps[0]
        done: asyncio.Future[Invocation] = asyncio.get_running_loop().create_future()
        done.set_result(first.outcome)
        self.cancel()
        return InlineRun(running=InlineCall(first.call.token, done, first.started))


class InstanceStepper:
    """Steps the instances of ``runtime`` (its store, clock, deployments and effect writer)."""

    def __init__(self, runtime: ProcessRuntime, wakeup: asyncio.Event) -> None:
        self.runtime = runtime
        self.wakeup = wakeup
        self._send_listeners: list[Callable[[], None]] = []

    @property
    def effects(self) -> EffectWriter:
        return self.runtime.effects

    # -- inside the caller's transaction --------------------------------------------------------

    async def create(
        self,
        session: Session,
        deployed: DeployedProcess,
        *,
        instance_id: str,
        business_key: str,
        event: Start,
        actor: str,
        action: str,
        reason: str,
        before_audit: Callable[[], Awaitable[Records | None]] | None = None,
        unless_running: bool = False,
        result: Step | None = None,
        inline: InlineCall | None = None,
        then: Sequence[Step] = (),
    ) -> StepRecord:
        """A new instance from its start event; ``before_audit`` writes what caused it (the
        Task taken in) before the audit event, and returns the records of the rows it wrote.
        ``unless_running``: :class:`~dsf_bridge.store.repository.InstanceRunningError` instead
        when a running instance of the process has the business key. ``result``: the engine's
        step of ``event``, when the caller took it already; ``inline``: its handler call that
        the caller ran (:meth:`run_inline`). ``then``: the steps the caller writes next in
        this transaction (with ``row_written``): the instance's row is inserted as it stands
        after them, once, instead of inserted and then updated by each."""
        if result is None:
            result = engine_step_of(deployed.definition, None, event)
        self.effects.created(session, instance_id)
        status = instance_state.instance_status(result.state).label
        row = then[-1].state if then else result.state
        await repo.create_instance(
            session,
            instance_id=instance_id,
            definition_id=deployed.definition_id,
            business_key=business_key,
            status=instance_state.instance_status(row).label,
            state=row,
            now=event.now,
            unless_running=unless_running,
            version=1 + len(then),
        )
        # The instance as its start left it, for the steps written after it.
        record = repo.InstanceRecord(
            instance_id, deployed.definition_id, business_key, status, result.state, 1
        )
        self.runtime.deployments.remember(instance_id, deployed.definition_id)
        digest = state_digest(result.state)
        described = instance_record(
            instance_id,
            process=deployed.audited_process,
            business_key=business_key,
            status=status,
            version=record.version,
            state_digest=digest,
        )
        if before_audit is not None:
            described.update(await before_audit() or {})
        await append_event(
            session,
            actor=actor,
            subject=f"instance/{instance_id}",
            action=action,
            reason=reason,
            payload_digest=digest,
            record=described,
        )
        pending = await self.effects.write(
            session, deployed, record, result, fresh=True, inline=inline
        )
        self.runtime._fault(FaultPoint.STEP_WRITTEN, action)
        return pending

    async def write(
        self,
        session: Session,
        deployed: DeployedProcess,
        record: repo.InstanceRecord,
        event: Event,
        *,
        actor: str,
        action: str,
        reason: str,
        failed_action: str | None = None,
        before_audit: Callable[[], Awaitable[Records | None]] | None = None,
        job_id: int | None = None,
        result: Step | None = None,
        inline: InlineCall | None = None,
        row_written: bool = False,
    ) -> StepRecord:
        """Step an existing instance by ``event``. A step the engine undid (a handler's
        technical error) is audited as ``failed_action`` with the error, when given.
        ``job_id``: the job leased to this runtime whose step this is, removed in the same
        transaction (:class:`ConcurrencyError` when its lease was lost). ``result`` and
        ``inline`` as for :meth:`create`; ``row_written``: :meth:`create` wrote the
        instance's row as it stands after this step already (its ``then``)."""
        with step_context(
            deployed,
            instance_id=record.id,
            business_key=record.business_key,
            task_id=task_id_of(instance_state.process_variables(record.state)),
        ):
            if result is None:
                result = engine_step_of(deployed.definition, record.state, event)
            digest = state_digest(result.state)
            # The row as the effect writer saves it (a signal the instance throws to itself
            # steps it once more: that event records the row again).
            described = instance_record(
                record.id,
                process=deployed.audited_process,
                business_key=record.business_key,
                status=instance_state.instance_status(result.state).label,
                version=record.version + 1,
                state_digest=digest,
            )
            if before_audit is not None:
                described.update(await before_audit() or {})
            undone = failed_action is not None and result.error
            await append_event(
                session,
                actor=actor,
                subject=f"instance/{record.id}",
                action=failed_action if undone and failed_action else action,
                reason=f"{reason}: {result.error}" if undone else reason,
                payload_digest=digest,
                record=described,
            )
            pending = await self.effects.write(
                session, deployed, record, result, inline=inline, row_written=row_written
            )
            owner = self.runtime.owner
            if pending.status != "running":
                # Camunda deletes an ended execution's jobs: a sibling's handler or send that
                # is still queued (a parallel multi-instance) never runs. With the job of this
                # step, in one statement.
                fresh = created_here(session, record.id)
                if job_id is not None:
                    await repo.complete_job_ending(session, job_id, owner, record.id)
                elif fresh is None or fresh.jobs:  # an instance created here has no others
                    await repo.delete_jobs_of(session, record.id)
                pending.jobs.clear()
            elif job_id is not None:
                await repo.complete_job(session, job_id, owner)
            self.runtime._fault(FaultPoint.STEP_WRITTEN, action)
        return pending

    # -- before the transaction ---------------------------------------------------------------

    def inline_call(self, result: Step) -> CallHandler | None:
        """The handler call :meth:`run_inline` may run before ``result`` is written: its only
        effect, while the runtime runs work right after commits (its worker loop is on and has
        room) and the budget is not 0."""
        runtime = self.runtime
        if (
            runtime.settings.inline_handler_budget <= dt.timedelta(0)
            or len(result.effects) != 1
            or not isinstance(result.effects[0], CallHandler)
            or self.effects.leased(runtime.clock()) is None
        ):
            return None
        return result.effects[0]

    async def run_inline(self, deployed: DeployedProcess, first: Step) -> InlineRun:
        """Run the handler of ``first`` (see :meth:`inline_call`), and of each step its outcome
        takes, before the step is written: as Camunda runs a synchronous service task in the
        transaction that reached it, so that a start and its handlers commit once instead of
        once per handler. Within the runtime's ``inline_handler_budget``: a handler still
        running then goes on, and its job, written leased to this runtime, awaits it after
        the commit instead of calling it again. An outcome the engine refuses is left to the
        job too, which takes it as it takes any handler's; a call that failed outside the
        handler (its variables are no JSON) ends the chain before it. Cancelled, it cancels
        the call under way."""
        run = InlineRun()
        jobs = self.runtime.jobs
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.runtime.settings.inline_handler_budget.total_seconds()
        call = self.inline_call(first)
        state = first.state
        while call is not None:
            started = time.perf_counter()
            with bound_context(element_id=call.element_id):  # the call's task copies it
                running = asyncio.ensure_future(jobs.call_handler(deployed, call))
            try:
                done, _ = await asyncio.wait({running}, timeout=max(0.0, deadline - loop.time()))
            except BaseException:
                running.cancel()
                raise
            if not done:
                run.running = InlineCall(call.token, running, started)
                return run
            error = running.exception()
            if error is not None:
                if not isinstance(error, Exception):
                    raise error  # a kill goes on
                return run  # failed outside the handler: its job calls it

            outcome = running.result()
            try:
                follow = engine_step_of(deployed.definition, state, outcome.event)
            except ProcessExecutionError:
                run.running = InlineCall(call.token, running, started)
                return run
            run.steps.append(InlineStep(call, outcome, follow, started, time.perf_counter()))
            state = follow.state
            call = self.inline_call(follow) if len(run.steps) < _MOST_INLINE_STEPS else None
        return run

    # -- a transaction of its own -----------------------------------------------------------------

    async def apply(
        self,
        instance_id: str,
        make_event: Callable[[dt.datetime], Event],
        *,
        action: str,
        reason: str,
        job_id: int | None = None,
        unless: Callable[[Session, repo.InstanceRecord], Awaitable[bool]] | None = None,
        also: Callable[[Session], Awaitable[None]] | None = None,
        actor: str | None = None,
        known: repo.InstanceRecord | None = None,
    ) -> None:
        """Apply one event to an instance in one transaction, replaying on lost races.

        ``unless`` sees the instance in that transaction first; when it answers ``True`` it has
        dealt with the job itself and no step is taken. ``also`` writes in the same transaction
        (the record of the effect that caused the event). ``actor`` names who caused it in the
        audit event (an operator); the bridge itself by default. An undone job step is audited
        ``job.failed`` (retried later, or parked as an incident). ``known``: the instance as
        the commit that queued the job left it, stepped at the first try instead of reading
        it (not with ``unless``, which must judge the instance as it is); a version moved
        meanwhile fails the save, and the next try reads the instance.
        """
        runtime = self.runtime
        if unless is not None or (known is not None and known.id != instance_id):
            known = None
        for _ in range(runtime.settings.conflict_retries):
            now = runtime.clock()
            try:
                async with runtime.database.transaction() as session:
                    record = known or await repo.load_instance(session, instance_id)
                    known = None  # a replay reads the instance
                    if record is None:
                        raise InstanceGoneError(f"instance {instance_id} does not exist")
                    if unless is not None and await unless(session, record):
                        return
                    pending = await self.write(
                        session,
                        runtime.deployments.of_record(record),
                        record,
                        make_event(now),
                        actor=actor or runtime.owner,
                        action=action,
                        reason=reason,
                        failed_action="job.failed",
                        job_id=job_id,
                    )
                    if also is not None:
                        await also(session)
            except ConcurrencyError:
                continue
            self.committed(pending, action)
            return
        raise ConcurrencyError(f"instance {instance_id} kept changing")

    # -- after the commit -----------------------------------------------------------------------

    def committed(self, pending: StepRecord, action: str) -> None:
        """The step's transaction committed: wake the workers for its effects, tell the
        listeners a send may have resolved, log incidents and the step."""
        self.runtime._fault(FaultPoint.STEP_COMMITTED, action)
        if pending.for_rounds:  # a round finds the rest (timers, others' signals)
            self.wakeup.set()
        jobs = pending.jobs
        if jobs and pending.instance is not None:
            # The first job runs on the instance as this step saved it, without reading it.
            jobs = [replace(jobs[0], instance=pending.instance), *jobs[1:]]
        self.runtime.dispatch(jobs, pending.outbox)
        self.sends_resolved()
        with bound_context(**pending.log_context):
            for element, message in pending.incidents:  # an operator retries or cancels it
                log.error("incident.created", element_id=element, error=message)
            if pending.failure is not None:
                log.error("instance.failed", error=pending.failure)
            log.info(
                "instance.stepped",
                instance_id=pending.instance_id,
                status=pending.status,
                effects=pending.effects,
            )

    def on_send_resolved(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every commit that may have resolved a send."""
        self._send_listeners.append(listener)

    def sends_resolved(self) -> None:
        for listener in self._send_listeners:
            listener()
