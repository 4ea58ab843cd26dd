"""Repositories: every query the runtime needs, on a session whose transaction the caller owns.

Nothing here commits. The runtime opens one transaction per step (``Database.transaction()``),
writes the instance's new state, its subscriptions, timers, jobs, outbox entries and audit
events through these functions, and the commit makes them durable together (the
transactional outbox of DESIGN section 4).

Work is claimed with leases: ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several
replicas can share one store without a cluster protocol; on SQLite the transaction's write lock
serializes claims (one process per SQLite file).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    CompoundSelect,
    Select,
    Table,
    bindparam,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.dml import Insert

from dsf_bridge.engine import state as instance_state
from dsf_bridge.errors import ConcurrencyError, StoreError, TaskAlreadyDeliveredError
from dsf_bridge.store import batched_pg
from dsf_bridge.store.database import Database, execute, on_conflict
from dsf_bridge.store.direct import DirectResult, Prepared
from dsf_bridge.store.kinds import JobKind, OutboxKind, TaskSeenStatus
from dsf_bridge.store.tables import (
    Job,
    MessageSubscription,
    OutboxEntry,
    ProcessDefinition,
    ProcessInstance,
    PseudonymMapping,
    SyncCursor,
    TaskSeen,
    Timer,
    not_by_index,
)

# The tables as Core sees them. Statements on the hot path of every Task (claims, steps, jobs,
# outbox entries) are written against these, not the ORM classes: an ORM-enabled statement
# costs about twice the CPU through the session (measured: an insert 170 µs against 90 µs).
_INSTANCES = cast(Table, ProcessInstance.__table__)
_JOBS = cast(Table, Job.__table__)
_OUTBOX = cast(Table, OutboxEntry.__table__)
_SEEN = cast(Table, TaskSeen.__table__)

# The hot path's statements, built once with bound parameters: building a statement costs more
# than running it (coercions and cache keys each time); a built one is compiled once too.


def _binds(*names: str) -> dict[str, Any]:
    """``name=bindparam(name)`` for each of ``names``: the values of a prebuilt statement."""
    return {name: bindparam(name) for name in names}


# Running instances by business key: one EXISTS (or SELECT) per key column, the status and the
# definition compared as expressions (``status || ''``, ``definition_id + 0``) that no index
# answers. Written as one EXISTS with an OR of the two key columns and plain comparisons,
# SQLite (without statistics, its default: nothing runs ANALYZE) looked the rows up by
# ix_process_instances_status and read every running instance, for every Task (44 ms per
# start message and its lookups with 50,000 waiting on this machine: bench/waiting.py), and
# PostgreSQL without statistics read the whole of that index (status, definition,
# incidents) for the definition's sake. So written, the key columns' indexes are the only
# ones that apply, on both databases: a key has a few rows at most, the rest is checked on
# them. The alternative key's index holds only the instances that have one (migration 0007),
# or SQLite's statistics would make it look useless (tests/store/test_repository.py).
_KEY_COLUMNS = (_INSTANCES.c.business_key, _INSTANCES.c.alternative_business_key)
_IS_RUNNING = _INSTANCES.c.status.concat("") == "running"


def _running_with_key(
    business_key: str | BindParameter[str], definition_id: int | BindParameter[int] | None = None
) -> ColumnElement[bool]:
    """A running instance (of ``definition_id``, if given) has ``business_key`` as its own
    business key or as DSF's alternative business key."""
    of_definition = (
        [] if definition_id is None else [(_INSTANCES.c.definition_id + 0) == definition_id]
    )
    return or_(
        *(
            exists().where(column == business_key, _IS_RUNNING, *of_definition)
            for column in _KEY_COLUMNS
        )
    )


def _running_ids_with_key(business_key: str) -> CompoundSelect[tuple[str]]:
    """The ids of the running instances with ``business_key`` (either key column)."""
    return union_all(
        *(
            select(_INSTANCES.c.id).where(column == business_key, _IS_RUNNING)
            for column in _KEY_COLUMNS
        )
    )


_SAVE_INSTANCE = (
    update(_INSTANCES)
    .where(_INSTANCES.c.id == bindparam("b_id"))
    .where(_INSTANCES.c.version == bindparam("b_version"))
    .values(
        state=bindparam("state"),
        incidents=bindparam("incidents"),
        status=bindparam("status"),
        version=bindparam("new_version"),
        updated_at=bindparam("updated_at"),
        ended_at=bindparam("ended_at"),
    )
)
_SAVE_CREATED_INSTANCE = Prepared(_SAVE_INSTANCE.execution_options(**{batched_pg.UNREAD: True}))
_SAVE_READ_INSTANCE = Prepared(_SAVE_INSTANCE)
# The columns a new instance is given.
_INSTANCE_BINDS = (
    "id",
    "definition_id",
    "business_key",
    "status",
    "state",
    "incidents",
    "version",
    "created_at",
    "updated_at",
    "ended_at",
)
_CREATE_INSTANCE = Prepared(insert(_INSTANCES).values(**_binds(*_INSTANCE_BINDS)))
# The same row, unless a running instance of the definition has the business key (as its own
# or as DSF's alternative business key): the check and the insert in one statement.
_CREATE_INSTANCE_UNLESS_RUNNING = Prepared(
    insert(_INSTANCES)
    .from_select(
        list(_INSTANCE_BINDS),
        select(
            *(bindparam(name, type_=_INSTANCES.c[name].type) for name in _INSTANCE_BINDS),
        ).where(~_running_with_key(bindparam("business_key"), bindparam("definition_id"))),
    )
    .returning(_INSTANCES.c.id)
)
_ENQUEUE_JOB = (
    insert(_JOBS)
    .values(
        **_binds(
            "instance_id",
            "kind",
            "payload",
            "due_at",
            "attempts",
            "retries_left",
            "lease_owner",
            "lease_expires_at",
        )
    )
    .returning(_JOBS.c.id)
)
_COMPLETE_JOB = (
    delete(_JOBS)
    .where(_JOBS.c.id == bindparam("b_id"))
    .where(_JOBS.c.lease_owner == bindparam("b_owner"))
)
_DELETE_JOBS_OF = (
    delete(_JOBS)
    .where(_JOBS.c.instance_id == bindparam("b_instance"))
    .where(_JOBS.c.kind != JobKind.OPERATOR)
)
# The jobs of an ended instance and the job whose step ended it, in one statement.
_END_JOBS_OF = (
    delete(_JOBS)
    .where(_JOBS.c.instance_id == bindparam("b_instance"))
    .where(or_(_JOBS.c.kind != JobKind.OPERATOR, _JOBS.c.id == bindparam("b_id")))
    .returning(_JOBS.c.id, _JOBS.c.lease_owner)
)
_GET_TASK_SEEN = select(
    _SEEN.c.task_id,
    _SEEN.c.task_version,
    _SEEN.c.role,
    _SEEN.c.status,
    _SEEN.c.instance_id,
    _SEEN.c.seen_at,
).where(
    _SEEN.c.task_id == bindparam("b_task"),
    _SEEN.c.task_version == bindparam("b_version"),
    _SEEN.c.role == bindparam("b_role"),
)
_TASKS_OF_INSTANCE = (
    select(_SEEN.c.task_id, func.min(_SEEN.c.seen_at).label("first_seen"))
    .where(_SEEN.c.instance_id == bindparam("b_instance"))
    .where(_SEEN.c.role == bindparam("b_role"))
    .group_by(_SEEN.c.task_id)
    .order_by("first_seen", _SEEN.c.task_id)
)
# Without ON CONFLICT: for a key that cannot exist yet (enqueue_new_outbox).
_QUEUE_OUTBOX = Prepared(
    insert(_OUTBOX)
    .inline()  # no RETURNING of the new id: nothing reads it
    .values(
        status="pending",
        failures=0,
        **_binds(
            "idempotency_key",
            "instance_id",
            "kind",
            "payload",
            "attempts",
            "next_attempt_at",
            "created_at",
            "lease_owner",
            "lease_expires_at",
        ),
    )
)
_MARK_OUTBOX_DONE = (
    update(_OUTBOX)
    .where(_OUTBOX.c.idempotency_key == bindparam("b_key"))
    .where(_OUTBOX.c.lease_owner == bindparam("b_owner"))
    .where(_OUTBOX.c.status == "pending")
    .values(
        status="done",
        result=bindparam("result"),
        done_at=bindparam("done_at"),
        lease_owner=None,
        lease_expires_at=None,
    )
)
_OUTBOX_DONE = Prepared(_MARK_OUTBOX_DONE.returning(_OUTBOX.c.id))
# The same, its answer unread: Database.soon's form (held with a transaction's other writes).
_OUTBOX_DONE_SOON = Prepared(_MARK_OUTBOX_DONE.execution_options(**{batched_pg.UNREAD: True}))
# Per dialect: INSERT ... ON CONFLICT DO NOTHING differs between the two.
_BY_DIALECT: dict[tuple[str, str], Any] = {}


def _for_dialect(session: AsyncSession, name: str, build: Callable[[str], Any]) -> Any:
    dialect = session.get_bind().dialect.name
    statement = _BY_DIALECT.get((name, dialect))
    if statement is None:
        statement = _BY_DIALECT[(name, dialect)] = build(dialect)
    return statement


__all__ = [
    "ClaimedJob",
    "ClaimedOutboxEntry",
    "InstanceRecord",
    "InstanceRunningError",
    "Lease",
    "SubscriptionKey",
    "TaskSeenRecord",
    "TimerKey",
    "add_timer",
    "advance_cursor",
    "any_running_with_business_key",
    "cancel_timer",
    "claim_jobs",
    "claim_outbox",
    "complete_job",
    "complete_job_ending",
    "create_instance",
    "delay_timer",
    "deploy_definition",
    "due_timers",
    "enqueue_job",
    "enqueue_new_outbox",
    "enqueue_outbox",
    "find_subscriptions",
    "get_cursor",
    "get_task_seen",
    "has_live_work",
    "hasten_jobs",
    "insert_ignoring_duplicates",
    "instances_waiting_for",
    "load_instance",
    "mark_outbox_done",
    "mark_outbox_done_soon",
    "mark_outbox_failed",
    "next_timer_due",
    "original_uids",
    "postpone_job",
    "record_pseudonyms",
    "record_task_seen",
    "release_leases",
    "replace_subscriptions",
    "retry_job",
    "retry_outbox",
    "running_instances_of",
    "save_instance",
    "sends_in_flight",
    "set_task_seen_status",
    "states_with_incidents",
    "take_in_task",
    "task_recipients",
    "tasks_of_instance",
    "tasks_with_status",
]


def insert_ignoring_duplicates(session: AsyncSession, table: Any) -> Insert:
    """``INSERT ... ON CONFLICT DO NOTHING`` in the session's dialect."""
    return _insert_ignoring_duplicates_in(session.get_bind().dialect.name, table)


def _insert_ignoring_duplicates_in(name: str, table: Any) -> Insert:
    return _insert_in(name, table).on_conflict_do_nothing()


def _insert_in(name: str, table: Any) -> postgresql.Insert | sqlite.Insert:
    """``INSERT`` in dialect ``name``, with its ``ON CONFLICT`` clauses."""
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise StoreError(f"unsupported database dialect {name!r}")  # pragma: no cover


# --- process definitions ------------------------------------------------------------------


async def deploy_definition(
    session: AsyncSession, *, process_key: str, version: str, plugin: str, model_hash: str
) -> int:
    """Record a deployed process and return its id; redeploying updates hash and plugin."""
    existing = (
        await session.execute(
            select(ProcessDefinition)
            .where(ProcessDefinition.process_key == process_key)
            .where(ProcessDefinition.version == version)
            .with_for_update()
        )
    ).scalar_one_or_none()
    if existing is None:
        definition = ProcessDefinition(
            process_key=process_key,
            version=version,
            plugin=plugin,
            model_hash=model_hash,
            status="active",
        )
        session.add(definition)
        await session.flush()
        return definition.id
    existing.model_hash = model_hash
    existing.plugin = plugin
    existing.status = "active"
    return existing.id


# --- instances ----------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceRecord:
    id: str
    definition_id: int
    business_key: str
    status: str
    state: dict[str, Any]
    version: int


class InstanceRunningError(Exception):
    """A running instance of the definition has the business key (:func:`create_instance`)."""


async def create_instance(
    session: AsyncSession,
    *,
    instance_id: str,
    definition_id: int,
    business_key: str,
    status: str,
    state: dict[str, Any],
    now: dt.datetime,
    unless_running: bool = False,
    version: int = 1,
) -> InstanceRecord:
    """Insert a new instance at ``version`` (1, or later when the caller's transaction also
    writes the steps that follow its start: the row is then written once, as it stands after
    them). ``unless_running``: raise :class:`InstanceRunningError` instead, in the same
    statement, when a running instance of the definition has the business key (on PostgreSQL
    after a transaction lock on the definition and key, so that two such starts at once create
    one instance)."""
    values = {
        "id": instance_id,
        "definition_id": definition_id,
        "business_key": business_key,
        "status": status,
        "state": state,
        "incidents": instance_state.incident_count(state),
        "version": version,
        "created_at": now,
        "updated_at": now,
        "ended_at": None if status == "running" else now,
    }
    if not unless_running:
        await execute(session, _CREATE_INSTANCE, values)
    else:
        if session.get_bind().dialect.name == "postgresql":
            # At READ COMMITTED two starts with the key at once would both find none running
            # and both insert (SQLite's writers take turns): the second waits here for the
            # first's commit, and its insert then sees that instance.
            await session.execute(
                _LOCK_BUSINESS_KEY, {"definition_id": definition_id, "business_key": business_key}
            )
        if (await execute(session, _CREATE_INSTANCE_UNLESS_RUNNING, values)).first() is None:
            raise InstanceRunningError(business_key)
    return InstanceRecord(instance_id, definition_id, business_key, status, state, version)


_LOCK_BUSINESS_KEY = text(
    "SELECT pg_advisory_xact_lock("
    "hashtextextended(CAST(:definition_id AS text) || ':' || :business_key, 0))"
).bindparams(
    bindparam("definition_id", type_=_INSTANCES.c.definition_id.type),
    bindparam("business_key", type_=_INSTANCES.c.business_key.type),
)


# The columns of an InstanceRecord, in its field order.
_INSTANCE_COLUMNS = (
    _INSTANCES.c.id,
    _INSTANCES.c.definition_id,
    _INSTANCES.c.business_key,
    _INSTANCES.c.status,
    _INSTANCES.c.state,
    _INSTANCES.c.version,
)


_LOAD_INSTANCE = select(*_INSTANCE_COLUMNS).where(_INSTANCES.c.id == bindparam("b_id"))


async def load_instance(session: AsyncSession, instance_id: str) -> InstanceRecord | None:
    row = (await session.execute(_LOAD_INSTANCE, {"b_id": instance_id})).one_or_none()
    return None if row is None else InstanceRecord(*row)


async def all_instances(session: AsyncSession) -> list[InstanceRecord]:
    """Every instance, oldest first (the test harness; a site has too many for this)."""
    rows = await session.execute(
        select(*_INSTANCE_COLUMNS).order_by(ProcessInstance.created_at, ProcessInstance.id)
    )
    return [InstanceRecord(*row) for row in rows]


async def count_timers(session: AsyncSession) -> int:
    """How many timers wait, of every instance."""
    return int(await session.scalar(select(func.count()).select_from(Timer)) or 0)


async def next_due(session: AsyncSession) -> dt.datetime | None:
    """When the next timer, job (not parked) or pending outbox entry falls due, leases aside:
    how a test clock knows where to move next."""
    moments = [
        await session.scalar(select(func.min(Timer.due_at))),
        await session.scalar(select(func.min(Job.due_at)).where(Job.retries_left >= 0)),
        await session.scalar(
            select(func.min(OutboxEntry.next_attempt_at)).where(OutboxEntry.status == "pending")
        ),
    ]
    found = [moment for moment in moments if moment is not None]
    return min(found) if found else None


async def save_instance(
    session: AsyncSession,
    record: InstanceRecord,
    *,
    state: dict[str, Any],
    status: str,
    now: dt.datetime,
    ended: bool = False,
    created_here: bool = False,
) -> InstanceRecord:
    """Write a new state if nobody changed the instance since ``record`` was read.

    Raises :class:`ConcurrencyError` (retryable) when the version moved on: the caller reloads
    and replays its event on the fresh state. ``created_here``: the caller's transaction
    created the instance, which nobody else sees before it commits; the version is not
    checked, and on PostgreSQL the write waits for the transaction's next read or its commit
    (:mod:`dsf_bridge.store.batched_pg`) instead of a round trip of its own.
    """
    result = await execute(
        session,
        _SAVE_CREATED_INSTANCE if created_here else _SAVE_READ_INSTANCE,
        {
            "b_id": record.id,
            "b_version": record.version,
            "state": state,
            "incidents": instance_state.incident_count(state),
            "status": status,
            "new_version": record.version + 1,
            "updated_at": now,
            "ended_at": now if ended else None,
        },
    )
    if not created_here and result.rowcount != 1:
        raise ConcurrencyError(
            f"instance {record.id} changed since version {record.version} was read"
        )
    return InstanceRecord(
        record.id, record.definition_id, record.business_key, status, state, record.version + 1
    )


# --- message subscriptions ----------------------------------------------------------------


@dataclass(frozen=True)
class SubscriptionKey:
    execution_id: str
    element_id: str
    message_name: str
    business_key: str
    correlation_key: str | None = None


async def replace_subscriptions(
    session: AsyncSession, instance_id: str, subscriptions: Sequence[SubscriptionKey]
) -> None:
    """Make the instance's stored subscriptions exactly ``subscriptions``."""
    await session.execute(
        delete(MessageSubscription).where(MessageSubscription.instance_id == instance_id)
    )
    session.add_all(
        MessageSubscription(
            instance_id=instance_id,
            execution_id=sub.execution_id,
            element_id=sub.element_id,
            message_name=sub.message_name,
            business_key=sub.business_key,
            correlation_key=sub.correlation_key,
        )
        for sub in subscriptions
    )
    await session.flush()


async def instances_waiting_for(session: AsyncSession, message_name: str) -> list[str]:
    """Ids of the instances with a subscription of this name, whatever their business key
    (signals: the runtime stores signal waits as subscriptions of a reserved name)."""
    rows = await session.execute(
        select(MessageSubscription.instance_id)
        .where(MessageSubscription.message_name == message_name)
        .distinct()
        .order_by(MessageSubscription.instance_id)
    )
    return [row.instance_id for row in rows]


async def states_with_incidents(
    session: AsyncSession,
) -> list[tuple[str, str, dict[str, Any]]]:
    """``(instance id, process key, state)`` of every running instance with an incident,
    oldest first: found by the count kept beside each state, no other state is read."""
    rows = (
        await session.execute(
            select(ProcessInstance.id, ProcessDefinition.process_key, ProcessInstance.state)
            .join(ProcessDefinition, ProcessDefinition.id == ProcessInstance.definition_id)
            .where(ProcessInstance.status == "running")
            .where(ProcessInstance.incidents > 0)
            # By the status index and a sort of the few found, not along the time index.
            .order_by(not_by_index(ProcessInstance.created_at), ProcessInstance.id)
        )
    ).all()
    return [(str(i), str(key), dict(state)) for i, key, state in rows]


async def running_instances_of(session: AsyncSession, definition_ids: Sequence[int]) -> list[str]:
    """Ids of the running instances of these deployed definitions."""
    if not definition_ids:
        return []
    rows = await session.execute(
        select(ProcessInstance.id)
        .where(ProcessInstance.definition_id.in_(definition_ids))
        .where(ProcessInstance.status == "running")
        .order_by(ProcessInstance.id)
    )
    return [row.id for row in rows]


async def running_with_business_key(
    session: AsyncSession, definition_id: int, business_key: str
) -> bool:
    """Whether a running instance of this deployed definition has this business key (or
    this alternative business key)."""
    running = _running_with_key(business_key, definition_id)
    return bool((await session.execute(select(running))).scalar_one())


async def any_running_with_business_key(session: AsyncSession, business_key: str) -> bool:
    """Whether any running instance has this business key (or alternative business key)."""
    return bool((await session.execute(select(_running_with_key(business_key)))).scalar_one())


async def set_alternative_business_key(
    session: AsyncSession, instance_id: str, alternative_business_key: str
) -> None:
    """Record the alternative business key of an instance (its state says which)."""
    await session.execute(
        update(ProcessInstance)
        .where(ProcessInstance.id == instance_id)
        .values(alternative_business_key=alternative_business_key)
        .execution_options(synchronize_session=False)
    )


async def claim_alternative_business_key(
    session: AsyncSession, instance_id: str, proposed: str
) -> str:
    """The instance's one alternative business key: ``proposed`` if it has none yet, else the
    one it has (two sends prepared side by side agree on the first)."""
    await session.execute(
        update(ProcessInstance)
        .where(ProcessInstance.id == instance_id)
        .where(ProcessInstance.alternative_business_key.is_(None))
        .values(alternative_business_key=proposed)
        .execution_options(synchronize_session=False)
    )
    stored = await session.execute(
        select(ProcessInstance.alternative_business_key).where(ProcessInstance.id == instance_id)
    )
    return stored.scalar_one_or_none() or proposed


async def has_live_work(session: AsyncSession, instance_id: str) -> bool:
    """Whether the instance has work that will move it on: a job other than a signal job with
    retries left, or a Task send still to perform."""
    job = await session.execute(
        select(Job.id)
        .where(Job.instance_id == instance_id)
        .where(Job.kind != JobKind.SIGNAL)
        .where(Job.retries_left >= 0)
        .limit(1)
    )
    if job.first() is not None:
        return True
    send = await session.execute(
        select(OutboxEntry.id)
        .where(OutboxEntry.instance_id == instance_id)
        .where(OutboxEntry.kind == OutboxKind.SEND_TASK)
        .where(OutboxEntry.status == "pending")
        .limit(1)
    )
    return send.first() is not None


async def postpone_job(
    session: AsyncSession,
    job_id: int,
    owner: str,
    *,
    due_at: dt.datetime,
    interrupted: bool = False,
    error: str | None = None,
) -> None:
    """Release a leased job to run again at ``due_at`` without using up a retry;
    ``interrupted``: the store went away under it (counted in ``interruptions``); ``error``:
    why, kept as its last error."""
    changes: dict[str, Any] = {"due_at": due_at, "lease_owner": None, "lease_expires_at": None}
    if interrupted:
        changes["interruptions"] = Job.interruptions + 1
    if error is not None:
        changes["last_error"] = error
    result = await session.execute(
        update(Job)
        .where(Job.id == job_id)
        .where(Job.lease_owner == owner)
        .values(**changes)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise ConcurrencyError(f"job {job_id} is no longer leased to {owner}")


async def delete_jobs_of(session: AsyncSession, instance_id: str) -> int:
    """Remove the jobs of an ended instance (Camunda deletes an execution's jobs with it): a
    handler or send still queued for it never runs. Operators' requests stay, to be answered
    ``operator.refused``. Returns how many were removed."""
    result = await session.execute(_DELETE_JOBS_OF, {"b_instance": instance_id})
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def complete_job_ending(
    session: AsyncSession, job_id: int, owner: str, instance_id: str
) -> int:
    """:func:`complete_job` and :func:`delete_jobs_of` in one statement, for the step of job
    ``job_id`` that ended its instance; a lease lost to another worker is an error (and the
    caller's transaction undoes the deletions). Returns how many other jobs were removed."""
    rows = (await session.execute(_END_JOBS_OF, {"b_instance": instance_id, "b_id": job_id})).all()
    if not any(found == job_id and holder == owner for found, holder in rows):
        raise ConcurrencyError(f"job {job_id} is no longer leased to {owner}")
    return len(rows) - 1


async def renew_job_lease(
    session: AsyncSession, job_id: int, owner: str, *, now: dt.datetime, lease: dt.timedelta
) -> bool:
    """Lease job ``job_id`` to ``owner`` for ``lease`` from ``now`` again; False when the job
    is gone (its instance ended) or another worker holds it now."""
    result = await session.execute(
        update(Job)
        .where(Job.id == job_id)
        .where(Job.lease_owner == owner)
        .values(lease_expires_at=now + lease)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


async def hasten_jobs(
    session: AsyncSession, instance_id: str, kind: JobKind, due_at: dt.datetime
) -> None:
    """Make the instance's unleased jobs of ``kind`` due at ``due_at`` at the latest."""
    await session.execute(
        update(Job)
        .where(Job.instance_id == instance_id)
        .where(Job.kind == kind)
        .where(Job.lease_owner.is_(None))
        .where(Job.due_at > due_at)
        .values(due_at=due_at)
        .execution_options(synchronize_session=False)
    )


async def find_subscriptions(
    session: AsyncSession,
    *,
    message_name: str,
    business_key: str,
    correlation_key: str | None,
) -> list[tuple[str, SubscriptionKey]]:
    """Waiting catches that an incoming message matches, as (instance id, subscription).

    As in DSF, a Task without a correlation key matches by business key alone; a Task with one
    matches only executions waiting with that correlation key.
    """
    query = (
        select(MessageSubscription)
        .where(MessageSubscription.message_name == message_name)
        .where(MessageSubscription.business_key == business_key)
        .order_by(MessageSubscription.id)
    )
    if correlation_key is not None:
        query = query.where(MessageSubscription.correlation_key == correlation_key)
    rows = (await session.scalars(query)).all()
    return [
        (
            row.instance_id,
            SubscriptionKey(
                row.execution_id,
                row.element_id,
                row.message_name,
                row.business_key,
                row.correlation_key,
            ),
        )
        for row in rows
    ]


# --- timers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimerKey:
    timer_id: str
    element_id: str
    due_at: dt.datetime


async def add_timer(session: AsyncSession, instance_id: str, timer: TimerKey) -> None:
    session.add(
        Timer(
            instance_id=instance_id,
            timer_id=timer.timer_id,
            element_id=timer.element_id,
            due_at=timer.due_at,
        )
    )
    await session.flush()


async def cancel_timer(session: AsyncSession, instance_id: str, timer_id: str) -> None:
    """Remove a timer (fired or cancelled); removing one that is gone is not an error."""
    await session.execute(
        delete(Timer).where(Timer.instance_id == instance_id).where(Timer.timer_id == timer_id)
    )


async def delay_timer(
    session: AsyncSession, instance_id: str, timer_id: str, due_at: dt.datetime
) -> None:
    """Move a timer's moment to ``due_at`` (a timer whose step crashed, tried again later)."""
    await session.execute(
        update(Timer)
        .where(Timer.instance_id == instance_id)
        .where(Timer.timer_id == timer_id)
        .values(due_at=due_at)
        .execution_options(synchronize_session=False)
    )


async def due_timers(
    session: AsyncSession, now: dt.datetime, limit: int = 100
) -> list[tuple[str, TimerKey]]:
    """Timers due at ``now``, earliest first, locked against other replicas."""
    rows = (
        await session.scalars(
            select(Timer)
            .where(Timer.due_at <= now)
            .order_by(Timer.due_at, Timer.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    ).all()
    return [(row.instance_id, TimerKey(row.timer_id, row.element_id, row.due_at)) for row in rows]


async def next_timer_due(session: AsyncSession) -> dt.datetime | None:
    """When the earliest timer is due (workers sleep until then)."""
    return (await session.execute(select(func.min(Timer.due_at)))).scalar_one_or_none()


# --- jobs ---------------------------------------------------------------------------------


# Who holds a lease and until when.
Lease = tuple[str, dt.datetime]


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    instance_id: str | None
    kind: JobKind
    payload: dict[str, Any]
    attempts: int
    retries_left: int
    interruptions: int = 0
    # The instance as the commit that queued this job left it, for a job run right after that
    # commit: its step need not read the instance again (a version moved meanwhile is caught
    # when the step saves, and the step is replayed on the instance as read then).
    instance: InstanceRecord | None = None
    # A handler job whose handler already runs (started before the commit that queued the
    # job, see InstanceStepper.run_inline): the job awaits it instead of calling it again.
    running: asyncio.Future[Any] | None = None
    running_since: float | None = None  # when that call began (time.perf_counter())


async def enqueue_job(
    session: AsyncSession,
    *,
    kind: JobKind,
    payload: dict[str, Any],
    due_at: dt.datetime,
    instance_id: str | None = None,
    retries: int = 3,
    leased_to: Lease | None = None,
) -> int:
    """Queue a job; ``leased_to`` queues it leased already (its first attempt taken), for the
    runtime to run it right after the commit instead of finding it in a polling round."""
    owner, expires = leased_to if leased_to is not None else (None, None)
    result = await session.execute(
        _ENQUEUE_JOB,
        {
            "instance_id": instance_id,
            "kind": kind,
            "payload": payload,
            "due_at": due_at,
            "attempts": 0 if leased_to is None else 1,
            "retries_left": retries,
            "lease_owner": owner,
            "lease_expires_at": expires,
        },
    )
    return int(result.scalar_one())


_Leased = TypeVar("_Leased", Job, OutboxEntry)


async def _lease(
    session: AsyncSession,
    model: type[_Leased],
    query: Select[_Leased],
    *,
    owner: str,
    now: dt.datetime,
    lease: dt.timedelta,
    limit: int,
) -> list[_Leased]:
    """Lease the rows of ``query`` that nobody holds (or whose lease expired) to ``owner``.

    ``FOR UPDATE SKIP LOCKED`` lets replicas on PostgreSQL claim side by side without taking
    the same row; on SQLite the transaction's write lock serializes claims.
    """
    rows = (
        await session.scalars(
            query.where((model.lease_expires_at.is_(None)) | (model.lease_expires_at < now))
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    ).all()
    for row in rows:
        row.lease_owner = owner
        row.lease_expires_at = now + lease
        row.attempts += 1
    await session.flush()
    return list(rows)


async def claim_jobs(
    session: AsyncSession,
    *,
    owner: str,
    now: dt.datetime,
    lease: dt.timedelta,
    limit: int = 10,
) -> list[ClaimedJob]:
    """Lease due jobs that nobody holds (or whose lease expired) to ``owner``."""
    query = (
        select(Job)
        .where(Job.due_at <= now)
        .where(Job.retries_left >= 0)
        # A kind only a newer release knows stays for it: one such row must not stop the rest.
        .where(Job.kind.in_(list(JobKind)))
        .order_by(Job.due_at, Job.id)
    )
    jobs = await _lease(session, Job, query, owner=owner, now=now, lease=lease, limit=limit)
    return [
        ClaimedJob(
            job.id,
            job.instance_id,
            job.kind,
            job.payload,
            job.attempts,
            job.retries_left,
            job.interruptions,
        )
        for job in jobs
    ]


async def complete_job(session: AsyncSession, job_id: int, owner: str) -> None:
    """Remove a finished job; a lease that was lost to another worker is an error."""
    result = await session.execute(_COMPLETE_JOB, {"b_id": job_id, "b_owner": owner})
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise ConcurrencyError(f"job {job_id} is no longer leased to {owner}")


async def retry_job(
    session: AsyncSession, job_id: int, owner: str, *, error: str, retry_at: dt.datetime
) -> int:
    """Release a failed job for another attempt at ``retry_at``; return the retries left.

    With no retries left the job stays, released and not due again (``retries_left = -1``),
    for the runtime to turn into an incident.
    """
    job = (
        await session.execute(select(Job).where(Job.id == job_id).with_for_update())
    ).scalar_one_or_none()
    if job is None or job.lease_owner != owner:
        raise ConcurrencyError(f"job {job_id} is no longer leased to {owner}")
    job.retries_left -= 1
    job.last_error = error
    job.due_at = retry_at
    job.lease_owner = None
    job.lease_expires_at = None
    await session.flush()
    return job.retries_left


# --- Tasks seen ---------------------------------------------------------------------------


_RECORD_TASK_SEEN = Prepared(
    lambda dialect: (
        _insert_ignoring_duplicates_in(dialect, _SEEN)
        .values(**_binds("task_id", "task_version", "role", "status", "instance_id", "seen_at"))
        .returning(_SEEN.c.task_id)
    )
)


async def _run(store: AsyncSession | Database, prepared: Prepared, values: Any) -> DirectResult:
    """``prepared`` in the session's transaction, or alone on the database (committed on its
    own: :meth:`Database.run`)."""
    if isinstance(store, Database):
        return await store.run(prepared, values)
    return await execute(store, prepared, values)


async def record_task_seen(
    store: AsyncSession | Database,
    *,
    task_id: str,
    task_version: str,
    role: str,
    status: TaskSeenStatus,
    instance_id: str | None = None,
) -> bool:
    """Remember a Task version; ``False`` when it was seen before (intake is idempotent).
    On a :class:`Database`: one statement, committed on its own."""
    result = await _run(
        store,
        _RECORD_TASK_SEEN,
        {
            "task_id": task_id,
            "task_version": task_version,
            "role": role,
            "status": status,
            "instance_id": instance_id,
            "seen_at": dt.datetime.now(dt.UTC),
        },
    )
    return result.first() is not None


# The version taken in: a plain insert, which a row of that version already there refuses.
_TAKE_IN = Prepared(
    insert(_SEEN).values(
        **_binds("task_id", "task_version", "role", "status", "instance_id", "seen_at")
    )
)


def _mark_taken_in(dialect: str) -> Any:
    """The claimed version marked taken in (inserted so, should its claim be gone)."""
    statement = _insert_in(dialect, _SEEN).values(
        **_binds("task_id", "task_version", "role", "status", "instance_id", "seen_at")
    )
    return statement.on_conflict_do_update(
        index_elements=[_SEEN.c.task_id, _SEEN.c.task_version, _SEEN.c.role],
        set_={"status": statement.excluded.status, "instance_id": statement.excluded.instance_id},
    )


_MARK_TAKEN_IN = Prepared(_mark_taken_in)


async def take_in_task(
    session: AsyncSession,
    *,
    task_id: str,
    task_version: str,
    claimed_version: str | None,
    instance_id: str,
) -> None:
    """Record an incoming Task version ``in-progress`` at ``instance_id`` and mark the version
    intake claimed (if any) taken in. A version recorded before makes the transaction (a
    :meth:`~dsf_bridge.store.database.Database.transaction`) leave as
    :class:`~dsf_bridge.errors.TaskAlreadyDeliveredError`, rolled back with the claim
    unchanged: on SQLite at once, on PostgreSQL at its next read or its commit, since nothing
    here is read back (both writes are held for that round trip,
    :mod:`dsf_bridge.store.batched_pg`)."""
    delivered = TaskAlreadyDeliveredError(
        f"Task/{task_id} version {task_version} was delivered already"
    )
    now = dt.datetime.now(dt.UTC)
    if claimed_version is None or claimed_version == task_version:
        if not await record_task_seen(
            session,
            task_id=task_id,
            task_version=task_version,
            role="incoming",
            status=TaskSeenStatus.IN_PROGRESS,
            instance_id=instance_id,
        ):
            raise delivered
        if claimed_version is not None:  # one row for both: inserted, then marked
            await set_task_seen_status(
                session, task_id, task_version, TaskSeenStatus.TAKEN_IN, instance_id=instance_id
            )
        return
    on_conflict(session, _SEEN.name, delivered)
    row = {"task_id": task_id, "role": "incoming", "instance_id": instance_id, "seen_at": now}
    await execute(
        session,
        _TAKE_IN,
        {**row, "task_version": task_version, "status": TaskSeenStatus.IN_PROGRESS},
    )
    await execute(
        session,
        _MARK_TAKEN_IN,
        {**row, "task_version": claimed_version, "status": TaskSeenStatus.TAKEN_IN},
    )


@dataclass(frozen=True)
class TaskSeenRecord:
    task_id: str
    task_version: str
    role: str
    status: TaskSeenStatus
    instance_id: str | None
    seen_at: dt.datetime | None = None


async def get_task_seen(
    session: AsyncSession, task_id: str, task_version: str, role: str = "incoming"
) -> TaskSeenRecord | None:
    row = (
        await session.execute(
            _GET_TASK_SEEN, {"b_task": task_id, "b_version": task_version, "b_role": role}
        )
    ).one_or_none()
    return None if row is None else TaskSeenRecord(*row)


async def set_task_seen_status(
    session: AsyncSession,
    task_id: str,
    task_version: str,
    status: TaskSeenStatus,
    *,
    instance_id: str | None = None,
    role: str = "incoming",
    only_from: Sequence[TaskSeenStatus] | None = None,
) -> bool:
    """Set a Task version's intake status; with ``only_from``, only when its status is one of
    those (compare and set, for replicas). ``True`` when a row changed."""
    values: dict[str, Any] = {"status": status}
    if instance_id is not None:
        values["instance_id"] = instance_id
    statement = (
        update(_SEEN)
        .where(_SEEN.c.task_id == task_id)
        .where(_SEEN.c.task_version == task_version)
        .where(_SEEN.c.role == role)
    )
    if only_from is not None:
        statement = statement.where(_SEEN.c.status.in_(only_from))
    result = await session.execute(statement.values(**values).returning(_SEEN.c.task_id))
    return result.first() is not None


async def tasks_with_status(
    session: AsyncSession, role: str, status: TaskSeenStatus
) -> list[TaskSeenRecord]:
    """Task versions in one intake state, e.g. the ``claiming`` ones to recover at start-up."""
    rows = await session.execute(
        select(
            TaskSeen.task_id,
            TaskSeen.task_version,
            TaskSeen.role,
            TaskSeen.status,
            TaskSeen.instance_id,
            TaskSeen.seen_at,
        )
        .where(TaskSeen.role == role)
        .where(TaskSeen.status == status)
        .order_by(TaskSeen.seen_at)
    )
    return [TaskSeenRecord(*row) for row in rows]


async def tasks_of_instance(session: AsyncSession, instance_id: str, role: str) -> list[str]:
    """Ids of the Tasks an instance took in (``incoming``) or sent (``outgoing``), oldest first."""
    rows = await session.execute(_TASKS_OF_INSTANCE, {"b_instance": instance_id, "b_role": role})
    return [row.task_id for row in rows]


# --- outbox -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedOutboxEntry:
    """An effect leased to this runtime; the store finds it by its ``idempotency_key``
    (``id`` is ``None`` for an entry queued by :func:`enqueue_new_outbox`, whose id was not
    read)."""

    id: int | None
    idempotency_key: str
    instance_id: str | None
    kind: OutboxKind
    payload: dict[str, Any]
    attempts: int
    failures: int = 0


async def enqueue_outbox(
    session: AsyncSession,
    *,
    idempotency_key: str,
    kind: OutboxKind,
    payload: dict[str, Any],
    instance_id: str | None = None,
    now: dt.datetime,
    leased_to: Lease | None = None,
) -> int | None:
    """Queue an effect and return its id; ``None`` if an effect with this key was queued
    before. ``leased_to`` queues it leased already (see :func:`enqueue_job`)."""
    result = await session.execute(
        insert_ignoring_duplicates(session, _OUTBOX)
        .values(
            status="pending",
            **_outbox_row(
                idempotency_key=idempotency_key,
                kind=kind,
                payload=payload,
                instance_id=instance_id,
                now=now,
                leased_to=leased_to,
            ),
        )
        .returning(_OUTBOX.c.id)
    )
    row = result.first()
    return None if row is None else int(row[0])


def _outbox_row(
    *,
    idempotency_key: str,
    kind: OutboxKind,
    payload: dict[str, Any],
    instance_id: str | None,
    now: dt.datetime,
    leased_to: Lease | None,
) -> dict[str, Any]:
    """The columns of a new outbox entry, but its status (pending)."""
    owner, expires = leased_to if leased_to is not None else (None, None)
    return {
        "idempotency_key": idempotency_key,
        "instance_id": instance_id,
        "kind": kind,
        "payload": payload,
        "attempts": 0 if leased_to is None else 1,
        "next_attempt_at": now,
        "created_at": now,
        "lease_owner": owner,
        "lease_expires_at": expires,
    }


async def enqueue_new_outbox(
    session: AsyncSession,
    *,
    idempotency_key: str,
    kind: OutboxKind,
    payload: dict[str, Any],
    instance_id: str | None,
    now: dt.datetime,
    leased_to: Lease | None = None,
) -> None:
    """Queue an effect of an instance the caller's transaction created, with a key not used
    before (the instance's own): nothing is read back, so on PostgreSQL the insert waits for
    the transaction's next read or its commit (:mod:`dsf_bridge.store.batched_pg`). A key
    that exists after all fails the transaction (no effect is queued twice)."""
    await execute(
        session,
        _QUEUE_OUTBOX,
        _outbox_row(
            idempotency_key=idempotency_key,
            kind=kind,
            payload=payload,
            instance_id=instance_id,
            now=now,
            leased_to=leased_to,
        ),
    )


async def claim_outbox(
    session: AsyncSession,
    *,
    owner: str,
    now: dt.datetime,
    lease: dt.timedelta,
    limit: int = 10,
) -> list[ClaimedOutboxEntry]:
    """Lease pending effects that are due and not leased (or whose lease expired)."""
    query = (
        select(OutboxEntry)
        .where(OutboxEntry.status == "pending")
        .where(OutboxEntry.next_attempt_at <= now)
        .where(OutboxEntry.kind.in_(list(OutboxKind)))  # as claim_jobs: newer kinds stay
        .order_by(OutboxEntry.next_attempt_at, OutboxEntry.id)
    )
    entries = await _lease(
        session, OutboxEntry, query, owner=owner, now=now, lease=lease, limit=limit
    )
    return [
        ClaimedOutboxEntry(
            entry.id,
            entry.idempotency_key,
            entry.instance_id,
            entry.kind,
            entry.payload,
            entry.attempts,
            entry.failures,
        )
        for entry in entries
    ]


async def _release(session: AsyncSession, key: str, owner: str, **changes: object) -> None:
    """Apply ``changes`` to the entry with idempotency key ``key`` if ``owner`` still leases
    it, and give up the lease (one statement: the lease is checked by the UPDATE itself)."""
    result = await session.execute(
        update(_OUTBOX)
        .where(_OUTBOX.c.idempotency_key == key)
        .where(_OUTBOX.c.lease_owner == owner)
        .where(_OUTBOX.c.status == "pending")
        .values(**changes, lease_owner=None, lease_expires_at=None)
        .returning(_OUTBOX.c.id)
    )
    if result.first() is None:
        raise ConcurrencyError(f"outbox entry {key} is no longer leased to {owner}")


async def mark_outbox_done(
    store: AsyncSession | Database,
    key: str,
    owner: str,
    *,
    result: str | None,
    now: dt.datetime,
) -> None:
    """Record the effect with idempotency key ``key`` done, if ``owner`` still leases it.
    On a :class:`Database`: one statement, committed on its own."""
    released = await _run(
        store, _OUTBOX_DONE, {"b_key": key, "b_owner": owner, "result": result, "done_at": now}
    )
    if released.first() is None:
        raise ConcurrencyError(f"outbox entry {key} is no longer leased to {owner}")


def mark_outbox_done_soon(
    database: Database, key: str, owner: str, *, result: str | None, now: dt.datetime
) -> None:
    """:func:`mark_outbox_done` with :meth:`Database.soon`: written with the next transaction
    (or on its own within milliseconds), without a round trip of its own. If ``owner``'s lease
    ran out meanwhile it changes nothing (the new owner performs the effect again, as an
    effect whose done mark a crash lost is), and nobody is told."""
    database.soon(
        _OUTBOX_DONE_SOON, {"b_key": key, "b_owner": owner, "result": result, "done_at": now}
    )


async def retry_outbox(
    session: AsyncSession,
    key: str,
    owner: str,
    *,
    error: str,
    retry_at: dt.datetime,
    failed: bool = True,
) -> None:
    """Give the entry back for another try at ``retry_at``; ``failed``: the network refused
    this try (counted in ``failures``), else it was interrupted (the store went away)."""
    changes: dict[str, object] = {"last_error": error, "next_attempt_at": retry_at}
    if failed:
        changes["failures"] = _OUTBOX.c.failures + 1  # counted by the UPDATE itself
    await _release(session, key, owner, **changes)


async def mark_outbox_failed(
    session: AsyncSession, key: str, owner: str, *, error: str, now: dt.datetime
) -> None:
    await _release(session, key, owner, status="failed", last_error=error, done_at=now)


async def release_leases(session: AsyncSession, owner: str) -> int:
    """Give back every job and outbox lease ``owner`` holds (a graceful stop); return how many.

    The work is due again at once for any worker, as if the lease had run out."""
    released = 0
    for model in (Job, OutboxEntry):
        result = await session.execute(
            update(model)
            .where(model.lease_owner == owner)
            .values(lease_owner=None, lease_expires_at=None)
        )
        released += int(result.rowcount)  # type: ignore[attr-defined]
    return released


async def task_recipients(
    session: AsyncSession, instance_id: str
) -> set[tuple[str | None, str | None]]:
    """(organization identifier, correlation key) of every Task the instance has sent or is
    sending; the organization is ``None`` for a target given by its endpoint alone."""
    rows = await session.execute(
        select(OutboxEntry.payload)
        .where(OutboxEntry.instance_id == instance_id)
        .where(OutboxEntry.kind == OutboxKind.SEND_TASK)
        .where(OutboxEntry.status.in_(("pending", "done")))
    )
    recipients: set[tuple[str | None, str | None]] = set()
    for (payload,) in rows:
        target = payload.get("target") if isinstance(payload, dict) else None
        organization = None
        if isinstance(target, dict):
            organization = target.get("organizationIdentifier") or target.get(
                "organizationIdentifierValue"
            )
        key = payload.get("correlation_key") if isinstance(payload, dict) else None
        recipients.add(
            (
                organization if isinstance(organization, str) else None,
                key if isinstance(key, str) else None,
            )
        )
    return recipients


async def sends_in_flight(session: AsyncSession, business_key: str) -> int:
    """Sends of instances with this business key that are queued or being performed.

    A reply can overtake the commit that records its request as sent; intake waits for these
    before it calls a reply uncorrelatable. The running instances with the key first (by the
    key indexes; most often one, none for a reply nobody waits for), then their sends by
    instance id: a backlog of pending sends to a site that is down is never read whole, and
    no planner has a subquery to run once per pending send.
    """
    ids = sorted(set((await session.execute(_running_ids_with_key(business_key))).scalars()))
    if not ids:
        return 0
    queued = (
        select(func.count(OutboxEntry.id))
        .where(OutboxEntry.instance_id.in_(ids))
        .where(OutboxEntry.kind == OutboxKind.SEND_TASK)
        # Not answered by ix_outbox_pending (every pending entry of the site), by instance.
        .where(OutboxEntry.status.concat("") == "pending")
        .scalar_subquery()
    )
    jobs = (
        select(func.count(Job.id))
        .where(Job.instance_id.in_(ids))
        .where(Job.kind == "send")
        # A job out of retries (an incident) is never run again: it resolves nothing.
        .where(Job.retries_left >= 0)
        .scalar_subquery()
    )
    return int((await session.execute(select(queued + jobs))).scalar_one())


# --- pseudonym mappings (docs/privacy.md) -----------------------------------------------------

# Rows per INSERT: well under SQLite's limit of bound parameters for a large series.
_PSEUDONYM_BATCH = 500


async def record_pseudonyms(
    session: AsyncSession, original_study_uid: str, uids: Mapping[str, str]
) -> None:
    """Keep the pairs (original -> replacement) a pseudonymized study used; pairs already kept
    (a replacement is the same every time) are left as they are."""
    now = dt.datetime.now(dt.UTC)
    rows = [
        {
            "replaced_uid": replaced,
            "original_uid": original,
            "original_study_uid": original_study_uid,
            "created_at": now,
        }
        for original, replaced in uids.items()
    ]
    for start in range(0, len(rows), _PSEUDONYM_BATCH):
        await session.execute(
            insert_ignoring_duplicates(session, PseudonymMapping).values(
                rows[start : start + _PSEUDONYM_BATCH]
            )
        )


async def original_uids(
    session: AsyncSession, replaced: Iterable[str], *, study: str | None = None
) -> dict[str, str]:
    """The originals of the given replacement UIDs (replacement -> original); replacements this
    site never made are absent, and with ``study`` those it did not make for that original
    study (the study a pair was first recorded with)."""
    wanted = sorted(set(replaced))
    found: dict[str, str] = {}
    for start in range(0, len(wanted), _PSEUDONYM_BATCH):
        query = select(PseudonymMapping.replaced_uid, PseudonymMapping.original_uid).where(
            PseudonymMapping.replaced_uid.in_(wanted[start : start + _PSEUDONYM_BATCH])
        )
        if study is not None:
            query = query.where(PseudonymMapping.original_study_uid == study)
        rows = await session.execute(query)
        found.update((row.replaced_uid, row.original_uid) for row in rows)
    return found


# --- catch-up cursors ---------------------------------------------------------------------


async def get_cursor(session: AsyncSession, resource_type: str) -> dt.datetime | None:
    return (
        await session.execute(
            select(SyncCursor.last_updated).where(SyncCursor.resource_type == resource_type)
        )
    ).scalar_one_or_none()


async def advance_cursor(
    session: AsyncSession, resource_type: str, last_updated: dt.datetime
) -> dt.datetime:
    """Move the cursor forward to ``last_updated`` (never backwards); return the stored value."""
    await session.execute(
        insert_ignoring_duplicates(session, SyncCursor).values(
            resource_type=resource_type,
            last_updated=last_updated,
            updated_at=dt.datetime.now(dt.UTC),
        )
    )
    await session.execute(
        update(SyncCursor)
        .where(SyncCursor.resource_type == resource_type)
        .where(SyncCursor.last_updated < last_updated)
        .values(last_updated=last_updated, updated_at=dt.datetime.now(dt.UTC))
    )
    stored = await get_cursor(session, resource_type)
    if stored is None:  # pragma: no cover - inserted just above
        raise StoreError(f"cursor for {resource_type} vanished")
    return stored
