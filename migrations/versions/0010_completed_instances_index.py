"""A process's latest completed instances are read from an index, not sorted from all of them.

An OMI provider's heartbeat reports how long the latest completed executions took
(``queries.process_load``): it sorted every completed instance of the process by its end. With
50,000 completed instances that took 30 ms on SQLite (on the bridge's event loop there) and
22 ms on PostgreSQL, against 0.7 and 1.5 ms with a hundred, growing with the history
(``bench/waiting.py``). Now each deployed version's latest are read from the top of a partial
index of the completed instances alone (a running instance is not in it, so a Task's start
does not write it).

Frozen: it names its own columns.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COMPLETED = "status = 'completed' AND ended_at IS NOT NULL"


def upgrade() -> None:
    op.create_index(
        "ix_process_instances_completed",
        "process_instances",
        ["definition_id", "ended_at", "id"],
        sqlite_where=sa.text(_COMPLETED),
        postgresql_where=sa.text(_COMPLETED),
    )


def downgrade() -> None:
    op.drop_index("ix_process_instances_completed", table_name="process_instances")
