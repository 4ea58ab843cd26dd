"""Backups of the store: an online copy of an SQLite file, the ``pg_dump`` command for
PostgreSQL.

Copying a running bridge's SQLite file with ``cp`` loses what is still in its write-ahead log
(``-wal``), and may catch a page half written. SQLite's backup API copies the database as one
transaction sees it: the log included, consistent, while the bridge goes on writing (in WAL
mode a reader blocks no writer). PostgreSQL has its own tool for that; we only say how to call
it for the configured database.
"""

from __future__ import annotations

import shlex
import sqlite3
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from dsf_bridge.errors import ConfigError, StoreError
from dsf_bridge.store.database import sqlite_path, sync_url

__all__ = ["SqliteBackup", "backup_sqlite", "pg_dump_command"]


@dataclass(frozen=True)
class SqliteBackup:
    source: Path
    target: Path
    pages: int
    integrity: str  # "ok", or what ``PRAGMA integrity_check`` found


def backup_sqlite(url: str, target: Path) -> SqliteBackup:
    """Copy the SQLite store at ``url`` to ``target`` (which must not exist) with the backup
    API, in one step (one read snapshot), then check the copy's integrity."""
    source = sqlite_path(url)
    if source is None:
        raise ConfigError(f"db.url: {url!r} is no SQLite file", field="db.url")
    if not source.exists():
        raise ConfigError(f"db.url: SQLite database {source} does not exist", field="db.url")
    if target.exists():
        raise StoreError(f"{target} exists already; a backup never overwrites a file")
    if target.resolve() == source.resolve():
        raise StoreError(f"{target} is the store itself")
    try:
        # Read-only: the copy neither writes to the store nor changes its journal mode.
        # The path quoted: a "#", "?" or "%" in it would end or change it (a folder "a#b"
        # opened, and created, the empty database "a", and the backup copied that).
        quoted = urllib.parse.quote(str(source.resolve()))
        reader = sqlite3.connect(f"file:{quoted}?mode=ro", uri=True, timeout=30)
        try:
            writer = sqlite3.connect(target)
            try:
                reader.backup(writer)  # pages=-1: every page in one step, one snapshot
                pages = int(writer.execute("PRAGMA page_count").fetchone()[0])
                found = [row[0] for row in writer.execute("PRAGMA integrity_check")]
            finally:
                writer.close()
        finally:
            reader.close()
    except sqlite3.Error as exc:
        target.unlink(missing_ok=True)
        raise StoreError(f"backup of {source} failed: {exc}") from exc
    return SqliteBackup(source, target, pages, "; ".join(found))


def pg_dump_command(url: str, target: Path) -> str:
    """The ``pg_dump`` command that backs up the PostgreSQL store at ``url`` to ``target``
    (custom format, for ``pg_restore``); never with the password (``PGPASSWORD`` or
    ``~/.pgpass`` give it)."""
    parsed = sync_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ConfigError(f"db.url: {url!r} is no PostgreSQL database", field="db.url")
    words = ["pg_dump", "--format=custom"]
    if parsed.host:
        words.append(f"--host={parsed.host}")
    if parsed.port:
        words.append(f"--port={parsed.port}")
    if parsed.username:
        words.append(f"--username={parsed.username}")
    words += [f"--file={target}", str(parsed.database or "")]
    return shlex.join(words)
