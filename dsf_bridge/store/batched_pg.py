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
at once. Its parameters are bound on the client (psycopg's client-side binding, as Django uses
by default) and it is held, with the transaction's ``BEGIN``, until the next statement whose
answer is read, or the commit: those go to the server as one query (PostgreSQL's simple query
protocol runs several statements in one message) and the answer of the last is the answer.
A step with no read in it is one round trip, ``COMMIT`` included; a transaction that wrote
nothing sends nothing at all.

What it trades:
- An error in a held write (a constraint, a lost connection) is raised by the statement or the
  commit that sends it, not by the write itself; the transaction fails just the same and is
  rolled back. The bridge does not catch errors of single statements.
- A held write is parsed and planned by the server each time (no prepared statement): a few
  tens of microseconds of the server's CPU against a round trip of the bridge's.
- The psycopg connection is in autocommit mode; this dialect sends ``BEGIN``, ``COMMIT`` and
  ``ROLLBACK`` itself, as the transaction's first and last statements.

Outside a transaction (:meth:`dsf_bridge.store.database.Database.autocommit`) every statement
is sent at once, as before. The admin API's read-only store, migrations and the command line
keep SQLAlchemy's own drivers.
"""

from __future__ import annotations

from collections import deque
from typing import Any, cast

import psycopg
from psycopg.pq import ExecStatus, TransactionStatus
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.postgresql.psycopg import (
    AsyncAdapt_psycopg_connection,
    AsyncAdapt_psycopg_cursor,
    PGDialectAsync_psycopg,
    PsycopgAdaptDBAPI,
)
from sqlalchemy.util.concurrency import await_

__all__ = ["DRIVER", "UNREAD", "BatchedConnection", "BatchedCursor", "PGDialectAsync_batched"]

DRIVER = "dsfbatch"
# Execution option of an UPDATE or DELETE whose row count the caller does not read: in a
# transaction it is held with the other writes (its result's rowcount is then -1).
UNREAD = "unread_rowcount"


async def _ready() -> None:
    return None


class BatchedCursor(AsyncAdapt_psycopg_cursor):
    """A cursor that sends the connection's held statements before its own, in one query."""

    __slots__ = ()

    _adapt_connection: BatchedConnection

    async def _execute_async(self, operation: Any, parameters: Any) -> Any:
        connection = self._adapt_connection
        if not connection.held:
            return await super()._execute_async(operation, parameters)  # type: ignore[no-untyped-call]
        query = connection.take_held(connection.bind(operation, parameters))
        cursor = cast("psycopg.AsyncCursor[Any]", self._cursor)
        # Never prepared: the literal values differ from one transaction to the next, and a
        # query of several statements cannot be prepared.
        result = await cursor.execute(query, prepare=False)
        while cursor.nextset():  # the answer of the last statement, the caller's own
            pass
        status = cursor.pgresult.status if cursor.pgresult is not None else None
        if status == ExecStatus.TUPLES_OK:
            self._rows = deque(await cursor.fetchall())
        return result

    async def _executemany_async(self, operation: Any, seq_of_parameters: Any) -> Any:
        connection = self._adapt_connection
        if connection.held:  # the BEGIN (and writes) first: the rows belong to the transaction
            statements, connection.held = connection.held, []
            await self._cursor.execute(";\n".join(statements), prepare=False)  # type: ignore[call-arg]
        return await super()._executemany_async(operation, seq_of_parameters)  # type: ignore[no-untyped-call]

    def hold(self, operation: Any, parameters: Any) -> None:
        """Keep the write for the next statement that is read, or for the commit."""
        try:
            self._adapt_connection.held.append(self._adapt_connection.bind(operation, parameters))
        except Exception as error:  # a value that cannot be bound, as execute would raise
            self._adapt_connection._handle_exception(error)
        # SQLAlchemy's asyncio connection refuses an execution that awaited nothing.
        await_(_ready())

    def hold_many(self, operation: Any, seq_of_parameters: Any) -> None:
        for parameters in seq_of_parameters:
            self.hold(operation, parameters)


class BatchedConnection(AsyncAdapt_psycopg_connection):
    """psycopg's asyncio connection, always in autocommit mode, with the transaction's ``BEGIN``
    and its writes held until something reads (see the module's description)."""

    __slots__ = ("_begin", "_binder", "_in_autocommit", "held")

    _cursor_cls = BatchedCursor

    def __init__(self, dbapi: Any, connection: Any) -> None:
        super().__init__(dbapi, connection)
        # What SQLAlchemy asked for: AUTOCOMMIT (Database.autocommit) or transactions.
        self._in_autocommit = False
        # BEGIN and the writes of this transaction that the server has not seen yet.
        self.held: list[str] = []
        self._begin = "BEGIN"
        self._binder = psycopg.AsyncClientCursor(connection)

    def cursor(self, name: Any = None, /) -> Any:
        if name:  # a server-side cursor (streamed results): it needs the transaction begun
            self.flush()
            return super().cursor(name)  # type: ignore[no-untyped-call]
        return BatchedCursor(self)

    def flush(self) -> None:
        """Send what is held (the ``BEGIN`` and writes), without a statement of the caller's."""
        if self.held:
            statements, self.held = self.held, []
            self._send(";\n".join(statements))

    # SQLAlchemy's autocommit switch: kept here, the psycopg connection stays in autocommit.
    @property
    def autocommit(self) -> bool:
        return self._in_autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self.set_autocommit(value)

    def set_autocommit(self, value: bool) -> None:
        self._in_autocommit = bool(value)

    def bind(self, operation: Any, parameters: Any) -> str:
        """The statement with its parameters bound on the client, as one SQL text."""
        if parameters is None:
            return str(operation)
        return self._binder.mogrify(operation, parameters)

    def take_held(self, last: str) -> str:
        statements = self.held
        self.held = []
        statements.append(last)
        return ";\n".join(statements)

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction was begun (held or sent) that has not ended."""
        return bool(self.held) or (
            self._connection.info.transaction_status != TransactionStatus.IDLE
        )

    def begin(self) -> None:
        """Begin a transaction: its ``BEGIN`` goes with its first statement that is sent."""
        if self._in_autocommit or self.in_transaction:
            return
        # isolation level, read only and deferrable as psycopg would begin it
        self._begin = self._connection._get_tx_start_command().decode()
        self.held = [self._begin]

    def commit(self) -> None:
        if self.held == [self._begin]:  # only the BEGIN: the server never saw this transaction
            self.held = []
            return
        if self.held:
            self._send(self.take_held("COMMIT"))
        elif self._connection.info.transaction_status != TransactionStatus.IDLE:
            self._send("COMMIT")

    def rollback(self) -> None:
        self.held = []
        if self._connection.info.transaction_status != TransactionStatus.IDLE:
            self._send("ROLLBACK")

    def _send(self, query: str) -> None:
        try:
            await_(self._connection.execute(query, prepare=False))
        except Exception as error:
            self._handle_exception(error)


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

    @classmethod
    def import_dbapi(cls) -> Any:
        return _BatchedDBAPI(psycopg, ExecStatus)

    @classmethod
    def get_async_dialect_cls(cls, url: Any) -> Any:
        return cls  # not the psycopg dialect's own asyncio variant

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
