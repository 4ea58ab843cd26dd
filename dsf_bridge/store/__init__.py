"""The SQL store: tables, migrations, transactions and repositories. All SQL lives here.

SQLite is the embedded default, PostgreSQL the production store; both run the same Alembic
history (``migrations/``) and the same code.
"""

from sqlalchemy.ext.asyncio import AsyncSession as Session

from dsf_bridge.store.audit import (
    ChainReport,
    Records,
    append_event,
    digest_payload,
    export_events,
    instance_record,
    reasons_of,
    seal_events,
    state_digest,
    task_record,
    verify_chain,
)
from dsf_bridge.store.database import (
    Database,
    async_url,
    create_sync_engine,
    sqlite_path,
    sync_url,
)
from dsf_bridge.store.migrations import (
    SchemaStatus,
    downgrade,
    migrations_dir,
    schema_drift,
    schema_status,
    upgrade,
    upgrade_in_place,
)

__all__ = [
    "ChainReport",
    "Database",
    "Records",
    "SchemaStatus",
    "Session",
    "append_event",
    "async_url",
    "create_sync_engine",
    "digest_payload",
    "downgrade",
    "export_events",
    "instance_record",
    "migrations_dir",
    "reasons_of",
    "schema_drift",
    "schema_status",
    "seal_events",
    "sqlite_path",
    "state_digest",
    "sync_url",
    "task_record",
    "upgrade",
    "upgrade_in_place",
    "verify_chain",
]
