"""SQLite for the asyncio engine without a thread per statement: ``sqlite+dsfinline``.

SQLAlchemy's ``aiosqlite`` driver sends every statement, fetch, commit and rollback to a worker
thread and back: four thread hops per statement and five more per transaction, about 1 ms of
CPU per statement against microseconds for the statement itself, and the write lock held across
every hop. This dialect runs :mod:`sqlite3` on the event loop's thread instead, through the
same pysqlite dialect SQLAlchemy uses for synchronous SQLite, so the async engine and sessions,
the schema, the queries and their results stay exactly as they are.

What it trades: a statement blocks the event loop while it runs. The bridge's statements touch
a handful of rows by key and its transactions are short, and writers of this process already
queue in asyncio (``Database._writing``), so nothing in the bridge waits for SQLite's busy
handler; only a write by *another process* on the same file (a CLI command, for the few
milliseconds of its transaction) makes the loop wait in that handler. The admin API's read-only
store keeps ``aiosqlite``: its list queries may scan, and must never stall the workers.

A statement that runs on the loop also cannot be cancelled half way: a cancelled worker round
unwinds between statements and rolls its transaction back at once, instead of leaving a worker
thread holding the write lock.
"""

from __future__ import annotations

import sqlite3
from types import SimpleNamespace
from typing import Any

from sqlalchemy import pool
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import URL
from sqlalchemy.engine.interfaces import AdaptedConnection
from sqlalchemy.util.concurrency import await_, in_greenlet

__all__ = ["DRIVER", "InlineConnection", "InlineCursor", "SQLiteDialect_inline", "as_awaited"]

DRIVER = "dsfinline"


async def _ready() -> None:
    return None


def as_awaited() -> None:
    """Pass once through the event loop's side of SQLAlchemy's greenlet bridge (a coroutine
    that is done at once: no loop iteration). ``AsyncConnection.execute`` refuses an execution
    that awaited nothing (``AwaitRequired``): with this, the writer's engine works through
    connections as it does through sessions."""
    if in_greenlet():
        await_(_ready())


class InlineCursor(sqlite3.Cursor):
    """A :mod:`sqlite3` cursor that also answers the async engine's soft close (its rows are
    read on this thread when asked for, so there is nothing to buffer)."""

    def execute(self, sql: str, parameters: Any = (), /) -> InlineCursor:
        as_awaited()
        super().execute(sql, parameters)
        return self

    def executemany(self, sql: str, parameters: Any, /) -> InlineCursor:
        as_awaited()
        super().executemany(sql, parameters)
        return self

    async def _async_soft_close(self) -> None:
        return None


class InlineConnection(AdaptedConnection):
    """A :mod:`sqlite3` connection behind SQLAlchemy's adapted-connection facade: every call
    runs at once, on the calling (event loop) thread."""

    __slots__ = ()

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection  # type: ignore[assignment]

    @property
    def _sqlite(self) -> sqlite3.Connection:
        return self._connection  # type: ignore[return-value]

    @property
    def isolation_level(self) -> str | None:
        return self._sqlite.isolation_level

    @isolation_level.setter
    def isolation_level(self, value: Any) -> None:
        self._sqlite.isolation_level = value

    def cursor(self, server_side: bool = False) -> InlineCursor:
        return self._sqlite.cursor(InlineCursor)

    def execute(self, operation: Any, parameters: Any = ()) -> InlineCursor:
        cursor = self.cursor()
        cursor.execute(operation, parameters)
        return cursor

    def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._sqlite.create_function(*args, **kwargs)

    def commit(self) -> None:
        self._sqlite.commit()

    def rollback(self) -> None:
        self._sqlite.rollback()

    def close(self) -> None:
        self._sqlite.close()

    def terminate(self) -> None:
        self._sqlite.close()


def _connect(*args: Any, **kwargs: Any) -> InlineConnection:
    # The pool may close a connection from the garbage collector's thread.
    kwargs["check_same_thread"] = False
    return InlineConnection(sqlite3.connect(*args, **kwargs))


def _dbapi() -> Any:
    """:mod:`sqlite3`'s module interface with a ``connect`` that adapts the connection."""
    names = (
        "DatabaseError",
        "DataError",
        "Error",
        "IntegrityError",
        "InterfaceError",
        "InternalError",
        "NotSupportedError",
        "OperationalError",
        "ProgrammingError",
        "Warning",
        "Binary",
        "PARSE_COLNAMES",
        "PARSE_DECLTYPES",
        "sqlite_version",
        "sqlite_version_info",
        "paramstyle",
        "apilevel",
        "threadsafety",
    )
    return SimpleNamespace(connect=_connect, **{name: getattr(sqlite3, name) for name in names})


class SQLiteDialect_inline(SQLiteDialect_pysqlite):  # noqa: N801 - SQLAlchemy's naming
    """The pysqlite dialect declared asynchronous; it connects :class:`InlineConnection`."""

    driver = DRIVER
    is_async = True
    has_terminate = True
    supports_statement_cache = True

    @classmethod
    def import_dbapi(cls) -> Any:
        return _dbapi()

    @classmethod
    def get_pool_class(cls, url: URL) -> type[pool.Pool]:
        if cls._is_url_file_db(url):
            return pool.AsyncAdaptedQueuePool
        return pool.StaticPool

    def get_driver_connection(self, connection: Any) -> Any:
        return connection._connection

    def do_terminate(self, dbapi_connection: Any) -> None:
        dbapi_connection.terminate()


registry.register(f"sqlite.{DRIVER}", __name__, "SQLiteDialect_inline")
