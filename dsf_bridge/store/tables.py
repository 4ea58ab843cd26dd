"""The SQL schema of the bridge (DESIGN section 6), as SQLAlchemy 2 declarative models.

One metadata serves SQLite and PostgreSQL; constraint names follow a fixed convention so that
Alembic can alter them on both (SQLite in batch mode). The migrations in ``migrations/`` must
produce exactly this schema: ``tests/store/test_migrations.py`` fails when the two drift.

Times are stored in UTC and always come back time-zone aware (:class:`UtcDateTime`), on SQLite
too, because the DSF catch-up cursor and lease expiry compare them across hosts.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, QueryableAttribute, mapped_column
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

from dsf_bridge.errors import StoreError
from dsf_bridge.store.kinds import JobKind, OutboxKind, TaskSeenStatus

__all__ = [
    "COMPLETED_INSTANCE",
    "AuditEvent",
    "AuditHead",
    "Base",
    "EnumText",
    "Job",
    "MessageSubscription",
    "OutboxEntry",
    "ProcessDefinition",
    "ProcessInstance",
    "PseudonymMapping",
    "StoreOwner",
    "SyncCursor",
    "TaskSeen",
    "Timer",
    "UtcDateTime",
    "metadata",
    "not_by_index",
]

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# JSONB on PostgreSQL (indexable, compact), plain JSON text elsewhere.
JsonDocument = JSON().with_variant(postgresql.JSONB(), "postgresql")

# 64-bit keys on PostgreSQL, but INTEGER on SQLite: only INTEGER PRIMARY KEY is its rowid alias.
BigIntKey = BigInteger().with_variant(Integer(), "sqlite")


class _NotByIndex(ColumnElement[Any]):
    """A column SQLite's planner may not read through an index (:func:`not_by_index`)."""

    inherit_cache = True
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]  # noqa: RUF012

    def __init__(self, column: ColumnElement[Any]) -> None:
        self.column = column
        self.type = column.type


@compiles(_NotByIndex)
def _column_itself(element: _NotByIndex, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.column, **kw))


@compiles(_NotByIndex, "sqlite")
def _column_with_unary_plus(element: _NotByIndex, compiler: Any, **kw: Any) -> str:
    return "+" + str(compiler.process(element.column, **kw))


def not_by_index(column: QueryableAttribute[Any] | ColumnElement[Any]) -> ColumnElement[Any]:
    """``column`` as SQLite's planner may neither search nor order through an index on it
    (SQLite's documented unary ``+``); the column itself elsewhere. For a query that filters
    by an index of its own and orders by a time column with an index too: with statistics,
    SQLite would otherwise walk the whole time index to skip the sort of the few rows the
    filter finds. Text columns keep indexes out on both databases with ``.concat("")``
    (``repository._IS_RUNNING``); a timestamp cannot, PostgreSQL would order its text."""
    return _NotByIndex(
        column.__clause_element__() if isinstance(column, QueryableAttribute) else column
    )


class UtcDateTime(TypeDecorator[dt.datetime]):
    """A timestamp that is stored in UTC and always read back time-zone aware."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; pass a time-zone aware value")
        utc = value.astimezone(dt.UTC)
        # SQLite keeps no zone: store naive UTC and restore the zone on the way out.
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


_Kind = TypeVar("_Kind", bound=enum.StrEnum)


class EnumText(TypeDecorator[_Kind]):
    """One of a closed set of values (:mod:`dsf_bridge.store.kinds`), kept as its text."""

    impl = String
    cache_ok = True

    def __init__(self, kind: type[_Kind], length: int) -> None:
        super().__init__(length)
        self.kind = kind

    def process_bind_param(self, value: _Kind | str | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        return self.kind(value).value  # a misspelt value raises here, where it is written

    def process_result_value(self, value: Any, dialect: Dialect) -> _Kind | None:
        if value is None:
            return None
        try:
            return self.kind(value)
        except ValueError:
            known = ", ".join(member.value for member in self.kind)
            raise StoreError(
                f"{value!r} is no {self.kind.__name__} this release knows ({known}); "
                "was the store written by a newer dsf-bridge?"
            ) from None


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = metadata


class ProcessDefinition(Base):
    """A deployed BPMN process: key and version as in the plugin, plus the model's hash."""

    __tablename__ = "process_definitions"
    __table_args__ = (UniqueConstraint("process_key", "version"),)

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    process_key: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(50))
    plugin: Mapped[str] = mapped_column(String(200))
    model_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), default="active")
    deployed_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


# The condition of ix_process_instances_completed. A query that is to read that index says it
# in these very words, values included (a bound parameter would not prove it to the planner).
COMPLETED_INSTANCE = "status = 'completed' AND ended_at IS NOT NULL"


class ProcessInstance(Base):
    """One running or ended process instance; ``state`` is the engine's compact JSON."""

    __tablename__ = "process_instances"
    __table_args__ = (
        Index("ix_process_instances_business_key", "business_key"),
        # Only the instances that have one (migration 0007).
        Index(
            "ix_process_instances_alternative_business_key",
            "alternative_business_key",
            sqlite_where=text("alternative_business_key IS NOT NULL"),
            postgresql_where=text("alternative_business_key IS NOT NULL"),
        ),
        # With the definition and the incidents: the counts per process and status and the
        # open incidents (/metrics, the definitions list) read this index alone, not every
        # instance's state (migration 0008).
        Index("ix_process_instances_status", "status", "definition_id", "incidents"),
        # The admin API's pages of instances, newest first: read backwards from the top of
        # this index, not sorted from every instance (migration 0009).
        Index("ix_process_instances_created", "created_at", "id"),
        # A process's latest completed instances (an OMI provider's heartbeat): read from the
        # top of this index per deployed version; only completed instances are in it
        # (migration 0010). Its condition is COMPLETED_INSTANCE, written so in the query.
        Index(
            "ix_process_instances_completed",
            "definition_id",
            "ended_at",
            "id",
            sqlite_where=text(COMPLETED_INSTANCE),
            postgresql_where=text(COMPLETED_INSTANCE),
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    definition_id: Mapped[int] = mapped_column(ForeignKey("process_definitions.id"))
    business_key: Mapped[str] = mapped_column(String(200))
    # DSF's alternative business key: replies to a Task sent with it reach this instance.
    alternative_business_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # The executions of the state parked in an incident (engine.state.incident_tokens),
    # written with the state: /metrics counts them without reading the states.
    incidents: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    status: Mapped[str] = mapped_column(String(20))
    state: Mapped[dict[str, Any]] = mapped_column(JsonDocument)
    # Optimistic locking: every update bumps it; an UPDATE that matches no row lost the race.
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    ended_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class MessageSubscription(Base):
    """A waiting message catch: how an incoming Task finds its instance."""

    __tablename__ = "message_subscriptions"
    __table_args__ = (
        Index("ix_message_subscriptions_lookup", "message_name", "business_key", "correlation_key"),
    )

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    instance_id: Mapped[str] = mapped_column(
        ForeignKey("process_instances.id", ondelete="CASCADE"), index=True
    )
    execution_id: Mapped[str] = mapped_column(String(64))
    element_id: Mapped[str] = mapped_column(String(200))
    message_name: Mapped[str] = mapped_column(String(200))
    business_key: Mapped[str] = mapped_column(String(200))
    correlation_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Timer(Base):
    """A timer of an instance waiting to fire; ``timer_id`` is the engine's name for it."""

    __tablename__ = "timers"
    __table_args__ = (UniqueConstraint("instance_id", "timer_id"),)

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    instance_id: Mapped[str] = mapped_column(
        ForeignKey("process_instances.id", ondelete="CASCADE"), index=True
    )
    timer_id: Mapped[str] = mapped_column(String(64))
    element_id: Mapped[str] = mapped_column(String(200))
    due_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Job(Base):
    """An async continuation or handler call, claimed by one worker at a time through a lease."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_due", "due_at", "lease_expires_at"),)

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    instance_id: Mapped[str | None] = mapped_column(
        ForeignKey("process_instances.id", ondelete="CASCADE"), nullable=True, index=True
    )
    kind: Mapped[JobKind] = mapped_column(EnumText(JobKind, 50))
    payload: Mapped[dict[str, Any]] = mapped_column(JsonDocument)
    due_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Leases given back because the store went away under the job (no retry used for them).
    interruptions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    retries_left: Mapped[int] = mapped_column(Integer, default=3)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class TaskSeen(Base):
    """Every DSF Task version the bridge has taken in or sent: intake is idempotent on it.

    The role is part of the key: a Task a site sends to itself is both sent and taken in.
    """

    __tablename__ = "tasks_seen"
    # By role and status: the claims intake has not finished (recovered at start-up, held
    # replies swept every 30 s) are found without reading every Task version ever seen, and
    # the counts of /metrics read this index, not the table (migration 0008).
    # By time: the admin API's pages of Task versions, newest first (migration 0009).
    __table_args__ = (
        Index("ix_tasks_seen_role_status", "role", "status", "seen_at"),
        Index("ix_tasks_seen_seen_at", "seen_at"),
    )

    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    task_version: Mapped[str] = mapped_column(String(20), primary_key=True)
    role: Mapped[str] = mapped_column(String(20), primary_key=True)
    status: Mapped[TaskSeenStatus] = mapped_column(EnumText(TaskSeenStatus, 20))
    instance_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    seen_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class OutboxEntry(Base):
    """An effect committed with its state change and performed after commit, exactly once."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_pending", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    # Unique per effect: a retried transaction cannot enqueue the same send twice.
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    instance_id: Mapped[str | None] = mapped_column(
        ForeignKey("process_instances.id", ondelete="SET NULL"), nullable=True, index=True
    )
    kind: Mapped[OutboxKind] = mapped_column(EnumText(OutboxKind, 50))
    payload: Mapped[dict[str, Any]] = mapped_column(JsonDocument)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    # Every lease (a later one may find an earlier one's delivery) ...
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # ... and only the tries the network refused: they decide the delays and the giving up.
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    done_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class SyncCursor(Base):
    """The last ``meta.lastUpdated`` seen per FHIR resource type (catch-up after reconnects)."""

    __tablename__ = "sync_cursors"

    resource_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_updated: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class AuditEvent(Base):
    """One append-only audit event; once sealed, ``event_hash`` chains it to its predecessor."""

    __tablename__ = "audit_events"

    # The order of appends; the writer needs no lock to take one.
    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    # Assigned by the sealer as head + 1 under the head lock, in id order, so the sequence has
    # no gaps; NULL (with the hashes) until the event is sealed.
    sequence: Mapped[int | None] = mapped_column(
        BigIntKey, unique=True, nullable=True, autoincrement=False
    )
    occurred_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), index=True)
    actor: Mapped[str] = mapped_column(String(200))
    subject: Mapped[str] = mapped_column(String(300), index=True)
    action: Mapped[str] = mapped_column(String(100))
    reason: Mapped[str] = mapped_column(Text, default="")
    payload_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The audited columns of the rows the event's step wrote, as canonical JSON (see
    # dsf_bridge.store.audit): chained with the event, compared with the rows by verify.
    record: Mapped[str | None] = mapped_column(Text, nullable=True)
    previous_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    event_hash: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)


class AuditHead(Base):
    """The chain's head (one row): detects deletion of the newest events, serializes sealers."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    sequence: Mapped[int] = mapped_column(BigIntKey)
    event_hash: Mapped[str] = mapped_column(String(64))


class StoreOwner(Base):
    """The organization the store belongs to (one row, written at the first run): a bridge of
    another organization refuses to run on it."""

    __tablename__ = "store_owner"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    organization: Mapped[str] = mapped_column(String(200))
    bound_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class PseudonymMapping(Base):
    """A UID the site replaced before a study left it, and the original (docs/privacy.md).

    Only the site's own store holds this: it is what re-identifies a result. Keyed by the
    replacement, which is what comes back; ``original_study_uid`` groups a study's rows.
    """

    __tablename__ = "pseudonym_mappings"

    replaced_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    original_uid: Mapped[str] = mapped_column(String(64), index=True)
    original_study_uid: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
