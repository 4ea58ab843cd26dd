"""Audit events are appended unchained and sealed into the chain afterwards.

Before, every append locked the one head row until its transaction committed: appends of all
steps, and of replicas on one PostgreSQL, queued behind each other. Now an event is inserted
with an ``id`` only; a sealer (one at a time, in the workers' rounds) gives the unsealed
events their ``sequence``, ``previous_hash`` and ``event_hash`` in ``id`` order, and moves the
head. Existing events keep their sequence and hashes (``id = sequence``).

Frozen: it spells out its own types.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _create(name: str, *, sealed: bool) -> None:
    """The table; ``sealed`` is the old shape (sequence as key, hashes required)."""
    key = [] if sealed else [sa.Column("id", BIG_KEY, autoincrement=True, nullable=False)]
    op.create_table(
        name,
        *key,
        sa.Column("sequence", BIG_KEY, autoincrement=False, nullable=not sealed),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("subject", sa.String(length=300), nullable=False),
        sa.Column("action", sa.String(length=100), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("payload_digest", sa.String(length=64), nullable=True),
        sa.Column("previous_hash", sa.String(length=64), nullable=not sealed),
        sa.Column("event_hash", sa.String(length=64), nullable=not sealed),
        sa.PrimaryKeyConstraint("sequence" if sealed else "id", name=f"pk_{name}"),
        sa.UniqueConstraint("event_hash", name=f"uq_{name}_event_hash"),
        *([] if sealed else [sa.UniqueConstraint("sequence", name=f"uq_{name}_sequence")]),
    )


def _replace(from_old_shape: bool) -> None:
    op.drop_index(op.f("ix_audit_events_occurred_at"), table_name="audit_events")
    op.drop_index(op.f("ix_audit_events_subject"), table_name="audit_events")
    op.rename_table("audit_events", "audit_events_old")
    # Constraint names are per schema on PostgreSQL: the old table's must go first.
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("ALTER TABLE audit_events_old RENAME CONSTRAINT pk_audit_events TO pk_old")
        op.execute(
            "ALTER TABLE audit_events_old RENAME CONSTRAINT uq_audit_events_event_hash TO uq_old"
        )
        if not from_old_shape:
            op.execute(
                "ALTER TABLE audit_events_old RENAME CONSTRAINT uq_audit_events_sequence "
                "TO uq_old_sequence"
            )
    _create("audit_events", sealed=not from_old_shape)
    if from_old_shape:  # upgrade: every stored event is sealed; its id is its sequence
        op.execute(
            "INSERT INTO audit_events (id, sequence, occurred_at, actor, subject, action, reason, "
            "payload_digest, previous_hash, event_hash) "
            "SELECT sequence, sequence, occurred_at, actor, subject, action, reason, "
            "payload_digest, previous_hash, event_hash FROM audit_events_old"
        )
        if bind.dialect.name == "postgresql":
            op.execute(
                "SELECT setval(pg_get_serial_sequence('audit_events', 'id'), "
                "coalesce(max(id), 0) + 1, false) FROM audit_events"
            )
    else:
        op.execute(
            "INSERT INTO audit_events (sequence, occurred_at, actor, subject, action, reason, "
            "payload_digest, previous_hash, event_hash) "
            "SELECT sequence, occurred_at, actor, subject, action, reason, payload_digest, "
            "previous_hash, event_hash FROM audit_events_old"
        )
    op.drop_table("audit_events_old")
    op.create_index(op.f("ix_audit_events_occurred_at"), "audit_events", ["occurred_at"])
    op.create_index(op.f("ix_audit_events_subject"), "audit_events", ["subject"])


def upgrade() -> None:
    _replace(from_old_shape=True)


def downgrade() -> None:
    unsealed = op.get_bind().execute(
        sa.text("SELECT count(*) FROM audit_events WHERE sequence IS NULL")
    )
    if unsealed.scalar_one():
        raise RuntimeError(
            "audit events not yet sealed into the chain: start and stop the bridge once more "
            "(a stopping bridge seals them) before downgrading"
        )
    _replace(from_old_shape=False)
