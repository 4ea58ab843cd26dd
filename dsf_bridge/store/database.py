"""Database URLs, engines and transactions for the two supported stores.

Users write plain ``sqlite:///PATH`` or ``postgresql://USER@HOST:PORT/DB``; the bridge picks the
driver: ``psycopg`` (version 3) for PostgreSQL, async for the service and sync for migrations;
for SQLite ``pysqlite`` for migrations and, in the service, :mod:`sqlite3` run on the event loop
(:mod:`dsf_bridge.store.inline_sqlite`) for the writer and ``aiosqlite`` for read-only stores.
SQLite runs in WAL mode with foreign keys on and a busy timeout, so the embedded default behaves
like a small server database.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    InvalidatePoolError,
    OperationalError,
    StatementError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.util.concurrency import greenlet_spawn

from dsf_bridge.errors import BridgeError, ConfigError, StoreError
from dsf_bridge.store import batched_pg, direct, inline_sqlite
from dsf_bridge.store.direct import DirectResult, Prepared

__all__ = [
    "Database",
    "async_url",
    "at_commit",
    "create_sync_engine",
    "execute",
    "on_conflict",
    "sqlite_path",
    "sync_url",
]

_SQLITE_BUSY_TIMEOUT_MS = 10_000
# Readers (the admin API) give up sooner than writers: a probe must answer within seconds.
_SQLITE_READ_BUSY_TIMEOUT_MS = 2_000
# A pooled PostgreSQL connection idle for longer than this is pinged before use: one that the
# server ended meanwhile (a restart, a fail-over, an idle timeout) is replaced, with every other
# connection of the pool, before a step runs on it. A connection in steady use is not pinged:
# a ping per transaction was a fifth of a Task's round trips. A connection that dies between
# two uses less than this apart fails that one transaction, as a retryable store error.
PING_AFTER_IDLE_SECONDS = 1.0
# A write given to Database.soon goes with the next transaction that begins within this time, or
# else in a transaction of its own.
SOON_SECONDS = 0.05
# How long a write given to Database.soon waits before it is tried again when its
# transaction failed (it is then written in a transaction of its own).
_SOON_RETRY_SECONDS = 1.0

log = structlog.get_logger("dsf_bridge.store")


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"db.url: not a database URL: {exc}", field="db.url") from exc


def sync_url(url: str) -> URL:
    """The URL with the synchronous driver (migrations, the CLI)."""
    parsed = _parse(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite")
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+psycopg")
    raise ConfigError(f"db.url: unsupported database {backend!r}", field="db.url")


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite URL (``None`` for other databases and in-memory SQLite)."""
    parsed = sync_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def async_url(url: str, *, read_only: bool = False) -> URL:
    """The URL with the asyncio driver (the service): SQLite runs on the event loop for a
    writer, in ``aiosqlite``'s worker thread for a reader whose scans must not stall it."""
    parsed = sync_url(url)
    if parsed.get_backend_name() == "sqlite":
        driver = "aiosqlite" if read_only else inline_sqlite.DRIVER
        return parsed.set(drivername=f"sqlite+{driver}")
    if not read_only:
        return parsed.set(drivername=f"postgresql+{batched_pg.DRIVER}")
    return parsed


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not the driver, emit BEGIN: see _sqlite_begin_immediate.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # The busy timeout first: switching to WAL needs the lock too.
    cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin_immediate(connection: Any) -> None:
    # Take the write lock up front: a deferred transaction that reads, then writes, fails with
    # SQLITE_BUSY when another writer got in between, instead of waiting for busy_timeout.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _prepare_sqlite(engine: Engine) -> None:
    event.listen(engine, "connect", _sqlite_pragmas)
    event.listen(engine, "begin", _sqlite_begin_immediate)


def _sqlite_read_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA query_only=ON")
    cursor.execute(f"PRAGMA busy_timeout={_SQLITE_READ_BUSY_TIMEOUT_MS}")
    cursor.close()


def _sqlite_begin_deferred(connection: Any) -> None:
    # A deferred transaction reads one WAL snapshot and never takes the write lock.
    connection.exec_driver_sql("BEGIN")


def _postgresql_read_only(connection: Any) -> None:
    connection.exec_driver_sql("SET TRANSACTION READ ONLY")


def _read_only_url(target: URL, url: str) -> URL:
    """SQLite's URI form with ``mode=ro``: refuses writes and does not create a missing file."""
    path = sqlite_path(url)
    if path is None:
        return target
    return target.set(database=f"file:{path.resolve()}?mode=ro", query={"uri": "true"})


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection at checkout only when it was idle for longer than
    :data:`PING_AFTER_IDLE_SECONDS` (SQLAlchemy's ``pool_pre_ping`` pings at every checkout)."""
    dialect = engine.dialect

    def checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    def checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since <= PING_AFTER_IDLE_SECONDS:
            return
        # Not a disconnect (a statement timeout, say): the error goes to the caller.
        if not dialect._do_ping_w_event(dbapi_connection):
            # The pool replaces this connection and every one checked in before now.
            raise InvalidatePoolError("the server ended an idle connection")

    event.listen(engine.pool, "checkin", checked_in)
    event.listen(engine.pool, "checkout", checked_out)


def _prepare(engine: Engine, *, read_only: bool) -> None:
    backend = engine.dialect.name
    if backend == "sqlite" and read_only:
        event.listen(engine, "connect", _sqlite_read_pragmas)
        event.listen(engine, "begin", _sqlite_begin_deferred)
    elif backend == "sqlite":
        _prepare_sqlite(engine)
    else:
        _ping_when_idle(engine)
        if read_only:
            if engine.dialect.driver == batched_pg.DRIVER:
                # Its SQL would run before the batching driver's held BEGIN, outside it.
                raise ValueError("a read-only store must use psycopg, not postgresql+dsfbatch")
            event.listen(engine, "begin", _postgresql_read_only)


def create_sync_engine(url: str, *, echo: bool = False, read_only: bool = False) -> Engine:
    """A synchronous engine for migrations and command-line tools."""
    target = sync_url(url)
    if read_only:
        target = _read_only_url(target, url)
    engine = create_engine(target, echo=echo)
    _prepare(engine, read_only=read_only)
    return engine


@contextmanager
def _store_errors() -> Iterator[None]:
    """Database failures as :class:`StoreError`; connection losses and peaks are retryable."""
    try:
        yield
    except OperationalError as exc:
        raise StoreError(f"database unavailable: {exc.orig}", retryable=True) from exc
    except DBAPIError as exc:
        raise StoreError(
            f"database error: {exc.orig}", retryable=bool(exc.connection_invalidated)
        ) from exc
    except StatementError as exc:
        # A value the column's codec refuses (dsf_bridge.store.kinds), on the way in or out.
        raise StoreError(f"database error: {exc.orig}") from exc
    except PoolTimeoutError as exc:
        # Every pooled connection busy for pool_timeout: a peak, not a broken store.
        raise StoreError(f"database busy: {exc}", retryable=True) from exc


_AT_COMMIT = "dsf_bridge.at_commit"


async def at_commit(session: AsyncSession, statement: Prepared, row: dict[str, Any]) -> None:
    """Execute the ``INSERT`` ``statement`` with ``row`` in the session's transaction: in a
    :meth:`Database.transaction`, at its end, with every other row given for that statement in
    one statement of several ``VALUES`` (on PostgreSQL held with the transaction's other
    writes; in the order given; several statements in the order of their first rows);
    anywhere else at once. For writes that nothing in the transaction reads back (the audit
    trail's appends)."""
    writes = session.info.get(_AT_COMMIT)
    if writes is None:
        await execute(session, statement, row)
    else:
        writes.setdefault(statement, []).append(row)


_DIRECT = "dsf_bridge.direct"


async def execute(
    session: AsyncSession, prepared: Prepared, values: Mapping[str, Any]
) -> DirectResult:
    """Execute ``prepared`` with ``values`` in the session's transaction: in a
    :meth:`Database.transaction` straight on its connection (:mod:`dsf_bridge.store.direct`;
    on PostgreSQL a write nobody reads is held for the next read or the commit), anywhere else
    through the session."""
    if _DIRECT not in session.info:
        result: Any = await session.execute(
            prepared.statement(session.get_bind().dialect.name), values
        )
        rows = [tuple(row) for row in result] if result.returns_rows else []
        return DirectResult(rows, result.rowcount)
    connection, engine = await _direct(session)
    return await direct.run_on(connection, engine, prepared, values, in_transaction=True)


async def _direct(session: AsyncSession) -> tuple[Any, Engine]:
    """The DBAPI connection of a :meth:`Database.transaction`'s session, and its engine."""
    connection = session.info[_DIRECT]
    if connection is None:
        # SQLAlchemy begins the transaction on it (SQLite: BEGIN IMMEDIATE; PostgreSQL: a
        # BEGIN held for the first statement sent).
        proxied = await (await session.connection()).get_raw_connection()
        connection = session.info[_DIRECT] = proxied.dbapi_connection
    engine = session.get_bind()
    assert isinstance(engine, Engine)  # noqa: S101 - a Database's sessions are bound to it
    return connection, engine


_CONFLICTS = "dsf_bridge.conflicts"


def on_conflict(session: AsyncSession, table: str, error: BridgeError) -> None:
    """In a :meth:`Database.transaction`: a duplicate key in ``table`` (a unique or primary
    key violation) makes the transaction leave as ``error`` instead of a :class:`StoreError`,
    whether the write that met it raised at once (SQLite) or was held and sent with the
    transaction's next read or its commit (PostgreSQL, :mod:`dsf_bridge.store.batched_pg`).
    So a write may learn that its row existed without reading first (a round trip of its
    own). The last ``error`` given for a table counts: give it right before the write."""
    conflicts = session.info.get(_CONFLICTS)
    if conflicts is None:
        raise StoreError("on_conflict needs a Database.transaction")  # a caller's bug
    conflicts[table] = error


_SQLITE_DUPLICATE = re.compile(r"UNIQUE constraint failed: (\w+)\.")


def _duplicate_in(exc: IntegrityError) -> str | None:
    """The table whose unique or primary key ``exc`` violates, if that is what it says."""
    orig = exc.orig
    diag = getattr(orig, "diag", None)
    if diag is not None:  # psycopg: 23505 unique_violation
        return diag.table_name if getattr(orig, "sqlstate", None) == "23505" else None
    found = _SQLITE_DUPLICATE.match(str(orig))
    return found.group(1) if found else None


@contextmanager
def _conflicts_as(conflicts: dict[str, BridgeError]) -> Iterator[None]:
    """A duplicate key in a table :func:`on_conflict` named, as the error it gave."""
    try:
        yield
    except IntegrityError as exc:
        table = _duplicate_in(exc)
        if table is None or table not in conflicts:
            raise
        raise conflicts[table] from exc


class Database:
    """The async engine and session factory of one store; close it with :meth:`dispose`."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 5,
        max_overflow: int = 10,
        echo: bool = False,
        read_only: bool = False,
    ) -> None:
        """``read_only`` stores (the admin API) never write and never take a write lock: on
        SQLite the file is opened read-only (it must exist) and transactions are deferred, on
        PostgreSQL every transaction is ``READ ONLY``. ``max_overflow``: PostgreSQL connections
        opened beyond ``pool_size`` at a peak and closed again after it (each a new backend
        process on the server); 0 keeps a fixed pool whose users wait for a free connection."""
        target = async_url(url, read_only=read_only)
        options: dict[str, Any] = {"echo": echo}
        backend = target.get_backend_name()
        if backend == "postgresql":
            # Last in, first out: under a light load the same few connections serve every
            # step and are never idle long enough to need a ping (_ping_when_idle).
            options.update(pool_size=pool_size, max_overflow=max_overflow, pool_use_lifo=True)
        if read_only:
            target = _read_only_url(target, url)
        self.url = target
        self.read_only = read_only
        self.engine: AsyncEngine = create_async_engine(target, **options)
        _prepare(self.engine.sync_engine, read_only=read_only)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer at a time. Writers of this process queue here, in asyncio,
        # instead of in SQLite's busy handler, which sleeps in steps of milliseconds before it
        # retries (it cost a Task about 5 ms whenever two steps overlapped). Other processes
        # on the same file still meet the busy timeout.
        self._writer: asyncio.Lock | None = (
            asyncio.Lock() if backend == "sqlite" and not read_only else None
        )
        # Writes given to soon(): for the next transaction (_soon), or, after a transaction
        # that carried them failed, for one of their own (_soon_alone).
        self._soon: list[tuple[Prepared, dict[str, Any]]] = []
        self._soon_alone: list[tuple[Prepared, dict[str, Any]]] = []
        self._soon_timer: asyncio.TimerHandle | None = None
        self._soon_flushing: asyncio.Task[None] | None = None
        self._disposing = False
        self._soon_flush_lock = asyncio.Lock()

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One unit of work: committed when the block ends, rolled back if it raises. What
        :func:`at_commit` was given is written when the block ends, before the commit; a
        duplicate key :func:`on_conflict` expects leaves as the error it was given.

        Database failures leave as :class:`StoreError`; connection losses are retryable.
        """
        conflicts: dict[str, BridgeError] = {}
        carried: list[tuple[Prepared, dict[str, Any]]] = []
        try:
            with _store_errors(), _conflicts_as(conflicts):
                async with self._writing(), self._sessions() as session, session.begin():
                    writes: dict[Prepared, list[dict[str, Any]]] = {}
                    session.info[_AT_COMMIT] = writes
                    session.info[_CONFLICTS] = conflicts
                    session.info[_DIRECT] = None
                    try:
                        # Taken once the write lock is held: on SQLite they run at once.
                        carried, self._soon = self._soon, []
                        for statement, values in carried:
                            await execute(session, statement, values)
                        yield session
                        for statement, rows in writes.items():
                            if len(rows) == 1:
                                await execute(session, statement, rows[0])
                            else:
                                connection, engine = await _direct(session)
                                await direct.run_many_on(connection, engine, statement, rows)
                    finally:
                        del session.info[_AT_COMMIT]
                        del session.info[_CONFLICTS]
                        del session.info[_DIRECT]
        except BaseException:
            if carried:
                # Rolled back with the transaction; maybe they were what failed it: they go on
                # their own now, so that they cannot fail the next transaction as well.
                self._soon_alone.extend(carried)
                self._schedule_soon(_SOON_RETRY_SECONDS)
            raise

    def soon(self, prepared: Prepared, values: Mapping[str, Any]) -> None:
        """Have ``prepared`` run with ``values`` soon, in a transaction this process commits
        anyway: the next :meth:`transaction` to begin runs it first (on PostgreSQL held with its
        other writes: no round trip of its own), or, when none begins within
        :data:`SOON_SECONDS`, a transaction of its own. For a write whose loss in a crash costs
        nothing but a repetition that is harmless anyway, and that nothing waits for: an
        effect's done mark (its effect is idempotent and would be performed again after its
        lease). Nobody reads what it answers; give an ``UPDATE`` or ``DELETE`` the execution
        option :data:`~dsf_bridge.store.batched_pg.UNREAD`. A transaction that fails takes it
        down with it; it is then written on its own, tried again while the store fails with a
        retryable error and dropped (logged) when it fails by itself otherwise. :meth:`dispose`
        writes what is left first."""
        self._soon.append((prepared, dict(values)))
        self._schedule_soon(SOON_SECONDS)

    def _schedule_soon(self, delay: float) -> None:
        """A flush in ``delay`` seconds, unless one is due sooner or under way."""
        if self._soon_flushing is not None or self._disposing:
            return
        loop = asyncio.get_running_loop()
        if self._soon_timer is not None:
            if self._soon_timer.when() <= loop.time() + delay:
                return
            self._soon_timer.cancel()
        self._soon_timer = loop.call_later(delay, self._flush_later)

    def _flush_later(self) -> None:
        self._soon_timer = None
        self._soon_flushing = asyncio.get_running_loop().create_task(self._flush_in_background())

    async def _flush_in_background(self) -> None:
        delay = SOON_SECONDS  # for writes given meanwhile
        try:
            await self.flush_soon()
        except StoreError as exc:
            delay = _SOON_RETRY_SECONDS
            log.warning("store.soon_writes_delayed", error=str(exc))
        except Exception:  # a bug: logged, the writes stay queued
            delay = _SOON_RETRY_SECONDS
            log.exception("store.soon_writes_crashed")
        finally:
            self._soon_flushing = None
            if self._soon or self._soon_alone:
                self._schedule_soon(delay)

    async def flush_soon(self) -> None:
        """Write now what :meth:`soon` was given: first those a failed transaction carried,
        one transaction each, then the rest in one. A retryable store error leaves the writes
        queued and is raised; a write that fails by itself otherwise is dropped and logged
        (its effect is performed again after its lease)."""
        async with self._soon_flush_lock:
            while self._soon_alone:
                statement, values = self._soon_alone[0]
                try:
                    with _store_errors():
                        async with self._writing(), self._sessions() as session, session.begin():
                            session.info[_DIRECT] = None
                            try:
                                await execute(session, statement, values)
                            finally:
                                del session.info[_DIRECT]
                except StoreError as exc:
                    if exc.retryable:
                        raise
                    log.error("store.soon_write_dropped", error=str(exc))
                del self._soon_alone[0]
            if self._soon:
                async with self.transaction():
                    pass

    async def run(self, prepared: Prepared, values: Mapping[str, Any]) -> DirectResult:
        """Run one statement on its own, committed by itself, straight on a pooled connection
        (:mod:`dsf_bridge.store.direct`): what :meth:`autocommit` does for one statement, for
        a fraction of its CPU. On SQLite it waits for this process's other writers first.
        Errors as for :meth:`transaction`."""
        dialect = self.engine.dialect
        with _store_errors():
            async with self._writing():
                try:
                    proxied = await self.engine.raw_connection()
                except dialect.loaded_dbapi.Error as exc:  # the driver's own, unwrapped here
                    raise direct.as_sqlalchemy(exc, dialect, None, None) from exc
                try:
                    return await direct.run_on(
                        proxied.dbapi_connection,
                        self.engine.sync_engine,
                        prepared,
                        values,
                        in_transaction=False,
                    )
                except DBAPIError as exc:
                    if exc.connection_invalidated:
                        await greenlet_spawn(proxied.invalidate)
                    raise
                finally:
                    await greenlet_spawn(proxied.close)

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncSession]:
        """Work of one statement, or of statements that need not commit together: on
        PostgreSQL each statement commits on its own, without ``BEGIN`` and ``COMMIT`` (one
        round trip instead of three; at ``READ COMMITTED`` each statement sees its own
        snapshot anyway); elsewhere a :meth:`transaction` (SQLite's write lock). What ran
        before the block raised stays on PostgreSQL: use it only where that is what a
        transaction would do too. Errors as for :meth:`transaction`."""
        if self.dialect != "postgresql":
            async with self.transaction() as session:
                yield session
            return
        with _store_errors():
            async with self.engine.connect() as connection:
                single = await connection.execution_options(isolation_level="AUTOCOMMIT")
                async with self._sessions(bind=single) as session:
                    yield session

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        if self._writer is None:
            yield
            return
        try:
            # As long as SQLite's own busy timeout: the same error after the same wait.
            async with asyncio.timeout(_SQLITE_BUSY_TIMEOUT_MS / 1000):
                await self._writer.acquire()
        except TimeoutError:
            raise StoreError(
                "database unavailable: database is locked (another step of this bridge held "
                f"the write lock for {_SQLITE_BUSY_TIMEOUT_MS / 1000:.0f} s)",
                retryable=True,
            ) from None
        try:
            yield
        finally:
            self._writer.release()

    async def dispose(self) -> None:
        """Write what :meth:`soon` was given (as far as the store lets), then close every
        connection."""
        self._disposing = True
        try:
            await self._flush_before_dispose()
        finally:
            self._disposing = False
        await self.engine.dispose()

    async def _flush_before_dispose(self) -> None:
        if self._soon_timer is not None:
            self._soon_timer.cancel()
            self._soon_timer = None
        flushing, self._soon_flushing = self._soon_flushing, None
        if flushing is not None:
            flushing.cancel()
            await asyncio.wait([flushing])  # what it raised is its own (it logs); ours passes
        if self._soon or self._soon_alone:
            try:
                await self.flush_soon()
            except StoreError as exc:
                log.warning(
                    "store.soon_writes_lost",
                    writes=len(self._soon) + len(self._soon_alone),
                    error=str(exc),
                )
