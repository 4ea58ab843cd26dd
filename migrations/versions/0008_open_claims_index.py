"""A partial index of the claims whose intake is not finished.

Start-up recovery reads the ``claiming``, ``held`` and ``refused`` claims, and every bridge
sweeps the ``held`` ones every 30 seconds. Without an index they read every Task version ever
seen (on SQLite with the write lock held and the event loop waiting: 70 ms per sweep with a
million rows). The index holds only those claims, by role, status and time seen.

Frozen: it spells out its own types.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OPEN = sa.text("status IN ('claiming', 'held', 'refused')")


def upgrade() -> None:
    op.create_index(
        "ix_tasks_seen_open",
        "tasks_seen",
        ["role", "status", "seen_at"],
        sqlite_where=_OPEN,
        postgresql_where=_OPEN,
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_seen_open", table_name="tasks_seen")
