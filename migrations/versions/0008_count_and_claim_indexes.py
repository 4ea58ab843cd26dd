"""The store's counts and the unfinished claims read indexes, not tables.

- ``process_instances.incidents``: how many executions of the instance's state are parked in
  an incident, written with the state. ``/metrics`` counted the open incidents by reading and
  parsing the state of every running instance at every scrape (0.2 s for 20,000 running on
  SQLite, growing with the instances waiting). Filled in here for every instance.
- ``ix_process_instances_status`` gets the definition and the incidents as further columns:
  the counts per process and status and the open incidents (``/metrics``, the definitions
  list) read the index alone instead of every instance with its state (0.15 s for 200,000
  instances on SQLite; 9 ms now). Queries by status use it as before.
- ``ix_tasks_seen_role_status`` (role, status, seen_at): start-up recovery reads the
  ``claiming``, ``held`` and ``refused`` claims and every bridge sweeps the ``held`` ones every
  30 seconds; without an index each read every Task version ever seen (on SQLite on the event
  loop, with the write lock held: 70 ms per sweep with a million versions). The counts per role
  and status of ``/metrics`` read the index instead of the table.

Frozen: it spells out its own types and how a state marks an incident (a token with ``x``).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PAGE = 500


def _incidents(state: Any) -> int:
    if isinstance(state, str):  # SQLite's JSON is text; PostgreSQL's JSONB arrives parsed
        state = json.loads(state)
    tokens = state.get("tk") if isinstance(state, dict) else None
    if not isinstance(tokens, dict):
        return 0
    return sum(1 for raw in tokens.values() if isinstance(raw, dict) and "x" in raw)


def _fill_incidents() -> None:
    """Every instance's incidents (ended ones too: ``audit verify`` compares the column with
    the state of every row), read from their states a page at a time in the order of the
    primary key; the few found are written in one executemany."""
    bind = op.get_bind()
    found: list[dict[str, Any]] = []
    after = ""
    while True:
        rows = bind.execute(
            sa.text(
                "SELECT id, state FROM process_instances WHERE id > :after ORDER BY id LIMIT :page"
            ),
            {"after": after, "page": _PAGE},
        ).all()
        if not rows:
            break
        found += [{"id": ident, "n": n} for ident, state in rows if (n := _incidents(state))]
        after = rows[-1][0]
    if found:
        bind.execute(sa.text("UPDATE process_instances SET incidents = :n WHERE id = :id"), found)


def upgrade() -> None:
    # A plain ALTER, as 0003: batch mode would copy the table.
    op.add_column(
        "process_instances",
        sa.Column("incidents", sa.Integer(), server_default="0", nullable=False),
    )
    _fill_incidents()
    op.drop_index("ix_process_instances_status", table_name="process_instances")
    op.create_index(
        "ix_process_instances_status",
        "process_instances",
        ["status", "definition_id", "incidents"],
    )
    op.create_index("ix_tasks_seen_role_status", "tasks_seen", ["role", "status", "seen_at"])


def downgrade() -> None:
    op.drop_index("ix_tasks_seen_role_status", table_name="tasks_seen")
    op.drop_index("ix_process_instances_status", table_name="process_instances")
    op.create_index("ix_process_instances_status", "process_instances", ["status"])
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE process_instances DROP COLUMN incidents")
    else:
        op.drop_column("process_instances", "incidents")
