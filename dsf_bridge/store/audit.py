"""The audit trail: append-only events chained by SHA-256, and their verification.

Each sealed event's hash covers its own fields and the previous event's hash, so changing,
deleting or reordering any sealed row breaks the chain from that row on.

Appending takes no lock: an event is inserted unsealed, with an ``id`` that orders the appends,
in the transaction of the step it records (it commits or rolls back with it). A sealer, one at
a time (the workers' rounds, :func:`seal_events`), then takes the unsealed events in ``id``
order and gives each its ``sequence`` (head + 1: the chain has no gaps), ``previous_hash`` and
``event_hash``, and moves the head, which detects deletion of the newest sealed events. Before,
every append locked the head row until its transaction committed, so every step of the bridge,
and of every replica on one PostgreSQL, queued behind the others' commits.

What that costs: an event is covered by the chain once sealed, within about a second (the
workers' idle poll) of its commit; until then a change to it, or its removal, is not detected.
``dsf-bridge audit verify`` names the unsealed events it found.

An attacker who can rewrite the whole table and recompute every hash is not detected by the
chain alone; ``dsf-bridge audit verify`` prints the head hash so that operators can anchor it
elsewhere (a ticket, a log server) and compare later.

The chain also covers the records the events describe. An event whose step wrote an instance
row (its process, business key, status, version and a SHA-256 of its state) or a Task version's
intake status carries those audited columns as canonical JSON in ``record``, hashed with the
event; :func:`verify_records` compares every row with the record of the last event that wrote
it, so that a row edited behind the bridge's back (``UPDATE process_instances SET
status='completed'``) is found and named, field by field. It costs the hot path no statement
and no hash of its own: the state digest is the step event's payload digest.

Events carry a digest of their payload, never the payload: the trail holds no patient data; a
DICOM UID in a reason (an error's text quoting the archive) is replaced by its digest, as in
the logs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from dsf_bridge.engine.state import incident_count
from dsf_bridge.errors import StoreError
from dsf_bridge.logs import without_uids
from dsf_bridge.store.database import at_commit
from dsf_bridge.store.direct import Prepared
from dsf_bridge.store.tables import (
    AuditEvent,
    AuditHead,
    ProcessDefinition,
    ProcessInstance,
    TaskSeen,
)

__all__ = [
    "GENESIS_HASH",
    "SEAL_BATCH",
    "ChainReport",
    "Records",
    "append_event",
    "digest_payload",
    "event_hash",
    "export_events",
    "instance_record",
    "seal_events",
    "state_digest",
    "task_record",
    "verify_chain",
    "verify_records",
]

# What an event's ``record`` describes: {row key: {audited column: value}}.
Records = Mapping[str, Mapping[str, Any]]

GENESIS_HASH = "0" * 64
_HEAD_ID = 1
# Events sealed per transaction, and read per batch when the chain is verified.
SEAL_BATCH = 1000


def digest_payload(payload: Any) -> str:
    """SHA-256 of bytes, text, or JSON-able data in canonical form (sorted keys, no spaces)."""
    if isinstance(payload, bytes):
        data = payload
    elif isinstance(payload, str):
        data = payload.encode()
    else:
        data = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(data).hexdigest()


def _json_numbers(value: Any) -> Any:
    """``value`` with every float that is a whole number (``1.0``, ``1e16``, ``-0.0``) as an
    int: PostgreSQL's JSONB gives ``1e16`` back as ``10000000000000000`` and ``-0.0`` as
    ``0.0``, so a digest over the state as written would differ from one over the state as
    read back."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        return {key: _json_numbers(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_numbers(item) for item in value]
    return value


# How a whole-number float looks in compact JSON ("2.0," "1e+16"); a match inside a string only
# costs the walk.
_WHOLE_FLOAT = (".0,", ".0]", ".0}", "e+")


def state_digest(state: Any) -> str:
    """The digest of an instance's state as its rows and records carry it: the
    :func:`digest_payload` of the state with whole-number floats as ints, the same for the
    state as a step writes it and as either database gives it back. The state is walked only
    when its JSON shows such a float."""
    text = json.dumps(state, sort_keys=True, separators=(",", ":"), default=str)
    if any(sign in text for sign in _WHOLE_FLOAT):
        return digest_payload(_json_numbers(state))
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def instance_record(
    instance_id: str,
    *,
    process: str,
    business_key: str,
    status: str,
    version: int,
    state_digest: str,
) -> dict[str, Mapping[str, Any]]:
    """The audited columns of an instance row as written: ``process`` is ``key|version`` of its
    definition, ``state_digest`` the :func:`state_digest` of its state."""
    columns = {
        "business_key": business_key,
        "process": process,
        "state": state_digest,
        "status": status,
        "version": version,
    }
    return {_instance_key(instance_id): columns}


def _instance_key(instance_id: str) -> str:
    return f"process_instances/{instance_id}"


def _task_key(task_id: str, task_version: str, role: str) -> str:
    return f"tasks_seen/{role}/{task_id}/{task_version}"


def task_record(
    task_id: str, task_version: str, role: str, *, status: str, instance_id: str | None
) -> dict[str, Mapping[str, Any]]:
    """The audited columns of a Task version's row (``tasks_seen``) as written."""
    return {
        _task_key(task_id, task_version, role): {"instance": instance_id, "status": str(status)}
    }


def _timestamp(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_hash(
    *,
    sequence: int,
    occurred_at: dt.datetime,
    actor: str,
    subject: str,
    action: str,
    reason: str,
    payload_digest: str | None,
    previous_hash: str,
    record: str | None = None,
) -> str:
    """The hash of one event: SHA-256 over a canonical JSON array of its fields (``record``
    only when the event has one: events written before it existed keep their hashes)."""
    fields = [
        sequence,
        _timestamp(occurred_at),
        actor,
        subject,
        action,
        reason,
        payload_digest or "",
        previous_hash,
    ]
    if record is not None:
        fields.append(record)
    return hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()


async def append_event(
    session: AsyncSession,
    *,
    actor: str,
    subject: str,
    action: str,
    reason: str = "",
    payload: Any = None,
    occurred_at: dt.datetime | None = None,
    payload_digest: str | None = None,
    record: Records | None = None,
) -> None:
    """Append one event, unsealed, in the caller's transaction; it commits or rolls back with
    it. :func:`seal_events` chains it later. In a :meth:`Database.transaction` the events are
    written at its end, all in one statement.

    ``payload_digest`` stands for ``payload`` when the caller has its digest already;
    ``record`` gives the audited columns of the rows this transaction writes (see
    :func:`instance_record`, :func:`task_record`) as they will be at its commit.
    """
    if payload is not None:
        if payload_digest is not None:
            raise StoreError("append_event takes a payload or its digest, not both")
        payload_digest = digest_payload(payload)
    await at_commit(
        session,
        _INSERT,
        {
            "occurred_at": (occurred_at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC),
            "actor": actor,
            "subject": subject,
            "action": action,
            # An error's text may quote a study's UID (the archive's "study 1.2.… is not in
            # the archive"): the trail, and the AuditEvents exported from it, hold its digest.
            "reason": without_uids(reason),
            "payload_digest": payload_digest,
            "record": None if not record else _canonical(record),
        },
    )


_INSERT = Prepared(
    insert(cast(Table, AuditEvent.__table__))
    .inline()  # the new ids are not read back
    .values(
        {
            name: bindparam(name)
            for name in (
                "occurred_at",
                "actor",
                "subject",
                "action",
                "reason",
                "payload_digest",
                "record",
            )
        }
    )
)


def _insert_head(session: AsyncSession) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` of the head row in the session's dialect."""
    table = cast(Table, AuditHead.__table__)
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


# Core, not ORM: one executemany for a whole batch of seals.
_EVENTS = cast(Table, AuditEvent.__table__)
_SEAL = (
    update(_EVENTS)
    .where(_EVENTS.c.id == bindparam("event_id"))
    .where(_EVENTS.c.sequence.is_(None))
    .values(
        sequence=bindparam("new_sequence"),
        previous_hash=bindparam("new_previous_hash"),
        event_hash=bindparam("new_event_hash"),
    )
)


async def seal_events(session: AsyncSession, limit: int = SEAL_BATCH, *, wait: bool = False) -> int:
    """Chain up to ``limit`` unsealed events in ``id`` order; return how many.

    Under the head row's lock, taken without waiting unless ``wait``: while another sealer
    holds it (a replica's round on PostgreSQL), this one seals nothing and returns 0.
    """
    head = (
        await session.execute(
            select(AuditHead).where(AuditHead.id == _HEAD_ID).with_for_update(skip_locked=not wait)
        )
    ).scalar_one_or_none()
    if head is None:
        if await session.scalar(select(func.count()).select_from(AuditHead)):
            return 0  # held by another sealer
        # The first seal ever: whichever sealer inserts the head first, the other finds it.
        await session.execute(
            _insert_head(session).values(id=_HEAD_ID, sequence=0, event_hash=GENESIS_HASH)
        )
        head = (
            await session.execute(
                select(AuditHead).where(AuditHead.id == _HEAD_ID).with_for_update(skip_locked=True)
            )
        ).scalar_one_or_none()
        if head is None:
            return 0
    rows = (
        await session.execute(
            select(
                AuditEvent.id,
                AuditEvent.occurred_at,
                AuditEvent.actor,
                AuditEvent.subject,
                AuditEvent.action,
                AuditEvent.reason,
                AuditEvent.payload_digest,
                AuditEvent.record,
            )
            .where(AuditEvent.sequence.is_(None))
            .order_by(AuditEvent.id)
            .limit(limit)
        )
    ).all()
    if not rows:
        return 0
    sequence, previous = head.sequence, head.event_hash
    seals = []
    for row in rows:
        sequence += 1
        hashed = event_hash(
            sequence=sequence,
            occurred_at=row.occurred_at,
            actor=row.actor,
            subject=row.subject,
            action=row.action,
            reason=row.reason,
            payload_digest=row.payload_digest,
            previous_hash=previous,
            record=row.record,
        )
        seals.append(
            {
                "event_id": row.id,
                "new_sequence": sequence,
                "new_previous_hash": previous,
                "new_event_hash": hashed,
            }
        )
        previous = hashed
    await session.execute(_SEAL, seals)
    head.sequence, head.event_hash = sequence, previous
    await session.flush()
    return len(seals)


@dataclass(frozen=True)
class ChainReport:
    """The outcome of a verification: ``ok``, or the first bad event and what is wrong."""

    events: int
    head_hash: str
    first_bad_sequence: int | None = None
    problem: str | None = None
    # Events appended but not yet sealed into the chain (not covered by ``ok``).
    unsealed: int = 0
    # Rows compared with the record of their last event, rows no event records (written
    # before the records were kept, or intake states in passing), and the rows that differ.
    records: int = 0
    unrecorded: int = 0
    record_problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.problem is None and not self.record_problems


def _check_event(
    event: AuditEvent, expected_sequence: int, previous: str
) -> tuple[int, str] | None:
    """The first problem with one sealed event given its predecessor's hash, or ``None``."""
    if event.sequence is None or event.previous_hash is None:  # pragma: no cover - not selected
        return (expected_sequence, f"event {expected_sequence} is not sealed")
    if event.sequence != expected_sequence:
        return (
            expected_sequence,
            f"event {expected_sequence} is missing (next stored event is {event.sequence})",
        )
    if event.previous_hash != previous:
        return (
            event.sequence,
            f"event {event.sequence} does not follow event {event.sequence - 1}: its previous "
            "hash differs (an earlier event was changed, removed or inserted)",
        )
    recomputed = event_hash(
        sequence=event.sequence,
        occurred_at=event.occurred_at,
        actor=event.actor,
        subject=event.subject,
        action=event.action,
        reason=event.reason,
        payload_digest=event.payload_digest,
        previous_hash=event.previous_hash,
        record=event.record,
    )
    if recomputed != event.event_hash:
        return (
            event.sequence,
            f"event {event.sequence} was changed after it was written: its hash does not match",
        )
    return None


async def verify_chain(session: AsyncSession) -> ChainReport:
    """Walk the whole sealed chain in sequence order and report the first inconsistency, and
    how many events wait to be sealed; then compare the rows with their records
    (:func:`verify_records`)."""
    report = await _verify_sealed(session)
    checks = await verify_records(session)
    return dataclasses.replace(
        report,
        records=checks.records,
        unrecorded=checks.unrecorded,
        record_problems=tuple(checks.problems),
    )


# Walks of the chain when its head is ahead of it: a bridge sealing while an administrator
# verifies commits between the walk and the reading of the head (PostgreSQL reads each
# statement's own snapshot); a walk after that sees both. A head ahead at every walk is
# reported: its newest events were deleted.
_WALKS = 5


async def _verify_sealed(session: AsyncSession) -> ChainReport:
    for _ in range(_WALKS):
        report, head_ahead = await _walk_sealed(session)
        if not head_ahead:
            break
    return report


async def _walk_sealed(session: AsyncSession) -> tuple[ChainReport, bool]:
    """The chain walked once, and whether its head records more events than the walk found."""
    unsealed = int(
        await session.scalar(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.sequence.is_(None))
        )
        or 0
    )
    expected_sequence = 1
    previous = GENESIS_HASH
    count = 0
    stream = await session.stream_scalars(
        select(AuditEvent)
        .where(AuditEvent.sequence.is_not(None))
        .order_by(AuditEvent.sequence)
        .execution_options(yield_per=SEAL_BATCH)
    )
    try:
        async for event in stream:
            problem = _check_event(event, expected_sequence, previous)
            if problem is not None:
                bad_sequence, message = problem
                return ChainReport(count, previous, bad_sequence, message, unsealed), False
            previous = str(event.event_hash)
            expected_sequence += 1
            count += 1
    finally:
        # Early returns leave a server-side cursor open on PostgreSQL otherwise.
        await stream.close()
    head = (
        await session.execute(select(AuditHead).where(AuditHead.id == _HEAD_ID))
    ).scalar_one_or_none()
    head_sequence = head.sequence if head is not None else 0
    head_hash = head.event_hash if head is not None else GENESIS_HASH
    if head_sequence != count or head_hash != previous:
        report = ChainReport(
            count,
            previous,
            count + 1 if head_sequence > count else head_sequence,
            f"the chain ends at event {count} but its head records event {head_sequence}: "
            "the newest events were deleted or the head was altered",
            unsealed,
        )
        return report, head_sequence > count
    return ChainReport(count, previous, unsealed=unsealed), False


# Problems named one by one; beyond, a count (a rewritten table would name every row).
_PROBLEMS_NAMED = 50


@dataclass
class RecordCheck:
    """What :func:`verify_records` found."""

    records: int = 0
    unrecorded: int = 0
    problems: list[str] = field(default_factory=list)
    _more: int = 0

    def add(self, problem: str) -> None:
        if len(self.problems) < _PROBLEMS_NAMED:
            self.problems.append(problem)
            return
        self._more += 1
        more = f"... and {self._more} more rows differ from their records"
        if len(self.problems) == _PROBLEMS_NAMED:
            self.problems.append(more)
        else:
            self.problems[-1] = more


def _where(sequence: int | None, event_id: int) -> str:
    if sequence is None:
        return f"the unsealed event with id {event_id}"
    return f"event {sequence}"


def _differences(current: Mapping[str, Any], recorded: Mapping[str, Any]) -> list[str]:
    """The audited columns that differ, each as ``column is X, recorded Y``."""
    found = []
    for column in sorted(set(current) | set(recorded)):
        now, then = current.get(column), recorded.get(column)
        if now == then:
            continue
        if column == "state":  # a digest: its value says nothing to a reader
            found.append("state differs from the state recorded")
        else:
            found.append(f"{column} is {now!r}, recorded {then!r}")
    return found


async def _latest_records(
    session: AsyncSession, check: RecordCheck
) -> dict[str, tuple[Mapping[str, Any], int | None, int]]:
    """For each row key: the columns recorded by the last event that wrote the row, with the
    event's sequence (``None`` while unsealed) and id. The id orders the writes of one row:
    a step reads the row committed before it, then appends its event."""
    latest: dict[str, tuple[Mapping[str, Any], int | None, int]] = {}
    stream = await session.stream(
        select(AuditEvent.id, AuditEvent.sequence, AuditEvent.record)
        .where(AuditEvent.record.is_not(None))
        .order_by(AuditEvent.id)
        .execution_options(yield_per=SEAL_BATCH)
    )
    try:
        async for event_id, sequence, text in stream:
            try:
                described = json.loads(str(text))
            except ValueError:
                described = None
            if not isinstance(described, dict):
                check.add(f"{_where(sequence, event_id)} has a record that is no JSON object")
                continue
            for key, columns in described.items():
                if isinstance(columns, dict):
                    latest[key] = (columns, sequence, event_id)
    finally:
        await stream.close()
    return latest


@dataclass(frozen=True)
class _Mismatch:
    key: str
    label: str
    current: Mapping[str, Any]
    recorded: Mapping[str, Any]
    sequence: int | None
    event_id: int


@dataclass
class _Comparison:
    """Rows compared with the last records of them; what differs is looked at again later."""

    check: RecordCheck
    latest: dict[str, tuple[Mapping[str, Any], int | None, int]]
    mismatches: list[_Mismatch] = field(default_factory=list)

    def compare(
        self,
        key: str,
        label: str,
        current: Mapping[str, Any],
        legacy_state: Any = None,
    ) -> None:
        recorded = self.latest.pop(key, None)
        if recorded is None:
            self.check.unrecorded += 1
            return
        self.check.records += 1
        columns, sequence, event_id = recorded
        if (
            legacy_state is not None
            and columns.get("state") != current.get("state")
            and columns.get("state") == digest_payload(legacy_state)
        ):
            # Recorded before whole-number floats were digested as ints (release 0005's first
            # records): the same state.
            current = {**current, "state": columns["state"]}
        if _differences(current, columns):
            self.mismatches.append(_Mismatch(key, label, current, columns, sequence, event_id))


async def _records_since(
    session: AsyncSession, after_id: int, keys: set[str]
) -> dict[str, list[tuple[int, Mapping[str, Any]]]]:
    """The records of ``keys`` (with their event's id) in the events after ``after_id``, in
    ``id`` order: one read of
    the events appended since (PostgreSQL reads each statement's own snapshot, so a step of a
    running bridge commits between the read of the events and the read of the rows)."""
    found: dict[str, list[tuple[int, Mapping[str, Any]]]] = {}
    stream = await session.stream(
        select(AuditEvent.id, AuditEvent.record)
        .where(AuditEvent.id > after_id)
        .where(AuditEvent.record.is_not(None))
        .order_by(AuditEvent.id)
        .execution_options(yield_per=SEAL_BATCH)
    )
    try:
        async for event_id, text in stream:
            try:
                described = json.loads(str(text))
            except ValueError:
                continue
            if not isinstance(described, dict):
                continue
            for key in keys & described.keys():
                columns = described[key]
                if isinstance(columns, dict):
                    found.setdefault(key, []).append((event_id, columns))
    finally:
        await stream.close()
    return found


async def verify_records(session: AsyncSession) -> RecordCheck:
    """Compare every instance row and every Task version row with the record of the last
    event that wrote it; name each row that differs, field by field, and each recorded row
    that is gone."""
    check = RecordCheck()
    rows = _Comparison(check, await _latest_records(session, check))
    instances = await session.stream(
        select(
            ProcessInstance.id,
            ProcessDefinition.process_key,
            ProcessDefinition.version,
            ProcessInstance.business_key,
            ProcessInstance.status,
            ProcessInstance.version,
            ProcessInstance.state,
            ProcessInstance.incidents,
        )
        .outerjoin(ProcessDefinition, ProcessDefinition.id == ProcessInstance.definition_id)
        .order_by(ProcessInstance.id)
        .execution_options(yield_per=SEAL_BATCH)
    )
    try:
        async for (
            instance_id,
            key,
            version,
            business_key,
            status,
            row_version,
            state,
            incidents,
        ) in instances:
            # Written with the state, in the same statement: /metrics and the incident lists
            # go by it, so an edit of it alone would hide an incident or invent one.
            in_state = incident_count(state)
            if incidents != in_state:
                check.add(
                    f"process instance {instance_id}: its incident count is {incidents}, "
                    f"its state has {in_state}"
                )
            row = _instance_key(instance_id)
            current = instance_record(
                instance_id,
                process=f"{key}|{version}",
                business_key=business_key,
                status=status,
                version=row_version,
                state_digest=state_digest(state),
            )[row]
            label = f"process instance {instance_id}"
            rows.compare(row, label, current, legacy_state=state)
    finally:
        await instances.close()
    tasks = await session.stream(
        select(
            TaskSeen.task_id,
            TaskSeen.task_version,
            TaskSeen.role,
            TaskSeen.status,
            TaskSeen.instance_id,
        )
        .order_by(TaskSeen.task_id, TaskSeen.task_version, TaskSeen.role)
        .execution_options(yield_per=SEAL_BATCH)
    )
    try:
        async for task_id, task_version, role, status, instance_id in tasks:
            row = _task_key(task_id, task_version, role)
            current = task_record(
                task_id, task_version, role, status=status, instance_id=instance_id
            )[row]
            label = f"Task/{task_id} version {task_version} ({role})"
            rows.compare(row, label, current)
    finally:
        await tasks.close()
    # A row that differs is no edit when an event newer than the one compared records it as
    # it was read: all of them looked at again in one read, however many (a busy store moves
    # more rows than any fixed number while verify reads the events).
    since: dict[str, list[tuple[int, Mapping[str, Any]]]] = {}
    if rows.mismatches:
        since = await _records_since(
            session,
            min(mismatch.event_id for mismatch in rows.mismatches),
            {mismatch.key for mismatch in rows.mismatches},
        )
    for mismatch in rows.mismatches:
        # Only the events after the one compared: an earlier record of the row is no excuse
        # (a row put back as it once was is an edit).
        if any(
            event_id > mismatch.event_id and not _differences(mismatch.current, columns)
            for event_id, columns in since.get(mismatch.key, ())
        ):
            continue
        check.add(
            f"{mismatch.label} was changed after "
            f"{_where(mismatch.sequence, mismatch.event_id)} recorded it: "
            + "; ".join(_differences(mismatch.current, mismatch.recorded))
        )
    for key, (_, sequence, event_id) in sorted(rows.latest.items()):
        table, _, row = key.partition("/")
        check.add(
            f"the {table} row {row} was deleted after {_where(sequence, event_id)} recorded it"
        )
    return check


async def export_events(
    session: AsyncSession, *, since: dt.datetime | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Every event (``since``: those that occurred at or after it) in the order they were
    appended, as plain data: the fields the chain hashes, in the form it hashes them (UTC
    times to the microsecond, ``record`` as its canonical text)."""
    query = select(
        AuditEvent.id,
        AuditEvent.sequence,
        AuditEvent.occurred_at,
        AuditEvent.actor,
        AuditEvent.subject,
        AuditEvent.action,
        AuditEvent.reason,
        AuditEvent.payload_digest,
        AuditEvent.record,
        AuditEvent.previous_hash,
        AuditEvent.event_hash,
    )
    if since is not None:
        query = query.where(AuditEvent.occurred_at >= since)
    stream = await session.stream(
        query.order_by(AuditEvent.id).execution_options(yield_per=SEAL_BATCH)
    )
    try:
        async for row in stream:
            event = row._asdict()
            event["occurred_at"] = _timestamp(row.occurred_at)
            yield event
    finally:
        await stream.close()


async def reasons_of(session: AsyncSession, action: str) -> list[str]:
    """The reasons of every event with ``action``, in the order they were appended."""
    rows = await session.scalars(
        select(AuditEvent.reason).where(AuditEvent.action == action).order_by(AuditEvent.id)
    )
    return list(rows)
