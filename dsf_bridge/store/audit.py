"""The audit trail: append-only events chained by SHA-256, and their verification.

Each event's hash covers its own fields and the previous event's hash, so changing, deleting or
reordering any stored row breaks the chain from that row on. Sequence numbers are assigned by
the writer as head + 1 while holding the head row's lock: the chain has no gaps, appends from
several replicas are serialized, and the head row detects deletion of the newest events.

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
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dsf_bridge.store.tables import AuditEvent, AuditHead

__all__ = [
    "GENESIS_HASH",
    "ChainReport",
    "append_event",
    "digest_payload",
    "event_hash",
    "verify_chain",
]

GENESIS_HASH = "0" * 64
_HEAD_ID = 1
_VERIFY_BATCH = 1000


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
) -> AuditEvent:
    """Append one event in the caller's transaction; it commits or rolls back with it."""
    head = (
        await session.execute(select(AuditHead).where(AuditHead.id == _HEAD_ID).with_for_update())
    ).scalar_one_or_none()
    if head is None:
        # First event ever; a concurrent first writer makes one of the two inserts fail on the
        # primary key, and that transaction is retried by its caller.
        head = AuditHead(id=_HEAD_ID, sequence=0, event_hash=GENESIS_HASH)
        session.add(head)
        await session.flush()
    when = (occurred_at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    digest = None if payload is None else digest_payload(payload)
    sequence = head.sequence + 1
    event = AuditEvent(
        sequence=sequence,
        occurred_at=when,
        actor=actor,
        subject=subject,
        action=action,
        reason=reason,
        payload_digest=digest,
        previous_hash=head.event_hash,
        event_hash=event_hash(
            sequence=sequence,
            occurred_at=when,
            actor=actor,
            subject=subject,
            action=action,
            reason=reason,
            payload_digest=digest,
            previous_hash=head.event_hash,
        ),
    )
    session.add(event)
    head.sequence = sequence
    head.event_hash = event.event_hash
    await session.flush()
    return event


@dataclass(frozen=True)
class ChainReport:
    """The outcome of a verification: ``ok``, or the first bad event and what is wrong."""

    events: int
    head_hash: str
    first_bad_sequence: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def _check_event(
    event: AuditEvent, expected_sequence: int, previous: str
) -> tuple[int, str] | None:
    """The first problem with one event given its predecessor's hash, or ``None``."""
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
    """Walk the whole chain in sequence order and report the first inconsistency."""
    expected_sequence = 1
    previous = GENESIS_HASH
    count = 0
    stream = await session.stream_scalars(
        select(AuditEvent).order_by(AuditEvent.sequence).execution_options(yield_per=_VERIFY_BATCH)
    )
    try:
        async for event in stream:
            problem = _check_event(event, expected_sequence, previous)
            if problem is not None:
                bad_sequence, message = problem
                return ChainReport(count, previous, bad_sequence, message)
            previous = event.event_hash
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
        )
    return ChainReport(count, previous)


async def reasons_of(session: AsyncSession, action: str) -> list[str]:
    """The reasons of every event with ``action``, in the order they were appended."""
    rows = await session.scalars(
        select(AuditEvent.reason).where(AuditEvent.action == action).order_by(AuditEvent.sequence)
    )
    return list(rows)
