"""DSF's alternative business key: a second key an instance answers to (API v2's
``BusinessKeyStrategies.ALTERNATIVE``, API v1's ``alternativeBusinessKey`` variable).

Frozen: it spells out its own types.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ALTERs (SQLite has ADD and DROP COLUMN): batch mode would copy the table, and with
    # foreign keys on, dropping the old copy cascades into jobs, timers and subscriptions.
    op.add_column(
        "process_instances",
        sa.Column("alternative_business_key", sa.String(length=200), nullable=True),
    )
    op.create_index(
        "ix_process_instances_alternative_business_key",
        "process_instances",
        ["alternative_business_key"],
    )


def downgrade() -> None:
    op.drop_index("ix_process_instances_alternative_business_key", table_name="process_instances")
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE process_instances DROP COLUMN alternative_business_key")
    else:
        op.drop_column("process_instances", "alternative_business_key")
