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

Events carry a digest of their payload, never the payload: the trail holds no patient data.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from dsf_bridge.store.tables import AuditEvent, AuditHead

__all__ = [
    "GENESIS_HASH",
    "SEAL_BATCH",
    "ChainReport",
    "append_event",
    "digest_payload",
    "event_hash",
    "seal_events",
    "verify_chain",
]

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
) -> str:
    """The hash of one event: SHA-256 over a canonical JSON array of its fields."""
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
) -> None:
    """Append one event, unsealed, in the caller's transaction; it commits or rolls back with
    it. :func:`seal_events` chains it later."""
    await session.execute(
        _INSERT,
        {
            "occurred_at": (occurred_at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC),
            "actor": actor,
            "subject": subject,
            "action": action,
            "reason": reason,
            "payload_digest": None if payload is None else digest_payload(payload),
        },
    )


_INSERT = insert(cast(Table, AuditEvent.__table__)).values(
    {
        name: bindparam(name)
        for name in ("occurred_at", "actor", "subject", "action", "reason", "payload_digest")
    }
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

    @property
    def ok(self) -> bool:
        return self.problem is None


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
    )
    if recomputed != event.event_hash:
        return (
            event.sequence,
            f"event {event.sequence} was changed after it was written: its hash does not match",
        )
    return None


async def verify_chain(session: AsyncSession) -> ChainReport:
    """Walk the whole sealed chain in sequence order and report the first inconsistency, and
    how many events wait to be sealed."""
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
                return ChainReport(count, previous, bad_sequence, message, unsealed)
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
        return ChainReport(
            count,
            previous,
            count + 1 if head_sequence > count else head_sequence,
            f"the chain ends at event {count} but its head records event {head_sequence}: "
            "the newest events were deleted or the head was altered",
            unsealed,
        )
    return ChainReport(count, previous, unsealed=unsealed)


async def reasons_of(session: AsyncSession, action: str) -> list[str]:
    """The reasons of every event with ``action``, in the order they were appended."""
    rows = await session.scalars(
        select(AuditEvent.reason).where(AuditEvent.action == action).order_by(AuditEvent.id)
    )
    return list(rows)
