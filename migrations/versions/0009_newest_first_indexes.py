"""The admin API's pages, newest first, read indexes, not whole tables.

``queries.list_instances`` orders instances by ``created_at`` (then ``id``), and
``queries.list_tasks`` the Task versions by ``seen_at``: without an index on those columns
each page, the first one too, sorted every instance or every Task version ever seen. With
100,000 instances and as many Task versions, the first two pages of each took 264 ms on SQLite
(on the bridge's event loop there) and 145 ms on PostgreSQL, against 4 and 7 ms with a hundred
(``bench/waiting.py``). Now each page reads its rows from the top of an index.

Frozen: it names its own columns.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_process_instances_created", "process_instances", ["created_at", "id"])
    op.create_index("ix_tasks_seen_seen_at", "tasks_seen", ["seen_at"])


def downgrade() -> None:
    op.drop_index("ix_tasks_seen_seen_at", table_name="tasks_seen")
    op.drop_index("ix_process_instances_created", table_name="process_instances")
