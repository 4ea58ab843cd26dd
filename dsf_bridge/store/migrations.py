"""Schema migrations with Alembic: one history for SQLite and PostgreSQL.

The revisions live in the repository's ``migrations/`` folder, and inside the wheel under
``dsf_bridge/_data/migrations``; this module finds them either way and drives Alembic through
its Python API, so ``dsf-bridge db ...`` needs no ``alembic.ini``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, MetaData
from sqlalchemy.exc import OperationalError

from dsf_bridge.errors import MigrationError, StoreError
from dsf_bridge.store.database import Database, create_sync_engine
from dsf_bridge.store.tables import metadata

__all__ = [
    "SchemaStatus",
    "downgrade",
    "migration_config",
    "migrations_dir",
    "schema_drift",
    "schema_status",
    "upgrade",
    "upgrade_in_place",
]


def migrations_dir() -> Path:
    """Where the Alembic environment lives: inside the wheel, or in the source checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_data" / "migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise MigrationError("the migrations folder is missing from this installation")


def migration_config(url: str) -> Config:
    """Alembic's configuration for ``url`` (pass an open connection in
    ``config.attributes["connection"]`` to migrate on it)."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    # Alembic's ini interpolation treats % specially; URL-encoded passwords contain it.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _run(action: str, url: str, fn: Any, *args: Any) -> None:
    config = migration_config(url)
    engine = create_sync_engine(url)
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            fn(config, *args)
    except CommandError as exc:
        raise MigrationError(f"{action} failed: {exc}") from exc
    except OperationalError as exc:
        raise StoreError(f"{action} failed, database unavailable: {exc.orig}") from exc
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema up to ``revision`` (default: the newest)."""
    _run("upgrade", url, command.upgrade, revision)


async def upgrade_in_place(database: Database) -> None:
    """Bring the schema up to the newest revision on ``database``'s own connection: the way
    to migrate an in-memory SQLite store, which no second connection can see."""

    def run(connection: Connection) -> None:
        config = migration_config(str(database.url))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with database.engine.begin() as connection:
        await connection.run_sync(run)


def downgrade(url: str, revision: str) -> None:
    """Take the schema down to ``revision`` (``base`` removes every table of the bridge)."""
    _run("downgrade", url, command.downgrade, revision)


@dataclass(frozen=True)
class SchemaStatus:
    current: str | None
    head: str

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def schema_status(url: str, *, read_only: bool = False) -> SchemaStatus:
    """The database's revision and the newest revision this release knows; ``read_only``
    looks without writing anything (not even SQLite's journal mode)."""
    head = ScriptDirectory.from_config(migration_config(url)).get_current_head()
    if head is None:  # pragma: no cover - the package always ships revisions
        raise MigrationError("no migration revisions found")
    engine = create_sync_engine(url, read_only=read_only)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except OperationalError as exc:
        raise StoreError(f"database unavailable: {exc.orig}") from exc
    finally:
        engine.dispose()
    return SchemaStatus(current=current, head=head)


def schema_drift(url: str, target: MetaData = metadata) -> list[Any]:
    """Differences between the migrated database at ``url`` and the declared models.

    Empty when the migrations produce exactly the schema ``target`` declares.
    """
    engine = create_sync_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": True}
            )
            return list(compare_metadata(context, target))
    finally:
        engine.dispose()
