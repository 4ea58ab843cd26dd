"""``dsf-bridge db backup``: a consistent online copy of a running SQLite store (its write-ahead
log included), and the ``pg_dump`` command for PostgreSQL."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import sys
from pathlib import Path

from sqlalchemy import func, select

from dsf_bridge.store import Database, append_event, seal_events
from dsf_bridge.store.tables import AuditEvent
from tests.served import cli


async def _write(database: Database, events: int) -> None:
    """``events`` audit events in one step's transaction, sealed as a worker round does."""
    async with database.transaction() as session:
        for number in range(events):
            await append_event(
                session, actor="bridge", subject=f"Task/{number}", action="task.received"
            )
    async with database.transaction() as session:
        await seal_events(session)


def _events_in(path: Path) -> int:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(connection.execute("SELECT count(*) FROM audit_events").fetchone()[0])
    finally:
        connection.close()


async def test_a_copy_taken_while_the_bridge_writes_is_whole_and_verifies(
    sqlite_database: Database, sqlite_url: str, tmp_path: Path
) -> None:
    source = Path(sqlite_url.removeprefix("sqlite:///"))
    await _write(sqlite_database, 500)
    written = 0
    copy = tmp_path / "copy.db"
    backup = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dsf_bridge",
        "db",
        "backup",
        str(copy),
        "--db-url",
        sqlite_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    # The bridge's own writes go on while the command starts and copies.
    communicate = asyncio.ensure_future(backup.communicate())
    while not communicate.done():
        await _write(sqlite_database, 20)
        written += 20
        await asyncio.sleep(0.01)
    out, err = communicate.result()
    assert backup.returncode == 0, err.decode()
    assert written > 0
    assert "integrity ok" in out.decode()
    assert 500 <= _events_in(copy) <= 500 + written

    verified = cli("audit", "verify", "--db-url", f"sqlite:///{copy}")
    assert verified.returncode == 0, verified.stderr
    assert "audit chain intact" in verified.stdout

    # What a plain file copy loses: the commits still in the write-ahead log, which the
    # running bridge (its connection open) has not checkpointed into the file yet. An empty
    # log first, so that these few pages stay in it (SQLite checkpoints at 1000).
    checkpoint = sqlite3.connect(source)
    try:
        assert checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    finally:
        checkpoint.close()
    await _write(sqlite_database, 50)
    wal = source.with_name(source.name + "-wal")
    assert wal.stat().st_size > 0
    committed = _events_in(source)
    plain = tmp_path / "plain.db"
    shutil.copyfile(source, plain)
    second = cli("db", "backup", str(tmp_path / "second.db"), "--db-url", sqlite_url)
    assert second.returncode == 0, second.stderr
    assert _events_in(tmp_path / "second.db") == committed
    assert _events_in(plain) < committed


async def test_a_backup_never_overwrites(
    sqlite_database: Database, sqlite_url: str, tmp_path: Path
) -> None:
    await _write(sqlite_database, 1)
    existing = tmp_path / "existing.db"
    existing.write_bytes(b"keep me")
    refused = cli("db", "backup", str(existing), "--db-url", sqlite_url)
    assert refused.returncode == 1
    assert "exists already" in refused.stderr
    assert existing.read_bytes() == b"keep me"
    async with sqlite_database.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(AuditEvent)) == 1


def test_a_missing_store_is_no_backup(tmp_path: Path) -> None:
    missing = cli(
        "db", "backup", str(tmp_path / "copy.db"), "--db-url", f"sqlite:///{tmp_path}/no.db"
    )
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr
    assert not (tmp_path / "copy.db").exists() and not (tmp_path / "no.db").exists()


def test_postgresql_prints_the_pg_dump_command_and_does_nothing(tmp_path: Path) -> None:
    url = "postgresql://dsf_bridge:s3cret@db.example.org:5433/bridge_site_a"
    target = tmp_path / "bridge.dump"
    printed = cli("db", "backup", str(target), "--db-url", url)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip() == (
        "pg_dump --format=custom --host=db.example.org --port=5433 --username=dsf_bridge "
        f"--file={target} bridge_site_a"
    )
    assert "s3cret" not in printed.stdout + printed.stderr
    assert not target.exists()


def test_a_store_below_a_folder_with_uri_characters_is_copied(tmp_path: Path) -> None:
    """The store's path went into a ``file:`` URI as it was: below a folder ``a#b`` the copy
    was of a new, empty database ``a`` (created beside it), reported as a backup."""
    folder = tmp_path / "site #1 100%"
    folder.mkdir()
    store = folder / "store.db"
    with sqlite3.connect(store) as connection:
        connection.execute("CREATE TABLE kept (x)")
        connection.execute("INSERT INTO kept VALUES (42)")
    connection.close()
    target = tmp_path / "copy.db"
    done = cli("db", "backup", str(target), "--db-url", f"sqlite:///{store}")
    assert done.returncode == 0, done.stderr
    copy = sqlite3.connect(target)
    try:
        assert copy.execute("SELECT x FROM kept").fetchall() == [(42,)]
    finally:
        copy.close()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["copy.db", folder.name]
