"""Read-only queries for the admin API and web page: instances, their Tasks, waits and audit.

Nothing here writes. The runtime's queries live in :mod:`dsf_bridge.store.repository`; these
serve people who audit the store (``dsf_bridge.api``), so they page, filter and count, and they
return plain frozen records the API turns into JSON and HTML.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVarTuple

from sqlalchemy import Select, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from dsf_bridge.engine import state as instance_state
from dsf_bridge.store.kinds import TaskSeenStatus
from dsf_bridge.store.tables import (
    AuditEvent,
    AuditHead,
    Job,
    MessageSubscription,
    OutboxEntry,
    ProcessDefinition,
    ProcessInstance,
    SyncCursor,
    TaskSeen,
    Timer,
)

__all__ = [
    "AuditRow",
    "IncidentRow",
    "InstanceDetail",
    "InstanceRow",
    "JobRow",
    "OutboxRow",
    "StoreCounts",
    "TaskRow",
    "TimerRow",
    "WaitRow",
    "count_store",
    "instance_detail",
    "list_audit_events",
    "list_instances",
    "list_tasks",
    "ping",
]

MAX_PAGE = 500


@dataclass(frozen=True)
class InstanceRow:
    id: str
    process_key: str
    process_version: str
    plugin: str
    business_key: str
    status: str
    created_at: dt.datetime
    updated_at: dt.datetime
    ended_at: dt.datetime | None


@dataclass(frozen=True)
class TaskRow:
    task_id: str
    task_version: str
    role: str
    status: str
    instance_id: str | None
    seen_at: dt.datetime


@dataclass(frozen=True)
class WaitRow:
    element_id: str
    message_name: str
    business_key: str
    correlation_key: str | None
    since: dt.datetime


@dataclass(frozen=True)
class IncidentRow:
    """An execution whose job used up its retries (read from the engine state)."""

    token: str
    element_id: str
    message: str
    at: dt.datetime | None


@dataclass(frozen=True)
class TimerRow:
    element_id: str
    timer_id: str
    due_at: dt.datetime


@dataclass(frozen=True)
class JobRow:
    kind: str
    due_at: dt.datetime
    attempts: int
    retries_left: int
    last_error: str | None
    leased_by: str | None


@dataclass(frozen=True)
class OutboxRow:
    kind: str
    status: str
    attempts: int
    last_error: str | None
    result: str | None
    created_at: dt.datetime
    done_at: dt.datetime | None


@dataclass(frozen=True)
class AuditRow:
    id: int
    # None (with the hashes) until the event is sealed into the chain.
    sequence: int | None
    occurred_at: dt.datetime
    actor: str
    subject: str
    action: str
    reason: str
    payload_digest: str | None
    previous_hash: str | None
    event_hash: str | None


@dataclass(frozen=True)
class InstanceDetail:
    """One instance with everything that explains where it stands and how it got there."""

    instance: InstanceRow
    state: dict[str, Any]
    version: int
    tasks: tuple[TaskRow, ...]
    waits: tuple[WaitRow, ...]
    timers: tuple[TimerRow, ...]
    jobs: tuple[JobRow, ...]
    outbox: tuple[OutboxRow, ...]
    audit: tuple[AuditRow, ...]
    # More than MAX_PAGE of them: the newest MAX_PAGE are listed (page the rest with
    # list_audit_events / list_tasks).
    tasks_truncated: bool = False
    audit_truncated: bool = False
    incidents: tuple[IncidentRow, ...] = ()


@dataclass(frozen=True)
class StoreCounts:
    """What the metrics endpoint exposes: counts grouped by their labels."""

    instances: dict[tuple[str, str], int]  # (process key, status) -> count
    tasks: dict[tuple[str, str], int]  # (role, status) -> Task versions
    jobs: dict[str, int]  # "due", "scheduled", "leased", "failing" -> count
    outbox: dict[str, int]  # status -> entries
    timers: int
    audit_events: int
    cursors: dict[str, dt.datetime]  # resource type -> last lastUpdated handled
    incidents: dict[str, int] = field(default_factory=dict)  # process key -> open incidents
    audit_unsealed: int = 0  # events appended, not sealed into the chain yet


_InstanceSelect = Select[str, str, str, str, str, str, dt.datetime, dt.datetime, dt.datetime | None]


def _page(limit: int) -> int:
    # One more than a page: callers ask for limit + 1 rows to learn whether another page exists.
    return max(1, min(limit, MAX_PAGE + 1))


_Ts = TypeVarTuple("_Ts")


def _filtered(query: Select[*_Ts], *conditions: tuple[Any, object]) -> Select[*_Ts]:
    """``query`` with ``column == value`` for every condition whose value is given."""
    for column, value in conditions:
        if value is not None:
            query = query.where(column == value)
    return query


def _instance_query() -> _InstanceSelect:
    return select(
        ProcessInstance.id,
        ProcessDefinition.process_key,
        ProcessDefinition.version,
        ProcessDefinition.plugin,
        ProcessInstance.business_key,
        ProcessInstance.status,
        ProcessInstance.created_at,
        ProcessInstance.updated_at,
        ProcessInstance.ended_at,
    ).join(ProcessDefinition, ProcessDefinition.id == ProcessInstance.definition_id)


async def ping(session: AsyncSession) -> None:
    """A round trip to the database (readiness)."""
    await session.execute(text("SELECT 1"))


async def list_instances(
    session: AsyncSession,
    *,
    status: str | None = None,
    process_key: str | None = None,
    business_key: str | None = None,
    before: str | None = None,
    limit: int = 50,
) -> list[InstanceRow]:
    """Instances, newest first. ``before`` is the id of the last instance of the previous page
    (keyset paging: stable while new instances arrive)."""
    query = _filtered(
        _instance_query(),
        (ProcessInstance.status, status),
        (ProcessDefinition.process_key, process_key),
        (ProcessInstance.business_key, business_key),
    )
    if before is not None:
        anchor = (
            await session.execute(
                select(ProcessInstance.created_at).where(ProcessInstance.id == before)
            )
        ).scalar_one_or_none()
        if anchor is None:
            return []
        query = query.where(
            (ProcessInstance.created_at < anchor)
            | ((ProcessInstance.created_at == anchor) & (ProcessInstance.id < before))
        )
    query = query.order_by(ProcessInstance.created_at.desc(), ProcessInstance.id.desc())
    rows = await session.execute(query.limit(_page(limit)))
    return [InstanceRow(*row) for row in rows]


async def list_tasks(
    session: AsyncSession,
    *,
    role: str | None = None,
    status: str | None = None,
    instance_id: str | None = None,
    limit: int = 50,
) -> list[TaskRow]:
    """Task versions taken in or sent, newest first. A ``status`` that is no
    :class:`TaskSeenStatus` matches nothing (a search box, not an error)."""
    if status is not None and status not in set(TaskSeenStatus):
        return []
    query = select(
        TaskSeen.task_id,
        TaskSeen.task_version,
        TaskSeen.role,
        TaskSeen.status,
        TaskSeen.instance_id,
        TaskSeen.seen_at,
    )
    query = _filtered(
        query,
        (TaskSeen.role, role),
        (TaskSeen.status, status),
        (TaskSeen.instance_id, instance_id),
    )
    query = query.order_by(TaskSeen.seen_at.desc(), TaskSeen.task_id, TaskSeen.task_version)
    rows = await session.execute(query.limit(_page(limit)))
    return [TaskRow(*row) for row in rows]


async def list_audit_events(
    session: AsyncSession,
    *,
    subject: str | None = None,
    subjects: Sequence[str] = (),
    action: str | None = None,
    before: int | None = None,
    limit: int = 100,
) -> list[AuditRow]:
    """Audit events, newest first (in the order they were appended); ``before`` pages by id."""
    query = select(
        AuditEvent.id,
        AuditEvent.sequence,
        AuditEvent.occurred_at,
        AuditEvent.actor,
        AuditEvent.subject,
        AuditEvent.action,
        AuditEvent.reason,
        AuditEvent.payload_digest,
        AuditEvent.previous_hash,
        AuditEvent.event_hash,
    )
    wanted = [*subjects, *([subject] if subject is not None else [])]
    if wanted:
        query = query.where(AuditEvent.subject.in_(wanted))
    query = _filtered(query, (AuditEvent.action, action))
    if before is not None:
        query = query.where(AuditEvent.id < before)
    rows = await session.execute(query.order_by(AuditEvent.id.desc()).limit(_page(limit)))
    return [AuditRow(**row._asdict()) for row in rows]


async def instance_detail(session: AsyncSession, instance_id: str) -> InstanceDetail | None:
    row = (
        await session.execute(
            _instance_query()
            .add_columns(ProcessInstance.state, ProcessInstance.version)
            .where(ProcessInstance.id == instance_id)
        )
    ).one_or_none()
    if row is None:
        return None
    instance = InstanceRow(*row[:9])
    tasks = await list_tasks(session, instance_id=instance_id, limit=MAX_PAGE + 1)
    waits = await session.execute(
        select(
            MessageSubscription.element_id,
            MessageSubscription.message_name,
            MessageSubscription.business_key,
            MessageSubscription.correlation_key,
            MessageSubscription.created_at,
        )
        .where(MessageSubscription.instance_id == instance_id)
        .order_by(MessageSubscription.id)
    )
    timers = await session.execute(
        select(Timer.element_id, Timer.timer_id, Timer.due_at)
        .where(Timer.instance_id == instance_id)
        .order_by(Timer.due_at)
    )
    jobs = await session.execute(
        select(
            Job.kind, Job.due_at, Job.attempts, Job.retries_left, Job.last_error, Job.lease_owner
        )
        .where(Job.instance_id == instance_id)
        .order_by(Job.id)
    )
    outbox = await session.execute(
        select(
            OutboxEntry.kind,
            OutboxEntry.status,
            OutboxEntry.attempts,
            OutboxEntry.last_error,
            OutboxEntry.result,
            OutboxEntry.created_at,
            OutboxEntry.done_at,
        )
        .where(OutboxEntry.instance_id == instance_id)
        .order_by(OutboxEntry.id)
    )
    task_subjects = sorted({f"Task/{task.task_id}" for task in tasks})
    audit = await list_audit_events(
        session, subjects=[f"instance/{instance_id}", *task_subjects], limit=MAX_PAGE + 1
    )
    state = dict(row[9])
    return InstanceDetail(
        instance=instance,
        state=state,
        version=int(row[10]),
        tasks=tuple(reversed(tasks[:MAX_PAGE])),
        waits=tuple(WaitRow(*wait) for wait in waits),
        timers=tuple(TimerRow(*timer) for timer in timers),
        jobs=tuple(JobRow(*job) for job in jobs),
        outbox=tuple(OutboxRow(*entry) for entry in outbox),
        audit=tuple(reversed(audit[:MAX_PAGE])),
        tasks_truncated=len(tasks) > MAX_PAGE,
        audit_truncated=len(audit) > MAX_PAGE,
        incidents=tuple(
            IncidentRow(incident.token, incident.element, incident.message, incident.at)
            for incident in instance_state.incidents(state)
        ),
    )


async def count_store(session: AsyncSession, now: dt.datetime) -> StoreCounts:
    instances = await session.execute(
        select(ProcessDefinition.process_key, ProcessInstance.status, func.count())
        .join(ProcessDefinition, ProcessDefinition.id == ProcessInstance.definition_id)
        .group_by(ProcessDefinition.process_key, ProcessInstance.status)
    )
    tasks = await session.execute(
        select(TaskSeen.role, TaskSeen.status, func.count()).group_by(
            TaskSeen.role, TaskSeen.status
        )
    )
    leased = Job.lease_expires_at.is_not(None) & (Job.lease_expires_at > now)
    job_counts = (
        await session.execute(
            select(
                func.count().filter(~leased & (Job.due_at <= now)),
                func.count().filter(~leased & (Job.due_at > now)),
                func.count().filter(leased),
                func.count().filter(Job.last_error.is_not(None)),
            )
        )
    ).one()
    jobs = dict(zip(("due", "scheduled", "leased", "failing"), map(int, job_counts), strict=True))
    outbox = await session.execute(
        select(OutboxEntry.status, func.count()).group_by(OutboxEntry.status)
    )
    timers = (await session.execute(select(func.count()).select_from(Timer))).scalar_one()
    # The sealed chain's length (one row) and the few events not sealed yet: no table scan.
    sealed = (await session.execute(select(AuditHead.sequence))).scalar_one_or_none()
    unsealed = (
        await session.execute(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.sequence.is_(None))
        )
    ).scalar_one()
    head = int(sealed or 0) + int(unsealed)
    cursors = await session.execute(select(SyncCursor.resource_type, SyncCursor.last_updated))
    # Incidents live in the running instances' states (an execution parked on a job out of
    # retries): read those states, never the ended ones.
    incidents: dict[str, int] = {}
    running = await session.execute(
        select(ProcessDefinition.process_key, ProcessInstance.state)
        .join(ProcessDefinition, ProcessDefinition.id == ProcessInstance.definition_id)
        .where(ProcessInstance.status == "running")
    )
    for key, state in running:
        found = len(instance_state.incidents(state))
        if found:
            incidents[key] = incidents.get(key, 0) + found
    return StoreCounts(
        instances={(key, status): int(n) for key, status, n in instances},
        tasks={(role, status): int(n) for role, status, n in tasks},
        jobs=jobs,
        outbox={status: int(n) for status, n in outbox},
        timers=int(timers),
        audit_events=int(head or 0),
        cursors={resource_type: updated for resource_type, updated in cursors},
        incidents=incidents,
        audit_unsealed=int(unsealed),
    )
