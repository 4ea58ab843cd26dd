"""The mapping of original and replaced UIDs of pseudonymized studies (issue 13).

``pseudonym_mappings``: one row per UID the site replaced before a study left it, keyed by the
replacement (what comes back in a result), with the original and the original study's UID.
Only the site's own store holds it (docs/privacy.md).

Frozen: it spells out its own types.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pseudonym_mappings",
        sa.Column("replaced_uid", sa.String(length=64), nullable=False),
        sa.Column("original_uid", sa.String(length=64), nullable=False),
        sa.Column("original_study_uid", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("replaced_uid", name="pk_pseudonym_mappings"),
    )
    op.create_index("ix_pseudonym_mappings_original_uid", "pseudonym_mappings", ["original_uid"])
    op.create_index(
        "ix_pseudonym_mappings_original_study_uid", "pseudonym_mappings", ["original_study_uid"]
    )


def downgrade() -> None:
    op.drop_index("ix_pseudonym_mappings_original_study_uid", table_name="pseudonym_mappings")
    op.drop_index("ix_pseudonym_mappings_original_uid", table_name="pseudonym_mappings")
    op.drop_table("pseudonym_mappings")
