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
    with op.batch_alter_table("process_instances") as batch:
        batch.add_column(
            sa.Column("alternative_business_key", sa.String(length=200), nullable=True)
        )
    op.create_index(
        "ix_process_instances_alternative_business_key",
        "process_instances",
        ["alternative_business_key"],
    )


def downgrade() -> None:
    op.drop_index("ix_process_instances_alternative_business_key", table_name="process_instances")
    with op.batch_alter_table("process_instances") as batch:
        batch.drop_column("alternative_business_key")
