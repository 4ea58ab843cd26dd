"""Failures counted apart from leases. Outbox: ``attempts`` counts every lease of an entry (a
second lease may find the first one's Task: ``maybe_delivered``), ``failures`` only the tries
the network refused, which alone decide the retry delays and when a send gives up. Jobs:
``interruptions`` counts the leases given back because the store went away under the job,
which alone bound how often that happens without using a retry.

Frozen: it spells out its own types.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ALTER, as 0002: batch mode would copy the table.
    op.add_column(
        "outbox",
        sa.Column("failures", sa.Integer(), nullable=False, server_default="0"),
    )
    op.add_column(
        "jobs",
        sa.Column("interruptions", sa.Integer(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE jobs DROP COLUMN interruptions")
        op.execute("ALTER TABLE outbox DROP COLUMN failures")
    else:
        op.drop_column("jobs", "interruptions")
        op.drop_column("outbox", "failures")
