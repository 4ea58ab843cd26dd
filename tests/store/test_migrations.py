"""One Alembic history for SQLite and PostgreSQL: up, down to base, up again, and no drift."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import sqlalchemy as sa
from sqlalchemy import inspect

from dsf_bridge.store import (
    Database,
    append_event,
    create_sync_engine,
    downgrade,
    schema_drift,
    schema_status,
    seal_events,
    upgrade,
    verify_chain,
)
from dsf_bridge.store.audit import GENESIS_HASH, event_hash
from dsf_bridge.store.tables import NAMING_CONVENTION, AuditEvent, metadata

EXPECTED_TABLES = {
    "audit_events",
    "audit_head",
    "jobs",
    "message_subscriptions",
    "outbox",
    "process_definitions",
    "process_instances",
    "pseudonym_mappings",
    "store_owner",
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


def _definition(connection: sa.Connection) -> int:
    """A deployed definition, inserted as the revision under test has the table; its id."""
    connection.execute(
        sa.text(
            "INSERT INTO process_definitions (process_key, version, plugin, model_hash,"
            " status, deployed_at) VALUES ('k', '1.0', 'p', 'h', 'active', :now)"
        ),
        {"now": "2026-01-01T00:00:00+00:00"},
    )
    return int(connection.execute(sa.text("SELECT id FROM process_definitions")).scalar_one())


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


def test_0002_down_and_up_keeps_instances_and_their_work(db_url: str) -> None:
    """Adding and dropping the alternative business key must not copy process_instances: on
    SQLite, dropping the old copy would cascade into jobs, timers and subscriptions."""
    upgrade(db_url)
    engine = create_sync_engine(db_url)
    try:
        with engine.begin() as connection:
            definition_id = _definition(connection)
            connection.execute(
                sa.text(
                    "INSERT INTO process_instances (id, definition_id, business_key, status,"
                    " state, version, created_at, updated_at) VALUES ('i', :d, 'bk', 'running',"
                    " '{}', 1, :now, :now)"
                ),
                {"d": definition_id, "now": "2026-01-01T00:00:00+00:00"},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO jobs (instance_id, kind, due_at, retries_left, attempts, payload,"
                    " created_at)"
                    " VALUES ('i', 'continue', :now, 3, 0, '{}', :now)"
                ),
                {"now": "2026-01-01T00:00:00+00:00"},
            )
    finally:
        engine.dispose()
    downgrade(db_url, "0001")
    upgrade(db_url)
    engine = create_sync_engine(db_url)
    try:
        with engine.connect() as connection:
            jobs = connection.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one()
            instances = connection.execute(
                sa.text("SELECT count(*) FROM process_instances")
            ).scalar_one()
    finally:
        engine.dispose()
    assert (instances, jobs) == (1, 1)


def test_0004_keeps_the_sealed_chain_and_continues_it(db_url: str) -> None:
    """Events chained before 0004 keep their sequence and hashes (their id is their sequence),
    new events are sealed after them, and the downgrade keeps every sealed event."""
    upgrade(db_url, "0003")
    previous, rows = GENESIS_HASH, []
    for sequence in (1, 2, 3):
        when = dt.datetime(2026, 1, sequence, tzinfo=dt.UTC)
        hashed = event_hash(
            sequence=sequence,
            occurred_at=when,
            actor="bridge",
            subject=f"instance/{sequence}",
            action="instance.started",
            reason="",
            payload_digest=None,
            previous_hash=previous,
        )
        rows.append((sequence, when, previous, hashed))
        previous = hashed
    engine = create_sync_engine(db_url)
    try:
        with engine.begin() as connection:
            for sequence, when, before, hashed in rows:
                connection.execute(
                    sa.text(
                        "INSERT INTO audit_events (sequence, occurred_at, actor, subject, action,"
                        " reason, previous_hash, event_hash) VALUES (:s, :at, 'bridge',"
                        " :subject, 'instance.started', '', :before, :hashed)"
                    ),
                    {
                        "s": sequence,
                        "at": when,
                        "subject": f"instance/{sequence}",
                        "before": before,
                        "hashed": hashed,
                    },
                )
            connection.execute(
                sa.text("INSERT INTO audit_head (id, sequence, event_hash) VALUES (1, 3, :h)"),
                {"h": previous},
            )
    finally:
        engine.dispose()

    upgrade(db_url)

    async def continue_chain() -> tuple[int, bool, int]:
        database = Database(db_url)
        try:
            async with database.transaction() as session:
                await append_event(session, actor="bridge", subject="instance/4", action="x")
            async with database.transaction() as session:
                await seal_events(session)
                report = await verify_chain(session)
                newest = await session.scalar(sa.select(sa.func.max(AuditEvent.id)))
        finally:
            await database.dispose()
        return report.events, report.ok, int(newest or 0)

    assert asyncio.run(continue_chain()) == (4, True, 4)
    downgrade(db_url, "0003")
    engine = create_sync_engine(db_url)
    try:
        with engine.begin() as connection:
            sequences = (
                connection.execute(sa.text("SELECT sequence FROM audit_events ORDER BY sequence"))
                .scalars()
                .all()
            )
    finally:
        engine.dispose()
    assert sequences == [1, 2, 3, 4]
    upgrade(db_url)
    assert schema_drift(db_url) == []


def test_0008_counts_the_incidents_of_the_running_instances(db_url: str) -> None:
    """0008 fills in ``incidents`` from every instance's state (tokens marked ``x``): /metrics
    then counts them without reading a state, and audit verify finds each row as its state."""
    upgrade(db_url, "0007")
    stuck = {"v": 1, "tk": {"1": {"p": "w", "x": {"m": "boom"}}, "2": {"p": "w"}, "3": {"x": {}}}}
    states = {"r-stuck": ("running", stuck), "r-fine": ("running", {"v": 1, "tk": {"1": {}}})}
    states["r-bare"] = ("running", {"v": 1})
    states["ended"] = ("failed", stuck)
    states.update({f"r-{n:04d}": ("running", stuck) for n in range(1200)})  # pages of 500
    engine = create_sync_engine(db_url)
    try:
        with engine.begin() as connection:
            definition_id = _definition(connection)
            connection.execute(
                sa.text(
                    "INSERT INTO process_instances (id, definition_id, business_key, status,"
                    " state, version, created_at, updated_at) VALUES (:id, :d, :id, :status,"
                    " :state, 1, :now, :now)"
                ),
                [
                    {
                        "id": ident,
                        "d": definition_id,
                        "status": status,
                        "state": json.dumps(state),
                        "now": "2026-01-01T00:00:00+00:00",
                    }
                    for ident, (status, state) in states.items()
                ],
            )
    finally:
        engine.dispose()
    upgrade(db_url)
    engine = create_sync_engine(db_url)
    try:
        with engine.connect() as connection:
            found: dict[str, int] = dict(
                connection.execute(sa.text("SELECT id, incidents FROM process_instances")).all()
            )
    finally:
        engine.dispose()
    assert {ident: found[ident] for ident in ("r-stuck", "r-fine", "r-bare", "ended")} == {
        "r-stuck": 2,
        "r-fine": 0,
        "r-bare": 0,
        "ended": 2,
    }
    assert {found[f"r-{n:04d}"] for n in range(1200)} == {2}
