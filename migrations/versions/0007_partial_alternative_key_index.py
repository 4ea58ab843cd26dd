"""The alternative business key's index holds only the instances that have one.

Most instances have none. With their NULLs in it, SQLite's ANALYZE statistics (an
administrator's ``ANALYZE`` or ``PRAGMA optimize``) make an equality on the column look no
better than reading the table, and every Task's lookup of a running instance by its business
key read every instance. A partial index (``WHERE alternative_business_key IS NOT NULL``,
which an equality on the column implies) keeps that lookup an index search on both databases,
and is smaller.

Frozen: it spells out its own types.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEX = "ix_process_instances_alternative_business_key"
_HAS_ONE = sa.text("alternative_business_key IS NOT NULL")


def upgrade() -> None:
    op.drop_index(_INDEX, table_name="process_instances")
    op.create_index(
        _INDEX,
        "process_instances",
        ["alternative_business_key"],
        sqlite_where=_HAS_ONE,
        postgresql_where=_HAS_ONE,
    )


def downgrade() -> None:
    op.drop_index(_INDEX, table_name="process_instances")
    op.create_index(_INDEX, "process_instances", ["alternative_business_key"])
