"""The audit trail covers the records it describes, and a store knows its organization.

``audit_events.record``: the canonical JSON of the audited columns of the rows an event's step
wrote (an instance's process, business key, status, version and state digest; a Task
version's status and instance), chained with the event, so that ``dsf-bridge audit verify``
finds a row edited after its last event. NULL for events that change no row, and for every
event written before this revision (their hashes stay valid: a NULL record is not hashed).

``store_owner``: one row, the DSF organization identifier of the site the store belongs to,
written at the first run; a bridge of another organization refuses to run on it.

Frozen: it spells out its own types.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ALTER, as 0003: batch mode would copy the table.
    op.add_column("audit_events", sa.Column("record", sa.Text(), nullable=True))
    op.create_table(
        "store_owner",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("organization", sa.String(length=200), nullable=False),
        sa.Column("bound_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_store_owner"),
    )


def downgrade() -> None:
    op.drop_table("store_owner")
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE audit_events DROP COLUMN record")
    else:
        op.drop_column("audit_events", "record")
