"""One Alembic history for SQLite and PostgreSQL: up, down to base, up again, and no drift."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import inspect

from dsf_bridge.store import create_sync_engine, downgrade, schema_drift, schema_status, upgrade
from dsf_bridge.store.tables import NAMING_CONVENTION, metadata

EXPECTED_TABLES = {
    "audit_events",
    "audit_head",
    "jobs",
    "message_subscriptions",
    "outbox",
    "process_definitions",
    "process_instances",
    "sync_cursors",
    "tasks_seen",
    "timers",
}


def _tables(url: str) -> set[str]:
    engine = create_sync_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_round_trip(db_url: str) -> None:
    assert schema_status(db_url).current is None
    upgrade(db_url)
    assert _tables(db_url) == EXPECTED_TABLES
    assert schema_status(db_url).up_to_date

    downgrade(db_url, "base")
    assert _tables(db_url) == set()
    assert schema_status(db_url).current is None

    upgrade(db_url)
    assert _tables(db_url) == EXPECTED_TABLES
    assert schema_drift(db_url) == []


def test_migrations_match_the_models(migrated_url: str) -> None:
    assert schema_drift(migrated_url) == []


def test_drift_is_detected_when_models_change(migrated_url: str) -> None:
    changed = sa.MetaData(naming_convention=NAMING_CONVENTION)
    for table in metadata.sorted_tables:
        table.to_metadata(changed)
    changed.tables["jobs"].append_column(sa.Column("priority", sa.Integer(), nullable=True))
    changed.remove(changed.tables["sync_cursors"])

    diffs = schema_drift(migrated_url, changed)

    kinds = {
        (diff[0], getattr(diff[-1], "name", None)) for diff in diffs if isinstance(diff, tuple)
    }
    assert ("add_column", "priority") in kinds
    assert ("remove_table", "sync_cursors") in kinds
