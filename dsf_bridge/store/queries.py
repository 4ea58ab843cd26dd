"""Read-only queries for the admin API and web page: instances, their Tasks, waits and audit.

Nothing here writes. The runtime's queries live in :mod:`dsf_bridge.store.repository`; these
serve people who audit the store (``dsf_bridge.api``), so they page, filter and count, and they
return plain frozen records the API turns into JSON and HTML.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVarTuple

from sqlalchemy import Select, bindparam, func, or_, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from dsf_bridge.engine import state as instance_state
from dsf_bridge.store.kinds import OutboxKind, TaskSeenStatus
from dsf_bridge.store.tables import (
    COMPLETED_INSTANCE,
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
    not_by_index,
)

__all__ = [
    "AuditRow",
    "DefinitionRow",
    "IncidentRow",
    "InstanceDetail",
    "InstanceFacts",
    "InstanceRow",
    "JobRow",
    "OutboxRow",
    "ProcessLoad",
    "StoreCounts",
    "TaskDetail",
    "TaskFacts",
    "TaskRow",
    "TimerRow",
    "WaitRow",
    "count_store",
    "instance_detail",
    "instance_facts",
    "list_audit_events",
    "list_definitions",
    "list_instances",
    "list_tasks",
    "ping",
    "process_load",
    "task_cursor",
    "task_detail",
    "task_facts",
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
    # Unfiltered: read newest first from ix_process_instances_created. Filtered: the filter's
    # own index, and a sort of what it finds (SQLite would walk the whole time index).
    filtered = any(value is not None for value in (status, process_key, business_key))
    created = not_by_index(ProcessInstance.created_at) if filtered else ProcessInstance.created_at
    if before is not None:
        anchor = (
            await session.execute(
                select(ProcessInstance.created_at).where(ProcessInstance.id == before)
            )
        ).scalar_one_or_none()
        if anchor is None:
            return []
        query = query.where(
            created <= anchor,  # the index's range, as in list_tasks
            (created < anchor) | ((created == anchor) & (ProcessInstance.id < before)),
        )
    query = query.order_by(created.desc(), ProcessInstance.id.desc())
    rows = await session.execute(query.limit(_page(limit)))
    return [InstanceRow(*row) for row in rows]


def task_cursor(row: TaskRow) -> str:
    """The paging cursor after ``row`` (``before`` of :func:`list_tasks`): role, id, version.
    FHIR ids and versions hold no ``:``."""
    return f"{row.role}:{row.task_id}:{row.task_version}"


async def list_tasks(
    session: AsyncSession,
    *,
    role: str | None = None,
    status: str | None = None,
    instance_id: str | None = None,
    task_id: str | None = None,
    before: str | None = None,
    limit: int = 50,
) -> list[TaskRow]:
    """Task versions taken in or sent, newest first. A ``status`` that is no
    :class:`TaskSeenStatus` matches nothing (a search box, not an error). ``before`` is the
    :func:`task_cursor` of the last row of the previous page (keyset paging); a cursor that
    names no Task version gives an empty page."""
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
        (TaskSeen.task_id, task_id),
    )
    # As in list_instances: the time index for the unfiltered pages only.
    filtered = any(value is not None for value in (role, status, instance_id, task_id))
    seen_at = not_by_index(TaskSeen.seen_at) if filtered else TaskSeen.seen_at
    if before is not None:
        anchor_role, _, rest = before.partition(":")
        anchor_id, _, anchor_version = rest.partition(":")
        anchor = (
            await session.execute(
                select(TaskSeen.seen_at).where(
                    TaskSeen.role == anchor_role,
                    TaskSeen.task_id == anchor_id,
                    TaskSeen.task_version == anchor_version,
                )
            )
        ).scalar_one_or_none()
        if anchor is None:
            return []
        # The range first (``<=``, implied by the rest): it lets the database read the index
        # from the anchor on; the rest alone made SQLite sort every older version.
        query = query.where(
            seen_at <= anchor,
            (seen_at < anchor)
            | (
                (seen_at == anchor)
                & (
                    tuple_(TaskSeen.task_id, TaskSeen.task_version, TaskSeen.role)
                    > tuple_(anchor_id, anchor_version, anchor_role)
                )
            ),
        )
    query = query.order_by(seen_at.desc(), TaskSeen.task_id, TaskSeen.task_version, TaskSeen.role)
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
    # Counted by status and definition (ix_process_instances_status alone, not every instance
    # with its state), then summed per process key: a key has one definition per version.
    by_definition = (
        await session.execute(
            select(ProcessInstance.status, ProcessInstance.definition_id, func.count()).group_by(
                ProcessInstance.status, ProcessInstance.definition_id
            )
        )
    ).all()
    # Incidents live in the running instances' states (an execution parked on a job out of
    # retries); each row counts its own (written with the state), so no state is read.
    open_incidents = (
        await session.execute(
            select(ProcessInstance.definition_id, func.sum(ProcessInstance.incidents))
            .where(ProcessInstance.status == "running")
            .where(ProcessInstance.incidents > 0)
            .group_by(ProcessInstance.definition_id)
        )
    ).all()
    # Read after them: a definition is committed before its first instance, so each instance
    # counted finds its process key even when each statement reads its own snapshot.
    keys: dict[int, str] = {
        ident: key
        for ident, key in await session.execute(
            select(ProcessDefinition.id, ProcessDefinition.process_key)
        )
    }
    instances: dict[tuple[str, str], int] = {}
    for status, definition_id, n in by_definition:
        if definition_id in keys:  # as the join did (a foreign key: always)
            key = (keys[definition_id], status)
            instances[key] = instances.get(key, 0) + int(n)
    incidents: dict[str, int] = {}
    for definition_id, found in open_incidents:
        if definition_id in keys and found:
            incidents[keys[definition_id]] = incidents.get(keys[definition_id], 0) + int(found)
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
    return StoreCounts(
        instances=instances,
        tasks={(role, status): int(n) for role, status, n in tasks},
        jobs=jobs,
        outbox={status: int(n) for status, n in outbox},
        timers=int(timers),
        audit_events=int(head or 0),
        cursors={resource_type: updated for resource_type, updated in cursors},
        incidents=incidents,
        audit_unsealed=int(unsealed),
    )


# -- Tasks as an auditor reads them ---------------------------------------------------------


@dataclass(frozen=True)
class TaskFacts:
    """What the store knows of one Task in one direction, gathered from its intake records, the
    instance's audit events and the effects that finished or sent it.

    ``last_status`` is the status the bridge last set on the FHIR server or saw there, and
    ``status_source`` says which (the server may have moved on since: only a read from the
    server tells). ``requester`` is an audit actor (``organization:<id>``); for Tasks this site
    sent, ``recipient`` names the target instead.
    """

    task_id: str
    role: str
    message_name: str | None = None
    requester: str | None = None
    recipient: str | None = None
    last_status: str | None = None
    status_source: str = ""
    failure: str | None = None


@dataclass(frozen=True)
class TaskDetail:
    """One Task: every version seen in both directions, what is known of it, the instances it
    reached and the audit events that name it, oldest first."""

    task_id: str
    versions: tuple[TaskRow, ...]
    facts: tuple[TaskFacts, ...]
    instances: tuple[str, ...]
    audit: tuple[AuditRow, ...]


@dataclass(frozen=True)
class DefinitionRow:
    """A deployed process version and how many instances it has per status."""

    process_key: str
    version: str
    plugin: str
    status: str
    deployed_at: dt.datetime
    instances: Mapping[str, int]

    @property
    def total(self) -> int:
        return sum(self.instances.values())


# The instance's audit events that took a Task in end with ", Task/<id>" (runtime.delivery):
# "<process> by <message>, Task/<id>" (instance.started), "<message> at <element>, Task/<id>"
# (message.correlated).
_TAKEN_IN = re.compile(r"^(?P<head>.*), Task/(?P<task>[A-Za-z0-9\-.]{1,64})$")
_CREATED = re.compile(r"(?:^|/)Task/(?P<task>[A-Za-z0-9\-.]{1,64})(?:/|$)")


def _message_of(action: str, head: str) -> str | None:
    if action == "instance.started":
        _process, by, message = head.partition(" by ")
        return message if by and message != "none start event" else None
    message, at, _element = head.rpartition(" at ")
    return message if at else None


def _sent_task_id(result: str | None) -> str | None:
    """The id of a Task the bridge created: the gateway answers with its id or its URL."""
    if not result:
        return None
    found = _CREATED.search(result)
    return found.group("task") if found else result.rstrip("/").rsplit("/", 1)[-1]


def _target_label(target: object) -> str | None:
    if isinstance(target, Mapping):
        for key in ("organizationIdentifier", "organizationIdentifierValue", "endpointUrl"):
            if target.get(key):
                return f"organization:{target[key]}" if key != "endpointUrl" else str(target[key])
    return None


def _incoming_status(
    statuses: Sequence[TaskSeenStatus], finishing: Mapping[str, Any] | None
) -> tuple[str | None, str, str | None]:
    """(last status, where it comes from, failure) of a Task taken in."""
    if finishing is not None:
        completing = finishing["kind"] == "complete-task"
        word = "completed" if completing else "failed"
        reason = None if completing else str(finishing["payload"].get("message") or "")
        if finishing["status"] == "done":
            return word, f"set {word} by the bridge", reason
        if finishing["status"] == "failed":
            error = finishing["last_error"] or "no answer"
            return (
                "in-progress",
                f"set in-progress by the bridge; setting it {word} failed",
                f"setting it {word} failed: {error}" + (f" ({reason})" if reason else ""),
            )
        return "in-progress", f"set in-progress by the bridge; {word} pending", reason
    seen = set(statuses)
    if TaskSeenStatus.FAILED in seen:
        return "failed", "set failed by the bridge at intake", None
    if TaskSeenStatus.REFUSED in seen:
        return "requested", "as received; the server refused the bridge's update", None
    if TaskSeenStatus.SKIPPED in seen:
        return None, "skipped by the bridge", None
    if seen & {TaskSeenStatus.IN_PROGRESS, TaskSeenStatus.TAKEN_IN, TaskSeenStatus.HELD}:
        return "in-progress", "set in-progress by the bridge", None
    if seen == {TaskSeenStatus.CLAIMED_ELSEWHERE}:
        return None, "taken in by another bridge", None
    return "requested", "as received", None


async def task_facts(
    session: AsyncSession, rows: Sequence[TaskRow]
) -> dict[tuple[str, str], TaskFacts]:
    """What the store knows of the Tasks of ``rows``, by (Task id, role): a few queries for a
    whole page."""
    incoming = sorted({row.task_id for row in rows if row.role == "incoming"})
    instance_ids = sorted({row.instance_id for row in rows if row.instance_id})
    statuses: dict[str, list[TaskSeenStatus]] = {}
    finishing: dict[str, dict[str, Any]] = {}
    intake_reasons: dict[str, str] = {}
    taken_in: dict[str, tuple[str, str | None]] = {}  # Task id -> (requester, message name)
    if incoming:
        seen = await session.execute(
            select(TaskSeen.task_id, TaskSeen.status)
            .where(TaskSeen.role == "incoming", TaskSeen.task_id.in_(incoming))
            .order_by(TaskSeen.seen_at)
        )
        for seen_id, seen_status in seen:
            statuses.setdefault(seen_id, []).append(seen_status)
        # The completion or failure of each: by the instances that took them in (its key
        # names the instance), or by its key alone as written before the key did.
        keys = [f"{prefix}:{task_id}" for task_id in incoming for prefix in ("complete", "fail")]
        takers = sorted(
            {row.instance_id for row in rows if row.role == "incoming" and row.instance_id}
        )
        finished: ColumnElement[bool] = OutboxEntry.idempotency_key.in_(keys)
        if takers:
            finished = or_(
                finished,
                OutboxEntry.instance_id.in_(takers)
                & OutboxEntry.kind.in_((OutboxKind.COMPLETE_TASK, OutboxKind.FAIL_TASK)),
            )
        entries = await session.execute(
            select(
                OutboxEntry.kind,
                OutboxEntry.status,
                OutboxEntry.payload,
                OutboxEntry.last_error,
            )
            .where(finished)
            .order_by(OutboxEntry.id)
        )
        wanted = set(incoming)
        for kind, status, payload, last_error in entries:
            finished_id = (payload or {}).get("task_id")
            if finished_id in wanted:  # the newest wins
                finishing[finished_id] = {
                    "kind": str(kind),
                    "status": status,
                    "payload": payload or {},
                    "last_error": last_error,
                }
        intake_events = await session.execute(
            select(AuditEvent.subject, AuditEvent.reason)
            .where(AuditEvent.subject.in_([f"Task/{task_id}" for task_id in incoming]))
            .order_by(AuditEvent.id)
        )
        for subject, reason in intake_events:
            intake_reasons[subject.removeprefix("Task/")] = reason  # the newest wins
    sent: dict[str, tuple[str | None, str | None]] = {}  # Task id -> (message, recipient)
    if instance_ids:
        events = await session.execute(
            select(AuditEvent.actor, AuditEvent.action, AuditEvent.reason)
            .where(
                AuditEvent.subject.in_([f"instance/{i}" for i in instance_ids]),
                AuditEvent.action.in_(("instance.started", "message.correlated")),
            )
            .order_by(AuditEvent.id)
        )
        for actor, action, reason in events:
            match = _TAKEN_IN.match(reason)
            if match is not None:
                taken_in[match.group("task")] = (actor, _message_of(action, match.group("head")))
        sends = await session.execute(
            select(OutboxEntry.result, OutboxEntry.payload).where(
                OutboxEntry.kind == OutboxKind.SEND_TASK,
                OutboxEntry.instance_id.in_(instance_ids),
                OutboxEntry.status == "done",
            )
        )
        for result, payload in sends:
            sent_id = _sent_task_id(result)
            if sent_id is not None:
                body = payload or {}
                sent[sent_id] = (body.get("message_name"), _target_label(body.get("target")))
    facts: dict[tuple[str, str], TaskFacts] = {}
    for row in rows:
        key = (row.task_id, row.role)
        if key in facts:
            continue
        if row.role == "incoming":
            last, source, failure = _incoming_status(
                statuses.get(row.task_id, [TaskSeenStatus(row.status)]),
                finishing.get(row.task_id),
            )
            requester, message = taken_in.get(row.task_id, (None, None))
            facts[key] = TaskFacts(
                row.task_id,
                row.role,
                message_name=message,
                requester=requester,
                last_status=last,
                status_source=source,
                failure=failure or intake_reasons.get(row.task_id),
            )
        else:
            message, recipient = sent.get(row.task_id, (None, None))
            facts[key] = TaskFacts(
                row.task_id,
                row.role,
                message_name=message,
                recipient=recipient,
                last_status="requested",
                status_source="as sent",
            )
    return facts


async def task_detail(session: AsyncSession, task_id: str) -> TaskDetail | None:
    """One Task by id: its versions in both directions, their facts, and the audit events
    that name it (the intake's, and those of the instances it reached that name it)."""
    versions = await list_tasks(session, task_id=task_id, limit=MAX_PAGE)
    if not versions:
        return None
    facts = await task_facts(session, versions)
    instances = tuple(sorted({v.instance_id for v in versions if v.instance_id}))
    named = re.compile(rf"Task/{re.escape(task_id)}(?![A-Za-z0-9\-.])")
    events = await list_audit_events(
        session,
        subjects=[f"Task/{task_id}", *(f"instance/{i}" for i in instances)],
        limit=MAX_PAGE,
    )
    audit = [e for e in events if e.subject == f"Task/{task_id}" or named.search(e.reason)]
    return TaskDetail(
        task_id=task_id,
        versions=tuple(versions),
        facts=tuple(facts.values()),
        instances=instances,
        audit=tuple(reversed(audit)),
    )


async def list_definitions(session: AsyncSession) -> list[DefinitionRow]:
    """Every deployed process version with its instances per status, by key then version."""
    definitions = await session.execute(
        select(
            ProcessDefinition.id,
            ProcessDefinition.process_key,
            ProcessDefinition.version,
            ProcessDefinition.plugin,
            ProcessDefinition.status,
            ProcessDefinition.deployed_at,
        ).order_by(ProcessDefinition.process_key, ProcessDefinition.id)
    )
    counts: dict[int, dict[str, int]] = {}
    for definition_id, status, count in await session.execute(
        select(ProcessInstance.definition_id, ProcessInstance.status, func.count()).group_by(
            ProcessInstance.definition_id, ProcessInstance.status
        )
    ):
        counts.setdefault(definition_id, {})[status] = int(count)
    return [
        DefinitionRow(key, version, plugin, status, deployed_at, counts.get(ident, {}))
        for ident, key, version, plugin, status, deployed_at in definitions
    ]


@dataclass(frozen=True)
class InstanceFacts:
    """Who started an instance, by which message, and why it failed: from its audit trail."""

    started_by: str | None = None
    message_name: str | None = None
    failure: str | None = None


async def instance_facts(
    session: AsyncSession, instance_ids: Sequence[str]
) -> dict[str, InstanceFacts]:
    """The :class:`InstanceFacts` of each instance (one query for a page of them)."""
    if not instance_ids:
        return {}
    events = await session.execute(
        select(AuditEvent.subject, AuditEvent.actor, AuditEvent.action, AuditEvent.reason)
        .where(
            AuditEvent.subject.in_([f"instance/{i}" for i in instance_ids]),
            AuditEvent.action.in_(("instance.started", "instance.failed", "instance.cancelled")),
        )
        .order_by(AuditEvent.id)
    )
    started: dict[str, tuple[str, str | None]] = {}
    failures: dict[str, str] = {}
    for subject, actor, action, reason in events:
        instance_id = subject.removeprefix("instance/")
        if action == "instance.started":
            match = _TAKEN_IN.match(reason)
            head = match.group("head") if match is not None else reason
            started[instance_id] = (actor, _message_of(action, head))
        else:
            failures[instance_id] = reason  # the newest wins
    return {
        instance_id: InstanceFacts(
            started_by=started.get(instance_id, (None, None))[0],
            message_name=started.get(instance_id, (None, None))[1],
            failure=failures.get(instance_id),
        )
        for instance_id in instance_ids
    }


@dataclass(frozen=True)
class ProcessLoad:
    """How busy a process is: its running instances, and how long its latest completed
    instances took (seconds, newest first)."""

    running: int
    recent_durations: tuple[float, ...] = ()


async def process_load(session: AsyncSession, process_key: str, *, recent: int = 20) -> ProcessLoad:
    """The :class:`ProcessLoad` of ``process_key`` over all its deployed versions, from the
    ``recent`` latest completed instances (failed ones say nothing about how long work takes).
    Each version's latest are read from the top of ``ix_process_instances_completed``, never
    sorted from its whole history (an OMI provider's heartbeat asks every interval)."""
    running = (
        await session.execute(
            select(func.count())
            .select_from(ProcessInstance)
            .join(ProcessDefinition, ProcessDefinition.id == ProcessInstance.definition_id)
            .where(
                ProcessDefinition.process_key == process_key,
                ProcessInstance.status == "running",
            )
        )
    ).scalar_one()
    limit = max(1, recent)
    latest: list[tuple[dt.datetime, str, dt.datetime]] = []
    for definition_id in await session.scalars(
        select(ProcessDefinition.id).where(ProcessDefinition.process_key == process_key)
    ):
        rows = await session.execute(
            _LATEST_COMPLETED, {"definition_id": definition_id, "limit": limit}
        )
        latest.extend(
            (ended, instance_id, created)
            for created, ended, instance_id in rows
            if ended is not None  # the index holds none without an end
        )
    latest.sort(reverse=True)  # newest end first, then id, as each version's rows came
    durations = tuple(
        max(0.0, (ended - created).total_seconds()) for ended, _, created in latest[:limit]
    )
    return ProcessLoad(running=int(running), recent_durations=durations)


# The condition in the index's own words (COMPLETED_INSTANCE), for its planner to use it.
_LATEST_COMPLETED = (
    select(ProcessInstance.created_at, ProcessInstance.ended_at, ProcessInstance.id)
    .where(ProcessInstance.definition_id == bindparam("definition_id"), text(COMPLETED_INSTANCE))
    .order_by(ProcessInstance.ended_at.desc(), ProcessInstance.id.desc())
    .limit(bindparam("limit"))
)
