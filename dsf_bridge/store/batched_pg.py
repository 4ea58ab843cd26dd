"""PostgreSQL for the asyncio engine with writes held to the next read: ``postgresql+dsfbatch``.

Through SQLAlchemy's ``psycopg`` asyncio driver every statement of a transaction is a round trip
to the server, and so are the ``BEGIN`` psycopg sends before the first one and the ``COMMIT``:
a step that inserts an instance, links its Task, writes an outbox entry and two audit events
waited for seven answers, each costing a turn of the event loop and about a tenth of a
millisecond of CPU in the driver's asyncio path. Nothing in such a step reads what the writes
answer: SQLAlchemy only reads their row counts, which the bridge does not look at.

This dialect is SQLAlchemy's ``psycopg`` asyncio dialect with one change: in a transaction, a
write whose answer nobody reads (an ``INSERT`` without ``RETURNING``, or an ``UPDATE`` or
``DELETE`` run with the execution option ``unread_rowcount``, see :data:`UNREAD`) is not sent
at once. It is held, with the transaction's ``BEGIN``, until the next statement whose answer is
read, or the commit; those go to the server together in psycopg's pipeline mode (one write to
the socket, one wait for the answers), each with its parameters bound by the server as before,
so that an error the server logs never shows a value. A step with no read in it is one round
trip, ``COMMIT`` included; a transaction that ran no statement sends nothing at all.

What it trades:
- An error in a held write (a constraint) is raised by the statement or the commit that sends
  it, not by the write itself; the error names the held statements (their SQL, not their
  values) in a note. The transaction fails just the same and is rolled back. The bridge does
  not catch errors of single statements.
- The psycopg connection is in autocommit mode; this dialect sends ``BEGIN``, ``COMMIT`` and
  ``ROLLBACK`` itself, as the transaction's first and last statements. SQL that an engine's
  ``begin`` event listener runs would run before that ``BEGIN``, outside the transaction:
  :class:`~dsf_bridge.store.database.Database` attaches none to this driver (its read-only
  stores keep SQLAlchemy's own, see ``_prepare``).

Outside a transaction (:meth:`dsf_bridge.store.database.Database.autocommit`) every statement
is sent at once, as before. The bridge's stores use it (the service, the command line's
writing commands, the admin API's operator actions); the admin API's read-only store and
migrations keep SQLAlchemy's own psycopg driver.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, cast

import psycopg
from psycopg.pq import ExecStatus, TransactionStatus
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.dialects.postgresql.psycopg import (
    AsyncAdapt_psycopg_connection,
    AsyncAdapt_psycopg_cursor,
    PGDialectAsync_psycopg,
    PsycopgAdaptDBAPI,
)
from sqlalchemy.util.concurrency import await_

from dsf_bridge.store.inline_sqlite import as_awaited

__all__ = ["DRIVER", "UNREAD", "BatchedConnection", "BatchedCursor", "PGDialectAsync_batched"]

DRIVER = "dsfbatch"
# Execution option of an UPDATE or DELETE whose row count the caller does not read: in a
# transaction it is held with the other writes (its result's rowcount is then -1).
UNREAD = "unread_rowcount"

# A statement held for later: its SQL and its parameters, as the cursor was given them.
Held = tuple[str, Any]


class _PipelineAbortedNoise(logging.Filter):
    """psycopg warns when it leaves a pipeline that a failed statement aborted; the failure
    itself is raised to the caller, so the warning only repeats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        pipeline = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (
            str(record.msg).startswith("error ignored terminating")
            and isinstance(pipeline, psycopg.AsyncPipeline)
        )


logging.getLogger("psycopg").addFilter(_PipelineAbortedNoise())


class BatchedCursor(AsyncAdapt_psycopg_cursor):
    """A cursor that sends the connection's held statements before its own, in one pipeline."""

    __slots__ = ()

    _adapt_connection: BatchedConnection

    async def _execute_async(self, operation: Any, parameters: Any) -> Any:
        connection = self._adapt_connection
        held = connection.take_held()
        if not held:
            return await super()._execute_async(operation, parameters)  # type: ignore[no-untyped-call]
        cursor = cast("psycopg.AsyncCursor[Any]", self._cursor)
        await connection.send(held, cursor, operation, parameters)
        result = cursor.pgresult
        if result is not None and result.status == ExecStatus.TUPLES_OK:
            self._rows = deque(await cursor.fetchall())
        return cursor

    async def _executemany_async(self, operation: Any, seq_of_parameters: Any) -> Any:
        # The BEGIN (and writes) first: the rows belong to the transaction.
        await self._adapt_connection.send_held()
        return await super()._executemany_async(operation, seq_of_parameters)  # type: ignore[no-untyped-call]

    def hold(self, operation: Any, parameters: Any) -> None:
        """Keep the write for the next statement that is read, or for the commit."""
        self._adapt_connection.hold(operation, parameters)
        as_awaited()  # SQLAlchemy's asyncio connection refuses an execution that awaited nothing

    def hold_many(self, operation: Any, seq_of_parameters: Any) -> None:
        for parameters in seq_of_parameters:
            self.hold(operation, parameters)


class BatchedConnection(AsyncAdapt_psycopg_connection):
    """psycopg's asyncio connection, always in autocommit mode, with the transaction's ``BEGIN``
    and its writes held until something reads (see the module's description)."""

    __slots__ = ("_begin", "_in_autocommit", "held", "in_transaction")

    _cursor_cls = BatchedCursor

    def __init__(self, dbapi: Any, connection: Any) -> None:
        super().__init__(dbapi, connection)
        # What SQLAlchemy asked for: AUTOCOMMIT (Database.autocommit) or transactions.
        self._in_autocommit = False
        # Whether SQLAlchemy began a transaction (held or sent) that it has not ended yet.
        self.in_transaction = False
        self._begin = "BEGIN"
        # The BEGIN and the writes of this transaction that the server has not seen yet.
        self.held: list[Held] = []

    @property
    def _psycopg(self) -> psycopg.AsyncConnection[Any]:
        return cast("psycopg.AsyncConnection[Any]", self._connection)

    def cursor(self, name: Any = None, /) -> Any:
        if name:  # a server-side cursor (streamed results): it needs the transaction begun
            self._run(self.send_held())
            return super().cursor(name)  # type: ignore[no-untyped-call]
        return BatchedCursor(self)

    # SQLAlchemy's autocommit switch: kept here, the psycopg connection stays in autocommit.
    @property
    def autocommit(self) -> bool:
        return self._in_autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self.set_autocommit(value)

    def set_autocommit(self, value: bool) -> None:
        self._in_autocommit = bool(value)

    def _server_idle(self) -> bool:
        return self._psycopg.info.transaction_status == TransactionStatus.IDLE

    def begin(self) -> None:
        """Begin a transaction: its ``BEGIN`` goes with its first statement that is sent."""
        if self._in_autocommit or self.in_transaction:
            return
        self.in_transaction = True
        # isolation level, read only and deferrable as psycopg would begin it
        self._begin = self._psycopg._get_tx_start_command().decode()
        self.held = [(self._begin, None)]

    def hold(self, operation: str, parameters: Any) -> None:
        self._resume()
        self.held.append((operation, parameters))

    def _resume(self) -> None:
        # A transaction the server ended under SQLAlchemy (psycopg's get_isolation_level rolls
        # back): begun again before the next statement, as psycopg begins one implicitly.
        if self.in_transaction and not self.held and self._server_idle():
            self.held = [(self._begin, None)]

    def take_held(self) -> list[Held]:
        """The statements held, now to be sent (the list is emptied)."""
        self._resume()
        held, self.held = self.held, []
        return held

    async def send_held(self) -> None:
        """Send what is held (the ``BEGIN`` and writes) without a statement of the caller's."""
        held = self.take_held()
        if held:
            await self.send(held)

    async def send(
        self,
        held: list[Held],
        cursor: psycopg.AsyncCursor[Any] | None = None,
        operation: Any = None,
        parameters: Any = None,
    ) -> None:
        """Send ``held``, then ``operation`` on ``cursor`` if given, in one pipeline: one write
        to the socket and one wait for all answers. The first error is raised, with a note
        naming the held statements."""
        connection = self._psycopg
        try:
            async with connection.pipeline():
                for statement, values in held:
                    control = values is None and statement in (self._begin, "COMMIT")
                    await connection.execute(statement, values, prepare=False if control else None)
                if cursor is not None:
                    await cursor.execute(operation, parameters)
        except psycopg.Error as error:
            statements = "; ".join(" ".join(statement.split())[:200] for statement, _ in held)
            error.add_note(f"sent together with the statements held before it: {statements}")
            raise

    def _run(self, awaitable: Any) -> None:
        try:
            await_(awaitable)
        except Exception as error:
            self._handle_exception(error)

    def commit(self) -> None:
        held = self.take_held() if self.in_transaction else []
        self.in_transaction = False
        if held == [(self._begin, None)]:  # only the BEGIN: the server never saw it
            return
        if self._psycopg.info.transaction_status == TransactionStatus.INERROR:
            # A held write failed and its error was caught (it surfaced at a later statement):
            # PostgreSQL would answer this COMMIT with a ROLLBACK, and no error.
            self._handle_exception(
                psycopg.errors.InFailedSqlTransaction(
                    "the transaction failed at an earlier statement; it cannot commit"
                )
            )
        if held:
            self._run(self.send([*held, ("COMMIT", None)]))
        elif not self._server_idle():
            self._run(self._psycopg.execute("COMMIT", prepare=False))

    def rollback(self) -> None:
        self.held = []
        self.in_transaction = False
        if not self._server_idle():
            # psycopg's own: it also forgets the statements it prepared, which the server may
            # have skipped (a pipeline that an earlier statement aborted).
            self._run(self._psycopg.rollback())


class _BatchedDBAPI(PsycopgAdaptDBAPI):
    def connect(self, *arg: Any, **kw: Any) -> Any:
        creator = kw.pop("async_creator_fn", self.psycopg.AsyncConnection.connect)
        kw["autocommit"] = True
        return await_(BatchedConnection.create(self, creator(*arg, **kw)))


def _unread(context: Any) -> bool:
    """Whether nothing reads what the statement answers: a write without ``RETURNING``
    (an ``UPDATE`` or ``DELETE`` only when its caller said so with :data:`UNREAD`)."""
    if context is None or context.compiled is None:
        return False
    if context.isinsert:
        return not context.compiled.effective_returning
    if context.isupdate or context.isdelete:
        return bool(context.execution_options.get(UNREAD)) and not (
            context.compiled.effective_returning
        )
    return False


class PGDialectAsync_batched(PGDialectAsync_psycopg):  # noqa: N801 - SQLAlchemy's naming
    """SQLAlchemy's psycopg asyncio dialect whose transactions hold their writes."""

    driver = DRIVER
    supports_statement_cache = True
    # Rows given together for an INSERT that returns nothing (the audit events a transaction
    # appends, at_commit) as one statement of several VALUES, as for psycopg2: one statement
    # for the server to run instead of one per row.
    use_insertmanyvalues_wo_returning = True

    @classmethod
    def import_dbapi(cls) -> Any:
        return _BatchedDBAPI(psycopg, ExecStatus)

    @classmethod
    def get_async_dialect_cls(cls, url: Any) -> Any:
        return cls  # not the psycopg dialect's own asyncio variant

    def get_isolation_level(self, dbapi_connection: Any) -> Any:
        """The level SQLAlchemy set, or the server's default: psycopg's own asks the server
        and rolls back, which would end a transaction begun here (the connection is in
        autocommit mode on the server's side)."""
        if dbapi_connection.autocommit:
            return "AUTOCOMMIT"
        level = dbapi_connection.driver_connection.isolation_level
        if level is not None:
            return level.name.replace("_", " ")
        return PGDialect.get_isolation_level(self, dbapi_connection)  # type: ignore[no-untyped-call]

    def do_begin(self, dbapi_connection: Any) -> None:
        dbapi_connection.begin()

    def do_execute(self, cursor: Any, statement: Any, parameters: Any, context: Any = None) -> None:
        if _unread(context) and cursor._adapt_connection.in_transaction:
            cursor.hold(statement, parameters)
        else:
            cursor.execute(statement, parameters)

    def do_executemany(
        self, cursor: Any, statement: Any, parameters: Any, context: Any = None
    ) -> None:
        if _unread(context) and cursor._adapt_connection.in_transaction:
            cursor.hold_many(statement, parameters)
        else:
            cursor.executemany(statement, parameters)


registry.register(f"postgresql.{DRIVER}", __name__, "PGDialectAsync_batched")
