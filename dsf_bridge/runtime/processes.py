"""Durable process execution: engine steps, persisted through the store, effects after commit.

Every event (a Task that starts or continues an instance, a handler's result, a timer, an async
continuation) is applied in one transaction that writes the instance's new state, its message
subscriptions, its timers, the jobs and outbox entries for the effects, and an audit event.
Nothing leaves the process before that commit; after it, workers perform the effects:

- ``handler`` jobs run a service task's or listener's Python handler, then feed the result back;
- ``send`` jobs run a message send handler and queue the Task in the outbox; the outbox worker
  posts it and only then lets the instance move on;
- ``continue`` jobs are async continuations and retries (``failedJobRetryTimeCycle``);
- outbox entries complete or fail the instance's Tasks and create user tasks.

Jobs and outbox entries are leased, so a crash at any point loses nothing: an expired lease is
taken over and the work done again. Handlers therefore run at least once, as in the DSF BPE
with async continuations; a Task is posted once unless the process dies after the remote server
accepted it and before the commit that records it (the outbox's unavoidable window).

Instances are updated with optimistic locking; a lost race is replayed on the fresh state.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import structlog

from dsf_bridge.engine import state as instance_state
from dsf_bridge.engine.correlation import (
    correlate,
    message_subscriptions,
)
from dsf_bridge.engine.events import (
    Event,
    MessageReceived,
    Start,
    TimerFired,
    UserTaskCompleted,
)
from dsf_bridge.engine.exceptions import CorrelationError
from dsf_bridge.engine.interpreter import step
from dsf_bridge.engine.model import ProcessDefinition
from dsf_bridge.errors import ConcurrencyError, ProcessExecutionError
from dsf_bridge.logs import bound_context
from dsf_bridge.plugins.registry import HandlerRegistry
from dsf_bridge.retry import CALL_RETRY, RetryPolicy
from dsf_bridge.runtime.deployments import DeployedProcess, Deployments
from dsf_bridge.runtime.effects import (
    TAKEN_IN,
    EffectWriter,
    StepRecord,
)
from dsf_bridge.runtime.faults import FaultHook, FaultPoint, InstanceGoneError
from dsf_bridge.runtime.jobs import JobWorker
from dsf_bridge.runtime.outbox import OutboxWorker
from dsf_bridge.runtime.ports import TaskGateway
from dsf_bridge.runtime.workers import WorkerLoop, run_all
from dsf_bridge.store import Database, Session, append_event
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
    # How long a stopping worker lets its round finish before it cancels it and gives back
    # its leases (temporal's graceful shutdown: stop claiming, drain, release, exit).
    shutdown_grace: dt.timedelta = dt.timedelta(seconds=30)
    # How one call to a remote server is repeated (every adapter: FHIR, DICOMweb, inference).
    call_retry: RetryPolicy = CALL_RETRY


class _InstanceWaitingError(Exception):
    """Raised inside ``start(unless_running=True)``: an instance has the business key."""


class MessageHeldError(Exception):
    """A reply arrived while a send of the instance it is for is still unresolved.

    The reply may have overtaken the commit that records its own request as sent (a fast
    remote site, or a crash after the remote server accepted the request). It is neither
    correlated nor refused now: the caller keeps it durably and delivers it again once the
    send resolves (:meth:`ProcessRuntime.on_send_resolved`).
    """

    def __init__(self, business_key: str) -> None:
        super().__init__(f"a send of the instance with business-key {business_key!r} is unresolved")
        self.business_key = business_key


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
        self.outbox = OutboxWorker(self)
        self.jobs = JobWorker(self)
        self.effects = EffectWriter(
            owner=self.owner,
            clock=clock,
            job_retries=self.settings.job_retries,
            deployments=self.deployments,
        )
        self._wakeup = asyncio.Event()
        self._send_listeners: list[Callable[[], None]] = []
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

    # -- events from outside ------------------------------------------------------------------

    async def start(
        self,
        process_key: str,
        *,
        business_key: str,
        message_name: str | None = None,
        variables: Mapping[str, object] | None = None,
        task_id: str | None = None,
        task_version: str = "1",
        actor: str = "local",
        claimed_version: str | None = None,
        unless_running: bool = False,
        version: str | None = None,
    ) -> str:
        """Start an instance (by message start event, or the none start event); return its id.

        ``claimed_version``: the Task version intake claimed, marked taken in by the same
        commit. ``unless_running``: raise :class:`_InstanceWaitingError` instead when a running
        instance of this process has the business key (the DSF BPE then correlates), checked
        in the same transaction.
        """
        deployed = self.process(process_key, version)
        if deployed is None:
            raise ProcessExecutionError(
                f"Process not found: {process_key!r}"
                + (f" version {version}" if version else "")
                + " is not deployed"
            )
        instance_id = str(uuid.uuid4())
        now = self.clock()
        event = Start(message_name, business_key, now, dict(variables or {}))
        with bound_context(instance_id=instance_id, business_key=business_key, process=process_key):
            async with self.database.transaction() as session:
                if unless_running and await repo.running_with_business_key(
                    session, deployed.definition_id, business_key
                ):
                    raise _InstanceWaitingError
                result = step(deployed.definition, None, event)
                self.deployments.remember(instance_id, deployed.definition_id)
                record = await repo.create_instance(
                    session,
                    instance_id=instance_id,
                    definition_id=deployed.definition_id,
                    business_key=business_key,
                    status=instance_state.instance_status(result.state).label,
                    state=result.state,
                    now=now,
                )
                if task_id is not None:
                    await self.effects.record_incoming(
                        session, task_id, task_version, instance_id, claimed_version
                    )
                await append_event(
                    session,
                    actor=actor,
                    subject=f"instance/{instance_id}",
                    action="instance.started",
                    reason=f"{process_key} by {message_name or 'none start event'}"
                    + (f", Task/{task_id}" if task_id else ""),
                    payload=result.state,
                )
                pending = await self.effects.write(session, deployed, record, result, fresh=True)
                self._fault(FaultPoint.STEP_WRITTEN, "instance.started")
            self._fault(FaultPoint.STEP_COMMITTED, "instance.started")
            self._after_commit(pending)
        return instance_id

    async def deliver(
        self,
        process_key: str,
        *,
        message_name: str,
        business_key: str | None,
        correlation_key: str | None = None,
        variables: Mapping[str, object] | None = None,
        task_id: str | None = None,
        task_version: str = "1",
        actor: str = "remote",
        claimed_version: str | None = None,
        version: str | None = None,
        requester: str | None = None,
    ) -> str:
        """The DSF BPE's rule for a received Task (``TaskHandler.onMessage``): when a running
        instance of ``process_key`` has the Task's business key, the message goes to its
        waiting execution ("Unable to correlate Task" when none waits), never to a new
        instance; otherwise a message start event starts one with that business key ("Process
        with start message-name ... not found" when the message starts none).
        ``claimed_version`` is the Task version intake claimed: the commit that takes the
        message in also marks that claim taken in (:data:`TAKEN_IN`).

        Raises :class:`MessageHeldError` instead of "Unable to correlate" while a send of the
        instance is unresolved (the reply may have overtaken it). ``requester`` is the
        organization identifier of the Task's requester, for plugins that accept replies only
        from the organizations they asked (:meth:`HandlerRegistry.replies_only_from_recipients`).
        """
        deployed = self.process(process_key, version)
        if deployed is None:
            raise ProcessExecutionError(
                f"Process not found: {process_key!r}"
                + (f" version {version}" if version else "")
                + " is not deployed"
            )
        version = deployed.definition.version_tag or ""
        starts = message_name in deployed.definition.message_starts
        if starts:
            # The common case in one transaction: no instance has the business key, so the
            # message starts one.
            try:
                return await self.start(
                    process_key,
                    business_key=business_key or str(uuid.uuid4()),
                    message_name=message_name,
                    variables=variables,
                    task_id=task_id,
                    task_version=task_version,
                    actor=actor,
                    claimed_version=claimed_version,
                    unless_running=business_key is not None,
                    version=version,
                )
            except _InstanceWaitingError:
                pass  # a running instance has the business key: the message is for it
        elif business_key is None or not await self._running_with(deployed, business_key):
            raise CorrelationError(
                f"Process with start message-name '{message_name}' not found: no running "
                f"instance of {process_key} has business-key {business_key!r}, and the "
                "message starts none"
            )
        if business_key is not None:
            # A reply can overtake the commit that records its request as sent: while such a
            # send is in flight, its instance is about to wait for exactly this message. Looked
            # at before the wait: the send is recorded in the commit that makes the instance
            # wait, so "nothing in flight" then "not waiting" means it will not wait.
            in_flight = bool(await self.sends_in_flight(business_key))
            if await self._waiting(deployed, message_name, business_key, correlation_key):
                return await self.correlate(
                    message_name=message_name,
                    business_key=business_key,
                    correlation_key=correlation_key,
                    variables=variables,
                    task_id=task_id,
                    task_version=task_version,
                    actor=actor,
                    process_key=process_key,
                    claimed_version=claimed_version,
                    definition_id=deployed.definition_id,
                    requester=requester,
                )
            if in_flight:
                # Never refused for timing: the caller keeps it and delivers it again when
                # the send resolves.
                raise MessageHeldError(business_key)
        raise CorrelationError(
            f"Unable to correlate Task{f' {task_id}' if task_id else ''}: the instance of "
            f"{process_key} with business-key {business_key!r} does not wait for message "
            f"{message_name!r}"
            + (f" with correlation-key {correlation_key!r}" if correlation_key else "")
        )

    async def _running_with(self, deployed: DeployedProcess, business_key: str) -> bool:
        async with self.database.transaction() as session:
            return await repo.running_with_business_key(
                session, deployed.definition_id, business_key
            )

    async def _waiting(
        self,
        deployed: DeployedProcess,
        message_name: str,
        business_key: str,
        correlation_key: str | None,
    ) -> bool:
        """Whether an instance of exactly this deployed version waits for the message."""
        async with self.database.transaction() as session:
            found = await repo.find_subscriptions(
                session,
                message_name=message_name,
                business_key=business_key,
                correlation_key=correlation_key,
            )
            for instance_id, _sub in found:
                record = await repo.load_instance(session, instance_id)
                if record is not None and record.definition_id == deployed.definition_id:
                    return True
        return False

    async def correlate(
        self,
        *,
        message_name: str,
        business_key: str,
        correlation_key: str | None = None,
        variables: Mapping[str, object] | None = None,
        task_id: str | None = None,
        task_version: str = "1",
        actor: str = "remote",
        process_key: str | None = None,
        claimed_version: str | None = None,
        definition_id: int | None = None,
        requester: str | None = None,
    ) -> str:
        """Continue the one instance waiting for this message; return its id (of process
        ``process_key``, of the deployed definition ``definition_id``, when given).

        Raises :class:`~dsf_bridge.engine.exceptions.CorrelationError` ("Unable to correlate
        Task ...") when no waiting execution, or more than one, matches.
        """
        for _ in range(self.settings.conflict_retries):
            try:
                return await self._correlate_once(
                    message_name=message_name,
                    business_key=business_key,
                    correlation_key=correlation_key,
                    variables=dict(variables or {}),
                    task_id=task_id,
                    task_version=task_version,
                    actor=actor,
                    process_key=process_key,
                    claimed_version=claimed_version,
                    definition_id=definition_id,
                    requester=requester,
                )
            except ConcurrencyError:
                continue
        raise ConcurrencyError(f"instance for business-key {business_key!r} kept changing")

    async def _correlate_once(
        self,
        *,
        message_name: str,
        business_key: str,
        correlation_key: str | None,
        variables: dict[str, object],
        task_id: str | None,
        task_version: str,
        actor: str,
        process_key: str | None,
        claimed_version: str | None = None,
        definition_id: int | None = None,
        requester: str | None = None,
    ) -> str:
        now = self.clock()
        async with self.database.transaction() as session:
            found = await repo.find_subscriptions(
                session,
                message_name=message_name,
                business_key=business_key,
                correlation_key=correlation_key,
            )
            records: dict[str, repo.InstanceRecord] = {}
            for instance_id, _sub in found:
                if instance_id not in records:
                    record = await repo.load_instance(session, instance_id)
                    if (
                        record is not None
                        and (
                            process_key is None
                            or self.deployments.of_record(record).definition.key == process_key
                        )
                        and (definition_id is None or record.definition_id == definition_id)
                    ):
                        records[instance_id] = record
            candidates = [(iid, message_subscriptions(rec.state)) for iid, rec in records.items()]
            instance_id, subscription = correlate(
                candidates,
                message_name=message_name,
                business_key=business_key,
                correlation_key=correlation_key,
                task_id=task_id,
            )
            record = records[instance_id]
            deployed = self.deployments.of_record(record)
            if message_name in deployed.handlers.reply_only_from_recipients:
                await self._check_replier(
                    session,
                    instance_id,
                    message_name=message_name,
                    requester=requester,
                    waiting_key=subscription.correlation_key,
                    task_id=task_id,
                )
            event = MessageReceived(
                message_name, now, correlation_key, variables, subscription.token, task_id
            )
            with bound_context(instance_id=instance_id, business_key=business_key):
                result = step(deployed.definition, record.state, event)
                if task_id is not None:
                    await self.effects.record_incoming(
                        session, task_id, task_version, instance_id, claimed_version
                    )
                await append_event(
                    session,
                    actor=actor,
                    subject=f"instance/{instance_id}",
                    action="message.correlated",
                    reason=f"{message_name} at {subscription.element_id}"
                    + (f", Task/{task_id}" if task_id else ""),
                    payload=result.state,
                )
                pending = await self.effects.write(session, deployed, record, result)
                self._fault(FaultPoint.STEP_WRITTEN, "message.correlated")
        self._fault(FaultPoint.STEP_COMMITTED, "message.correlated")
        self._after_commit(pending)
        return instance_id

    async def _check_replier(
        self,
        session: Session,
        instance_id: str,
        *,
        message_name: str,
        requester: str | None,
        waiting_key: str | None,
        task_id: str | None,
    ) -> None:
        """Refuse a reply from an organization the instance did not send a Task to (with the
        correlation key of the execution the reply reaches, when that has one): a third
        organization that learnt the business key must not answer for the one asked.

        A Task sent to a target given by its endpoint alone names no organization here; for
        such an instance the check cannot be made and DSF's behaviour applies (logged)."""
        recipients = await repo.task_recipients(session, instance_id)
        if waiting_key is not None:
            recipients = {(org, key) for org, key in recipients if key == waiting_key}
        asked = {org for org, _ in recipients}
        if None in asked:
            log.warning(
                "reply.sender_unchecked",
                message_name=message_name,
                reason="a Task was sent to a target without an organization identifier",
            )
            return
        if requester is not None and requester in asked:
            return
        raise CorrelationError(
            f"Unable to correlate Task{f' {task_id}' if task_id else ''}: message "
            f"{message_name!r} is accepted only from the organization the request went to"
            + (f" with correlation-key {waiting_key!r}" if waiting_key else "")
            + f", not from {requester or 'a requester without an organization identifier'}"
        )

    async def sends_in_flight(self, business_key: str) -> bool:
        """Whether an instance with this business key has a Task send queued or under way."""
        async with self.database.transaction() as session:
            return await repo.sends_in_flight(session, business_key) > 0

    def on_send_resolved(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every commit that may have resolved a send: a step (a
        send recorded delivered or failed, a send handler failed, an instance cancelled).
        Held replies (:class:`MessageHeldError`) are delivered again from there; the
        listener must return at once (schedule work, do not await it)."""
        self._send_listeners.append(listener)

    async def complete_user_task(
        self, user_task_id: str, variables: Mapping[str, object] | None = None
    ) -> str:
        """A user task's QuestionnaireResponse came back completed; continue its instance."""
        instance_id, _, token = user_task_id.partition("/")
        if not token:
            raise ProcessExecutionError(f"malformed user-task-id {user_task_id!r}")
        await self._apply_event(
            instance_id,
            lambda now: UserTaskCompleted(token, now, dict(variables or {})),
            action="usertask.completed",
            reason=f"user task {user_task_id}",
        )
        return instance_id

    # -- workers ------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Perform what is due now: timers, jobs, outbox entries. Return how many were done.

        One transaction looks for a due timer and leases the due jobs and outbox entries
        (an idle round costs one round trip to the store, not three); then the timers fire,
        and the jobs and effects run concurrently. Work they create is left to the next round,
        which the wake-up starts at once.
        """
        now = self.clock()
        settings = self.settings
        async with self.database.transaction() as session:
            timer_due = bool(await repo.due_timers(session, now, limit=1))
            jobs = await repo.claim_jobs(
                session, owner=self.owner, now=now, lease=settings.lease, limit=settings.batch
            )
            entries = await repo.claim_outbox(
                session, owner=self.owner, now=now, lease=settings.lease, limit=settings.batch
            )
        if jobs or entries:
            self._fault(FaultPoint.WORK_CLAIMED, f"{len(jobs)}/{len(entries)}")
        fired = await self._fire_due_timers() if timer_due else 0
        await run_all(
            [
                *(self.jobs.run_or_retry(job) for job in jobs),
                *(self.outbox.perform(entry) for entry in entries),
            ]
        )
        return fired + len(jobs) + len(entries)

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
        )
        await self._loop.run(stop)

    @property
    def heartbeat(self) -> dt.datetime | None:
        """When the worker loop last began a round: the readiness check's sign of life."""
        return None if self._loop is None else self._loop.heartbeat

    async def _fire_due_timers(self) -> int:
        fired = 0
        while fired < self.settings.batch:
            now = self.clock()
            async with self.database.transaction() as session:
                due = await repo.due_timers(session, now, limit=1)
                if not due:
                    return fired
                instance_id, timer = due[0]
                record = await repo.load_instance(session, instance_id)
                await repo.cancel_timer(session, instance_id, timer.timer_id)
                pending = None
                if record is not None:
                    deployed = self.deployments.of_record(record)
                    with bound_context(instance_id=instance_id, business_key=record.business_key):
                        result = step(
                            deployed.definition, record.state, TimerFired(timer.timer_id, now)
                        )
                        await append_event(
                            session,
                            actor=self.owner,
                            subject=f"instance/{instance_id}",
                            # An undone step: the timer fires again later, or is an incident.
                            action="timer.failed" if result.error else "timer.fired",
                            reason=f"{timer.element_id} due {timer.due_at.isoformat()}"
                            + (f": {result.error}" if result.error else ""),
                            payload=result.state,
                        )
                        pending = await self.effects.write(session, deployed, record, result)
                        self._fault(FaultPoint.STEP_WRITTEN, "timer.fired")
            if pending is not None:
                self._fault(FaultPoint.STEP_COMMITTED, "timer.fired")
                self._after_commit(pending)
            fired += 1
        return fired

    async def _run_due_jobs(self) -> int:
        """One round of due jobs alone (tests): :meth:`JobWorker.run_due`."""
        return await self.jobs.run_due()

    # -- applying events ----------------------------------------------------------------------

    async def _apply_event(
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
    ) -> None:
        """Apply one event to an instance in one transaction, replaying on lost races.

        ``unless`` sees the instance in that transaction first; when it answers ``True`` it has
        dealt with the job itself and no step is taken. ``also`` writes in the same transaction
        (the record of the effect that caused the event). ``actor`` names who caused it in the
        audit event (an operator); the bridge itself by default.
        """
        for _ in range(self.settings.conflict_retries):
            now = self.clock()
            try:
                async with self.database.transaction() as session:
                    record = await repo.load_instance(session, instance_id)
                    if record is None:
                        raise InstanceGoneError(f"instance {instance_id} does not exist")
                    if unless is not None and await unless(session, record):
                        return
                    deployed = self.deployments.of_record(record)
                    with bound_context(instance_id=instance_id, business_key=record.business_key):
                        result = step(deployed.definition, record.state, make_event(now))
                        await append_event(
                            session,
                            actor=actor or self.owner,
                            subject=f"instance/{instance_id}",
                            # An undone job step: retried later, or parked as an incident.
                            action="job.failed" if result.error else action,
                            reason=f"{reason}: {result.error}" if result.error else reason,
                            payload=result.state,
                        )
                        pending = await self.effects.write(session, deployed, record, result)
                        if job_id is not None:
                            await repo.complete_job(session, job_id, self.owner)
                        if also is not None:
                            await also(session)
                        self._fault(FaultPoint.STEP_WRITTEN, action)
            except ConcurrencyError:
                continue
            self._fault(FaultPoint.STEP_COMMITTED, action)
            self._after_commit(pending)
            return
        raise ConcurrencyError(f"instance {instance_id} kept changing")

    def _sends_resolved(self) -> None:
        for listener in self._send_listeners:
            listener()

    def _after_commit(self, pending: StepRecord) -> None:
        if pending.effects:
            self._wakeup.set()
        self._sends_resolved()
        for element in pending.incidents:  # the message is in the audit trail and the API
            log.warning("incident.created", instance_id=pending.instance_id, element=element)
        log.info(
            "instance.stepped",
            instance_id=pending.instance_id,
            status=pending.status,
            effects=pending.effects,
        )
