"""Durable process execution: the runtime that puts its parts together.

Every event (a Task that starts or continues an instance, a handler's result, a timer, an async
continuation) is applied in one transaction that writes the instance's new state, its message
subscriptions, its timers, the jobs and outbox entries for the effects, and an audit event.
Nothing leaves the process before that commit; after it, workers perform the effects. The parts,
one responsibility each:

- :mod:`~dsf_bridge.runtime.deployments`: the deployed processes and their versions;
- :mod:`~dsf_bridge.runtime.delivery`: what a received Task does (start, correlate, hold);
- :mod:`~dsf_bridge.runtime.stepping`: instance stepping, the only caller of the engine;
- :mod:`~dsf_bridge.runtime.effects`: writing a step's state and the records of its effects;
- :mod:`~dsf_bridge.runtime.jobs`: the job worker (handlers, sends, continuations, signals,
  operators' requests); :mod:`~dsf_bridge.runtime.timers`: the timer worker;
  :mod:`~dsf_bridge.runtime.outbox`: the outbox worker (posts Tasks, completes and fails them);
- :mod:`~dsf_bridge.runtime.workers`: the loop around them, with a graceful stop.

Jobs and outbox entries are leased, so a crash at any point loses nothing: an expired lease is
taken over and the work done again. Handlers therefore run at least once, as in the DSF BPE
with async continuations; a Task is posted once (a repeated send first looks for the Task it
created, ``docs/reliability.md``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from dsf_bridge.engine.events import UserTaskCompleted
from dsf_bridge.engine.model import ProcessDefinition
from dsf_bridge.errors import ProcessExecutionError
from dsf_bridge.plugins.registry import HandlerRegistry
from dsf_bridge.retry import CALL_RETRY, RetryPolicy
from dsf_bridge.runtime.delivery import MessageDelivery, MessageHeldError
from dsf_bridge.runtime.deployments import DeployedProcess, Deployments
from dsf_bridge.runtime.effects import TAKEN_IN, EffectWriter
from dsf_bridge.runtime.faults import FaultHook, FaultPoint
from dsf_bridge.runtime.jobs import JobWorker
from dsf_bridge.runtime.outbox import OutboxWorker
from dsf_bridge.runtime.ports import TaskGateway
from dsf_bridge.runtime.stepping import InstanceStepper, engine_step_of
from dsf_bridge.runtime.timers import TimerWorker
from dsf_bridge.runtime.workers import (
    Dispatcher,
    WorkerLoop,
    release_leases,
    run_all,
    seal_forever,
)
from dsf_bridge.store import Database, seal_events
from dsf_bridge.store import repository as repo

__all__ = [
    "TAKEN_IN",
    "DeployedProcess",
    "FaultHook",
    "FaultPoint",
    "MessageHeldError",
    "ProcessRuntime",
    "RuntimeSettings",
]

log = structlog.get_logger("dsf_bridge.runtime")

Clock = Callable[[], dt.datetime]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class RuntimeSettings:
    """Timing of the workers; the defaults suit production, tests shorten them."""

    lease: dt.timedelta = dt.timedelta(seconds=60)
    job_retry_delay: dt.timedelta = dt.timedelta(seconds=5)
    job_retries: int = 3
    outbox_retry_delays: tuple[dt.timedelta, ...] = tuple(
        dt.timedelta(seconds=s) for s in (1, 5, 15, 60, 300)
    )
    batch: int = 20
    idle_poll: dt.timedelta = dt.timedelta(seconds=1)
    conflict_retries: int = 10
    # How many jobs and effects a bridge runs at once right after the commits that queued
    # them; work beyond it waits for a polling round (``batch`` per round).
    dispatch_limit: int = 50
    # How long a stopping worker lets its round finish before it cancels it and gives back
    # its leases (temporal's graceful shutdown: stop claiming, drain, release, exit).
    shutdown_grace: dt.timedelta = dt.timedelta(seconds=30)
    # How one call to a remote server is repeated (every adapter: FHIR, DICOMweb, inference).
    call_retry: RetryPolicy = CALL_RETRY
    # How long a start waits for the handlers it reaches before it commits: those done by
    # then commit with it, in its transaction (InstanceStepper.run_inline); 0 runs every
    # handler in a job after the commit.
    inline_handler_budget: dt.timedelta = dt.timedelta(milliseconds=50)


class ProcessRuntime:
    """Runs deployed processes durably on a :class:`Database` against a :class:`TaskGateway`."""

    def __init__(
        self,
        database: Database,
        gateway: TaskGateway,
        *,
        owner: str | None = None,
        clock: Clock = _utcnow,
        settings: RuntimeSettings | None = None,
        services: Mapping[str, object] | None = None,
    ) -> None:
        self.database = database
        self.gateway = gateway
        self.owner = owner or f"bridge-{uuid.uuid4().hex[:12]}"
        self._clock = clock
        self.settings = settings or RuntimeSettings()
        # What handlers may reach outside the engine (HandlerContext.services).
        self.services: Mapping[str, object] = dict(services or {})
        # The newest deployed version per key (what a new start without a version gets), and
        # every deployed version: instances started on 1.0 finish on 1.0 after 1.1 arrives.
        self.deployments = Deployments(database, self.owner)
        self.effects = EffectWriter(
            owner=self.owner,
            clock=clock,
            job_retries=self.settings.job_retries,
            deployments=self.deployments,
            step=engine_step_of,
            running_lease=self.settings.lease,
        )
        self._wakeup = asyncio.Event()
        # Runs the work a step queued right after its commit while the worker loop runs.
        self._dispatcher = Dispatcher(self.settings.dispatch_limit)
        self.effects.has_room = self._dispatcher.has_room
        self.stepper = InstanceStepper(self, self._wakeup)
        self.delivery = MessageDelivery(self)
        self.jobs = JobWorker(self)
        self.timers = TimerWorker(self)
        self.outbox = OutboxWorker(self)
        # Received Tasks (DSF BPE rules, :mod:`~dsf_bridge.runtime.delivery`).
        self.start = self.delivery.start
        self.deliver = self.delivery.deliver
        self.correlate = self.delivery.correlate
        self.sends_in_flight = self.delivery.sends_in_flight
        # Held replies are delivered again from here (:class:`MessageHeldError`); a listener
        # must return at once (schedule work, do not await it).
        self.on_send_resolved = self.stepper.on_send_resolved
        # The worker loop while run_forever runs (its heartbeat is the readiness check's).
        self._loop: WorkerLoop | None = None
        # Tests only (FaultPoint): called at each commit boundary.
        self.fault_hook: FaultHook | None = None

    @property
    def clock(self) -> Clock:
        return self._clock

    @clock.setter
    def clock(self, clock: Clock) -> None:
        """Tests move a runtime's time; every part of it follows."""
        self._clock = clock
        self.effects.clock = clock

    def _fault(self, point: FaultPoint, detail: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(point, detail)

    # -- deployment ---------------------------------------------------------------------------

    async def deploy(
        self,
        definition: ProcessDefinition,
        handlers: HandlerRegistry,
        *,
        plugin: str,
        model_hash: str,
    ) -> DeployedProcess:
        """Record a process definition and make it startable (:meth:`Deployments.deploy`)."""
        return await self.deployments.deploy(
            definition, handlers, plugin=plugin, model_hash=model_hash
        )

    def process(self, process_key: str, version: str | None = None) -> DeployedProcess | None:
        """The deployed ``version`` of a process, or its newest (:meth:`Deployments.process`)."""
        return self.deployments.process(process_key, version)

    def versions(self, process_key: str) -> list[str]:
        """The deployed versions of a process, oldest first."""
        return self.deployments.versions(process_key)

    async def complete_user_task(
        self, user_task_id: str, variables: Mapping[str, object] | None = None
    ) -> str:
        """A user task's QuestionnaireResponse came back completed; continue its instance."""
        instance_id, _, token = user_task_id.partition("/")
        if not token:
            raise ProcessExecutionError(f"malformed user-task-id {user_task_id!r}")
        await self.stepper.apply(
            instance_id,
            lambda now: UserTaskCompleted(token, now, dict(variables or {})),
            action="usertask.completed",
            reason=f"user task {user_task_id}",
        )
        return instance_id

    # -- workers ------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Perform what is due now: timers, jobs, outbox entries. Return how many were done.

        One transaction seals the audit events appended since the last round into the chain,
        looks for a due timer and leases the due jobs and outbox entries; then the timers fire,
        and the jobs and effects run concurrently. Work they create is left to the next round,
        which the wake-up starts at once (or, while :meth:`run_forever` runs, is run right
        after the commit that created it: :meth:`dispatch`).
        """
        now = self.clock()
        settings = self.settings
        async with self.database.transaction() as session:
            await seal_events(session)
            timer_due = bool(await repo.due_timers(session, now, limit=1))
            jobs = await repo.claim_jobs(
                session, owner=self.owner, now=now, lease=settings.lease, limit=settings.batch
            )
            entries = await repo.claim_outbox(
                session, owner=self.owner, now=now, lease=settings.lease, limit=settings.batch
            )
        if jobs or entries:
            self._fault(FaultPoint.WORK_CLAIMED, f"{len(jobs)}/{len(entries)}")
        fired, failure = 0, None
        if timer_due:
            try:
                fired = await self.timers.fire_due()
            except Exception as exc:  # the work this round leased runs all the same
                failure = exc
        try:
            await run_all(
                [
                    *self.jobs.exclusive(jobs),
                    *(self.outbox.perform(entry) for entry in entries),
                ]
            )
        except Exception:
            if failure is not None:  # raised one failure at a time: the timers' is logged
                log.warning("timer.round_failed", error=str(failure), exc_info=failure)
            raise
        if failure is not None:
            raise failure
        return fired + len(jobs) + len(entries)

    def dispatch(
        self, jobs: Sequence[repo.ClaimedJob], entries: Sequence[repo.ClaimedOutboxEntry]
    ) -> None:
        """Run jobs and outbox entries a commit queued leased to this runtime, now, beside the
        worker loop's rounds (only while :meth:`run_forever` runs: the effect writer leases
        them only then)."""
        if not jobs and not entries:
            return
        self._fault(FaultPoint.WORK_CLAIMED, f"{len(jobs)}/{len(entries)}")
        if not self._dispatcher.open:
            # Stopped: a handler a start called before its commit would run on for no job
            # that awaits it. Its lease is given back with the others, or, if they were
            # given back already, by the stopping bridge's last look (release_leases).
            for job in jobs:
                if job.running is not None:
                    job.running.cancel()
        for work in (*self.jobs.exclusive(jobs), *(self.outbox.perform(e) for e in entries)):
            if not self._dispatcher.spawn(work):
                self._wakeup.set()  # stopping: the leases are given back at the end

    async def run_until_idle(self, max_rounds: int = 10_000) -> int:
        """Work until nothing is due (tests, the demo); return the number of items done."""
        total = 0
        for _ in range(max_rounds):
            done = await self.run_once()
            if done == 0:
                return total
            total += done
        raise ProcessExecutionError(f"still busy after {max_rounds} rounds")

    async def run_forever(self, stop: asyncio.Event) -> None:
        """The worker loop of the daemon until ``stop`` (:class:`WorkerLoop`: rounds of
        :meth:`run_once`, a graceful stop that drains, then gives every lease back)."""
        self._loop = WorkerLoop(
            self.run_once,
            database=self.database,
            owner=self.owner,
            wakeup=self._wakeup,
            idle_poll=self.settings.idle_poll,
            grace=self.settings.shutdown_grace,
            clock=self.clock,
            dispatcher=self._dispatcher,
        )
        # From now on a step's jobs and effects due at once are queued leased to this bridge
        # and run right after the commit, without a polling round to find them.
        self.effects.lease = self.settings.lease
        stopping = asyncio.ensure_future(self._no_more_leasing(stop))
        sealing = asyncio.ensure_future(
            seal_forever(self.database, stop, self.settings.idle_poll.total_seconds())
        )
        try:
            await self._loop.run(stop)
        finally:
            stopping.cancel()
            sealing.cancel()
            await asyncio.gather(sealing, return_exceptions=True)
            self.effects.lease = None

    async def release_leases(self) -> int:
        """Give back every lease this runtime holds, once more after :meth:`run_forever`
        ended (which gives them back too): a start whose commit came after that (the intake
        drains after the worker loop) leased its job or effect to this runtime, which no
        longer runs it; without this, the next bridge waits for the lease to run out."""
        return await release_leases(self.database, self.owner)

    async def _no_more_leasing(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.effects.lease = None

    @property
    def heartbeat(self) -> dt.datetime | None:
        """When the worker loop last began a round: the readiness check's sign of life."""
        return None if self._loop is None else self._loop.heartbeat

    async def _run_due_jobs(self) -> int:
        """One round of due jobs alone (tests): :meth:`JobWorker.run_due`."""
        return await self.jobs.run_due()
