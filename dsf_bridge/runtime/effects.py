"""Effect writing: a step's new instance state and the records of its effects (jobs, timers,
outbox entries, subscriptions, signal jobs, audit events), all in the step's transaction.

Nothing here talks to the network: effects become rows that the workers perform later (jobs,
the outbox), so a crash before the commit leaves no trace and one after it loses nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from dsf_bridge.dsf.questionnaires import questionnaire_item_texts
from dsf_bridge.dsf.tasks import task_output_task_ids, task_outputs
from dsf_bridge.engine import state as instance_state
from dsf_bridge.engine.correlation import (
    ALTERNATIVE_BUSINESS_KEY,
    message_subscriptions,
    signal_waits,
)
from dsf_bridge.engine.events import (
    CallHandler,
    CancelTimer,
    CancelUserTask,
    CompleteTasks,
    CreateQuestionnaireResponse,
    Event,
    FailTasks,
    ProcessCompleted,
    ProcessFailed,
    ScheduleJob,
    SendTask,
    SignalReceived,
    StartTimer,
    ThrowSignal,
)
from dsf_bridge.engine.model import ProcessDefinition
from dsf_bridge.logs import step_log_context
from dsf_bridge.runtime.deployments import DeployedProcess, Deployments
from dsf_bridge.store import (
    Records,
    Session,
    append_event,
    instance_record,
    state_digest,
    task_record,
)
from dsf_bridge.store import repository as repo
from dsf_bridge.store.kinds import JobKind, OutboxKind, TaskSeenStatus

__all__ = [
    "SIGNAL_SUBSCRIPTION",
    "TAKEN_IN",
    "EffectWriter",
    "InlineCall",
    "StepRecord",
    "subscription_keys",
]

log = structlog.get_logger("dsf_bridge.runtime")

# Signal waits live in the subscription table under this prefix and an empty business key.
SIGNAL_SUBSCRIPTION = "signal:"

# The status of a Task version intake claimed once its message reached an instance.
TAKEN_IN = TaskSeenStatus.TAKEN_IN


_FRESH = "dsf_bridge.fresh_instances"


@dataclass
class FreshInstance:
    """An instance created by the current transaction: the Tasks it took in and how many of
    its jobs were written, so that its later steps in the same transaction need not ask the
    store (no other transaction sees it before the commit)."""

    incoming: list[str] = field(default_factory=list)
    jobs: int = 0
    # The idempotency keys of the effects it queued (a key queued twice is queued once).
    outbox_keys: set[str] = field(default_factory=set)


def created_here(session: Session, instance_id: str) -> FreshInstance | None:
    """What the current transaction wrote of ``instance_id``, if it created it
    (:meth:`EffectWriter.created`)."""
    fresh: dict[str, FreshInstance] | None = session.info.get(_FRESH)
    return None if fresh is None else fresh.get(instance_id)


@dataclass(frozen=True)
class InlineCall:
    """The handler call of a step that the caller ran before the step's transaction
    (:meth:`~dsf_bridge.runtime.stepping.InstanceStepper.run_inline`): no job is written for
    it when ``running`` is ``None`` (its outcome is the next step of the same transaction);
    otherwise the job is written leased to this runtime, and runs by awaiting ``running``, the
    call under way, instead of calling the handler again."""

    token: str
    running: asyncio.Future[Any] | None = None
    # When the call under way began (time.perf_counter()), for its step's duration.
    since: float | None = None


@dataclass
class StepRecord:
    """What one transaction wrote for one instance, for logging after commit; ``jobs`` and
    ``outbox`` are the work it queued leased already, to be run right after the commit."""

    instance_id: str
    status: str
    effects: list[str] = field(default_factory=list)
    # The element and message of each new incident, and why the instance failed in this step.
    incidents: list[tuple[str, str]] = field(default_factory=list)
    failure: str | None = None
    # The log context the step was written in (process, version, instance, business key, Task):
    # the records logged after the commit carry it too.
    log_context: dict[str, str] = field(default_factory=dict)
    jobs: list[repo.ClaimedJob] = field(default_factory=list)
    outbox: list[repo.ClaimedOutboxEntry] = field(default_factory=list)
    # Work written for a polling round to find (not leased, a timer, another's signal job).
    for_rounds: int = 0
    # The instance as this step saved it (its state and version), for the jobs run right
    # after the commit.
    instance: repo.InstanceRecord | None = None


class EffectWriter:
    """Writes steps of one runtime: ``owner`` is the audit actor, ``clock`` the time source,
    ``job_retries`` the retries of a new job, ``step`` the engine's step (the stepper's: a
    signal an instance throws to itself is stepped in the same transaction)."""

    def __init__(
        self,
        *,
        owner: str,
        clock: Callable[[], dt.datetime],
        job_retries: int,
        deployments: Deployments,
        step: Callable[[ProcessDefinition, Mapping[str, Any] | None, Event], Any],
        running_lease: dt.timedelta = dt.timedelta(seconds=60),
    ) -> None:
        self.step = step
        self.owner = owner
        self.clock = clock
        self.job_retries = job_retries
        self.deployments = deployments
        # The lease of a handler job whose handler a start called already (InlineCall).
        self.running_lease = running_lease
        # While the runtime runs queued work right after the commit that queued it (its
        # worker loop is on), the handler, send and continuation jobs due now and the outbox
        # entries are written leased to it for this long; otherwise left for a polling round.
        self.lease: dt.timedelta | None = None
        # Whether the runtime can run more work right after the commit (its dispatch is
        # bounded); when not, work is written for a polling round (bounded by its batch).
        self.has_room: Callable[[], bool] = lambda: True

    @staticmethod
    def created(session: Session, instance_id: str) -> None:
        """Note that the current transaction creates ``instance_id`` (:func:`created_here`)."""
        session.info.setdefault(_FRESH, {})[instance_id] = FreshInstance()

    def leased(self, now: dt.datetime) -> repo.Lease | None:
        """The lease to write new work with, to run it right after the commit; ``None``: for
        a polling round (the worker loop is off, or the runtime runs enough at once)."""
        if self.lease is None or not self.has_room():
            return None
        return (self.owner, now + self.lease)

    async def _job(
        self,
        session: Session,
        pending: StepRecord,
        *,
        kind: JobKind,
        due_at: dt.datetime,
        retries: int,
        payload: dict[str, Any],
        now: dt.datetime,
        running: InlineCall | None = None,
    ) -> None:
        fresh = created_here(session, pending.instance_id)
        if fresh is not None:
            fresh.jobs += 1
        leased = self.leased(now) if due_at <= now else None
        if running is not None:
            if self.lease is None:
                # The bridge stops: nothing awaits the call after the commit, so it ends now,
                # and its job is left to the next bridge's round (as a job cancelled by a
                # stop, its handler runs again there).
                if running.running is not None:
                    running.running.cancel()
                running = None
            else:
                # Its handler runs already, here: no polling round may call it again.
                leased = (self.owner, now + self.running_lease)
        job_id = await repo.enqueue_job(
            session,
            kind=kind,
            instance_id=pending.instance_id,
            due_at=due_at,
            retries=retries,
            payload=payload,
            leased_to=leased,
        )
        if leased is not None:
            pending.jobs.append(
                repo.ClaimedJob(
                    job_id,
                    pending.instance_id,
                    kind,
                    payload,
                    1,
                    retries,
                    running=None if running is None else running.running,
                    running_since=None if running is None else running.since,
                )
            )
        else:
            pending.for_rounds += 1

    async def _outbox(
        self,
        session: Session,
        pending: StepRecord,
        *,
        idempotency_key: str,
        kind: OutboxKind,
        payload: dict[str, Any],
        now: dt.datetime,
    ) -> None:
        leased = self.leased(now)
        fresh = created_here(session, pending.instance_id)
        # Every key of an effect is the instance's own (it names the instance): new for an
        # instance this transaction created, so nothing to read back (on PostgreSQL no round
        # trip of its own).
        new = fresh is not None and idempotency_key not in fresh.outbox_keys
        if fresh is not None:
            fresh.outbox_keys.add(idempotency_key)
        enqueue = repo.enqueue_new_outbox if new else repo.enqueue_outbox
        entry_id = await enqueue(
            session,
            idempotency_key=idempotency_key,
            kind=kind,
            instance_id=pending.instance_id,
            now=now,
            payload=payload,
            leased_to=leased,
        )
        queued = new or entry_id is not None
        if leased is not None and queued:
            pending.outbox.append(
                repo.ClaimedOutboxEntry(
                    entry_id, idempotency_key, pending.instance_id, kind, payload, 1
                )
            )
        elif queued:
            pending.for_rounds += 1

    async def write(
        self,
        session: Session,
        deployed: DeployedProcess,
        record: repo.InstanceRecord,
        result: Any,
        *,
        fresh: bool = False,
        inline: InlineCall | None = None,
        row_written: bool = False,
    ) -> StepRecord:
        """Write the new state and the effects' records, all in the caller's transaction;
        ``inline``: the handler call of this step that the caller ran already;
        ``row_written``: the instance's row holds the new state already (inserted so by this
        transaction), only the effects' records are written."""
        state = result.state
        status = instance_state.instance_status(state).label
        now = self.clock()
        before = set() if fresh else set(subscription_keys(record.state))
        known = set() if fresh else instance_state.incident_tokens(record.state)
        alternative = instance_state.process_variables(state).get(ALTERNATIVE_BUSINESS_KEY)
        alternative_before = (
            None
            if fresh
            else instance_state.process_variables(record.state).get(ALTERNATIVE_BUSINESS_KEY)
        )
        if row_written:
            record = repo.InstanceRecord(
                record.id,
                record.definition_id,
                record.business_key,
                status,
                state,
                record.version + 1,
            )
        elif not fresh:
            record = await repo.save_instance(
                session,
                record,
                state=state,
                status=status,
                now=now,
                ended=status != "running",
                created_here=created_here(session, record.id) is not None,
            )
        instance_id = record.id
        if isinstance(alternative, str) and alternative and alternative != alternative_before:
            # A handler set it (as a port of an API v1 plugin may): intake looks it up here.
            await repo.set_alternative_business_key(session, instance_id, alternative)
        keys = subscription_keys(state)
        if set(keys) != before:  # most steps wait for no new message: spare the round trips
            await repo.replace_subscriptions(session, instance_id, keys)
            if any(key.message_name.startswith(SIGNAL_SUBSCRIPTION) for key in keys):
                # A signal thrown while this instance was busy waits in a postponed job: it
                # is due now that the instance waits again.
                await repo.hasten_jobs(session, instance_id, JobKind.SIGNAL, now)
        pending = StepRecord(instance_id, status, log_context=step_log_context())
        await self.audit_incidents(session, instance_id, known, state, pending)
        effects = list(result.effects)
        while effects:
            effect = effects.pop(0)
            pending.effects.append(type(effect).__name__)
            if isinstance(effect, CallHandler):
                running = None
                if inline is not None and effect.token == inline.token:
                    if inline.running is None:
                        continue  # its outcome is the next step of this transaction
                    running = inline
                await self._job(
                    session,
                    pending,
                    kind=JobKind.HANDLER,
                    due_at=now,
                    now=now,
                    retries=self.job_retries,
                    payload={
                        "handler": effect.handler,
                        "kind": effect.kind,
                        "element_id": effect.element_id,
                        "token": effect.token,
                        "business_key": effect.business_key,
                        "variables": dict(effect.variables),
                        "fields": dict(effect.fields),
                        "event": effect.event,
                    },
                    running=running,
                )
            elif isinstance(effect, SendTask):
                await self._job(
                    session,
                    pending,
                    kind=JobKind.SEND,
                    due_at=now,
                    now=now,
                    retries=self.job_retries,
                    payload={
                        "send_id": uuid.uuid4().hex,  # the outbox's idempotency key
                        "handler": effect.handler,
                        "element_id": effect.element_id,
                        "token": effect.token,
                        "business_key": effect.business_key,
                        "instantiates_canonical": effect.instantiates_canonical,
                        "message_name": effect.message_name,
                        "profile": effect.profile,
                        "correlation_key": effect.correlation_key,
                        "target": dict(effect.target) if effect.target is not None else None,
                        "variables": dict(effect.variables),
                        "fields": dict(effect.fields),
                    },
                )
            elif isinstance(effect, ScheduleJob):
                await self._job(
                    session,
                    pending,
                    kind=JobKind.CONTINUE,
                    due_at=effect.due,
                    now=now,
                    retries=0,
                    payload={"token": effect.token, "element_id": effect.element_id},
                )
            elif isinstance(effect, StartTimer):
                pending.for_rounds += 1
                await repo.add_timer(
                    session,
                    instance_id,
                    repo.TimerKey(effect.timer_id, effect.element_id, effect.due),
                )
            elif isinstance(effect, CancelTimer):
                await repo.cancel_timer(session, instance_id, effect.timer_id)
            elif isinstance(effect, CreateQuestionnaireResponse):
                user_task_id = f"{instance_id}/{effect.token}"
                await self._outbox(
                    session,
                    pending,
                    idempotency_key=f"user-task:{user_task_id}:{record.version}",
                    kind=OutboxKind.CREATE_USER_TASK,
                    now=now,
                    payload={
                        "business_key": effect.business_key,
                        "user_task_id": user_task_id,
                        "form_key": effect.form_key,
                        "token": effect.token,
                        "element_id": effect.element_id,
                        "item_texts": questionnaire_item_texts(effect.variables),
                    },
                )
            elif isinstance(effect, CancelUserTask):
                # As the DSF BPE: it registers only a 'create' task listener, so the
                # QuestionnaireResponse of a cancelled user task stays as it is (in-progress);
                # completing it later reaches no user task and is only logged. (Outbox entries
                # of kind 'cancel-user-task' queued by earlier versions are still performed.)
                continue
            elif isinstance(effect, ThrowSignal):
                # A broadcast, as in Camunda: every instance waiting for the signal, of any
                # process, gets it. The others by a job each (their own transaction, retried
                # like any job); this one at once, in this step.
                # Also running instances that can catch it but are between two waits right now
                # (a handler job of theirs is under way): their signal job waits for them to
                # settle (see _deliver_signal), as Camunda's locking would make them.
                catchers = self.deployments.catching(effect.signal_name)
                waiting = set(
                    await repo.instances_waiting_for(
                        session, f"{SIGNAL_SUBSCRIPTION}{effect.signal_name}"
                    )
                )
                waiting.update(await repo.running_instances_of(session, catchers))
                waiting.discard(instance_id)
                known = instance_state.incident_tokens(state)
                follow = self.step(
                    deployed.definition, state, SignalReceived(effect.signal_name, now)
                )
                state = follow.state
                status = instance_state.instance_status(state).label
                # This event records the row as saved below, after the instance caught its own
                # signal (the step's event recorded it before).
                await append_event(
                    session,
                    actor=self.owner,
                    subject=f"instance/{instance_id}",
                    action="signal.thrown",
                    reason=f"{effect.signal_name} to {len(waiting)} other instance(s)",
                    payload={"signal": effect.signal_name, "instances": sorted(waiting)},
                    record=instance_record(
                        instance_id,
                        process=deployed.audited_process,
                        business_key=record.business_key,
                        status=status,
                        version=record.version + 1,
                        state_digest=state_digest(state),
                    ),
                )
                for other in sorted(waiting):
                    await repo.enqueue_job(
                        session,
                        kind=JobKind.SIGNAL,
                        instance_id=other,
                        due_at=now,
                        payload={"signal": effect.signal_name, "thrown_by": instance_id},
                    )
                    pending.effects.append("SignalJob")
                    pending.for_rounds += 1
                await self.audit_incidents(session, instance_id, known, state, pending)
                record = await repo.save_instance(
                    session,
                    record,
                    state=state,
                    status=status,
                    now=now,
                    ended=not instance_state.is_running(state),
                    created_here=created_here(session, instance_id) is not None,
                )
                effects.extend(follow.effects)
                await repo.replace_subscriptions(session, instance_id, subscription_keys(state))
                pending.status = instance_state.instance_status(state).label
            elif isinstance(effect, CompleteTasks | FailTasks):
                created = created_here(session, instance_id)
                incoming = (
                    list(created.incoming)
                    if created is not None
                    else await repo.tasks_of_instance(session, instance_id, "incoming")
                )
                variables = instance_state.process_variables(state)
                strays = sorted(task_output_task_ids(variables) - set(incoming))
                if strays:
                    # add_task_output names a Task this instance did not take in: say so, as
                    # those outputs are written nowhere.
                    log.warning("task_outputs.unwritten", task_ids=strays)
                completing = isinstance(effect, CompleteTasks)
                for task_id in incoming:
                    payload: dict[str, Any] = {
                        "task_id": task_id,
                        "outputs": task_outputs(variables, task_id),
                    }
                    if isinstance(effect, FailTasks):
                        payload["message"] = effect.message
                    await self._outbox(
                        session,
                        pending,
                        # The instance's own: another instance that took in the same Task
                        # id (a Task set back to requested and run again) ends it too.
                        idempotency_key=(
                            f"{'complete' if completing else 'fail'}:{task_id}:{instance_id}"
                        ),
                        kind=OutboxKind.COMPLETE_TASK if completing else OutboxKind.FAIL_TASK,
                        now=now,
                        payload=payload,
                    )
            elif isinstance(effect, ProcessCompleted | ProcessFailed):
                if isinstance(effect, ProcessFailed):
                    pending.failure = effect.message
                await append_event(
                    session,
                    actor=self.owner,
                    subject=f"instance/{instance_id}",
                    action="instance.completed"
                    if isinstance(effect, ProcessCompleted)
                    else "instance.failed",
                    reason=getattr(effect, "message", "") or deployed.definition.key,
                )
        pending.instance = record
        return pending

    async def record_incoming(
        self,
        session: Session,
        task_id: str,
        task_version: str,
        instance_id: str,
        claimed_version: str | None = None,
    ) -> Records:
        """Record the Task version as delivered to ``instance_id``, once: a version delivered
        already (two replicas recovering one claim) rolls the delivering step back, leaving
        its transaction as :class:`~dsf_bridge.errors.TaskAlreadyDeliveredError` (on
        PostgreSQL at its next read or commit: :func:`repo.take_in_task`). Returns the rows'
        records for the step's audit event."""
        await repo.take_in_task(
            session,
            task_id=task_id,
            task_version=task_version,
            claimed_version=claimed_version,
            instance_id=instance_id,
        )
        fresh = created_here(session, instance_id)
        if fresh is not None and task_id not in fresh.incoming:
            fresh.incoming.append(task_id)
        described = task_record(
            task_id,
            task_version,
            "incoming",
            status=TaskSeenStatus.IN_PROGRESS,
            instance_id=instance_id,
        )
        if claimed_version is not None:
            described.update(
                task_record(
                    task_id, claimed_version, "incoming", status=TAKEN_IN, instance_id=instance_id
                )
            )
        return described

    async def audit_incidents(
        self,
        session: Session,
        instance_id: str,
        known: set[str],
        state: Mapping[str, Any],
        pending: StepRecord,
    ) -> None:
        """Record each incident of ``state`` not among the ``known`` tokens: a job out of
        retries, or a loop without a wait state. An operator decides what happens next."""
        if instance_state.incident_tokens(state) <= known:  # almost every step
            return
        for incident in instance_state.incidents(state):
            if incident.token not in known:
                await append_event(
                    session,
                    actor=self.owner,
                    subject=f"instance/{instance_id}",
                    action="incident.created",
                    reason=f"at {incident.element}: {incident.message}",
                    payload={"token": incident.token, "element": incident.element},
                )
                pending.incidents.append((incident.element, incident.message))


def subscription_keys(state: Mapping[str, Any]) -> list[repo.SubscriptionKey]:
    """What an instance state waits for, as the store indexes it: messages by name and
    business key, signals under :data:`SIGNAL_SUBSCRIPTION` + name for every business key."""
    keys = [
        repo.SubscriptionKey(
            sub.token, sub.element_id, sub.message_name, sub.business_key, sub.correlation_key
        )
        for sub in message_subscriptions(state)
    ]
    keys.extend(
        repo.SubscriptionKey(
            wait.token, wait.element_id, f"{SIGNAL_SUBSCRIPTION}{wait.signal_name}", "", None
        )
        for wait in signal_waits(state)
    )
    return keys
