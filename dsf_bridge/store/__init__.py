"""The SQL store: tables, migrations, transactions and repositories. All SQL lives here.

SQLite is the embedded default, PostgreSQL the production store; both run the same Alembic
history (``migrations/``) and the same code.
"""

from sqlalchemy.ext.asyncio import AsyncSession as Session

from dsf_bridge.store.audit import (
    ChainReport,
    append_event,
    digest_payload,
    reasons_of,
    seal_events,
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
    "SchemaStatus",
    "Session",
    "append_event",
    "async_url",
    "create_sync_engine",
    "digest_payload",
    "downgrade",
    "migrations_dir",
    "reasons_of",
    "schema_drift",
    "schema_status",
    "seal_events",
    "sqlite_path",
    "sync_url",
    "upgrade",
    "upgrade_in_place",
    "verify_chain",
]
