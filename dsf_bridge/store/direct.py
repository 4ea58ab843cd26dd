"""The hot path's statements run straight on the driver's connection.

Through a session, SQLAlchemy spends about 0.1 ms of CPU on one prebuilt Core statement before
the driver sees it (the session's bookkeeping, the statement's cache key, an execution context,
a result object), and a statement alone through :meth:`Database.autocommit` about 0.4 ms more
(a connection, a session and its transaction made and ended for it). A Task's intake, start and
completion run a handful of such statements each, at every Task.

A :class:`Prepared` statement is compiled once per dialect; its values are bound by SQLAlchemy's
own type processors, in SQLAlchemy's own order, so that what reaches the driver is what
``session.execute`` would have sent. :func:`execute` runs it in a
:meth:`~dsf_bridge.store.database.Database.transaction`, on that transaction's connection (on
PostgreSQL a write nobody reads is held with the others, :mod:`dsf_bridge.store.batched_pg`);
:meth:`~dsf_bridge.store.database.Database.run` runs it alone, committed on its own. Elsewhere
(a session of another kind) :func:`execute` hands the statement to the session.

Errors are SQLAlchemy's (``IntegrityError``, ``OperationalError``, ...), raised from the
driver's, and a value a column's type refuses is a ``StatementError`` as through a session, so
that the store's mapping to :class:`~dsf_bridge.errors.StoreError` and
:func:`~dsf_bridge.store.database.on_conflict` apply unchanged. The engine's
``before_cursor_execute`` listeners see each statement (without a connection, cursor or
context, and what they return is not used); ``after_cursor_execute`` and the engine's ``echo``
do not.

Values for parameters the statement does not have are refused (a session would add a column
to an ``INSERT`` for them). What a prepared statement may not have, refused when it is first
compiled: values SQLAlchemy
computes at execution (Python-side column defaults: give every column), the new row's key
returned unasked (build an ``INSERT`` with ``.inline()``), expanding ``IN`` parameters, and
returned columns whose type converts the driver's value (SQLite's JSON, say; psycopg converts
PostgreSQL's itself).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from psycopg.pq import ExecStatus
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.sql import Executable
from sqlalchemy.sql.compiler import SQLCompiler

from dsf_bridge.store import batched_pg

__all__ = ["DirectResult", "Prepared", "as_sqlalchemy", "bind", "run_many_on", "run_on"]


@dataclass(frozen=True, slots=True)
class DirectResult:
    """What a statement answered: its returned rows (none without ``RETURNING``) and the
    number of rows it changed (-1 for a write held for later, which nobody reads)."""

    rows: list[tuple[Any, ...]]
    rowcount: int

    def first(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows else None


@dataclass(frozen=True, slots=True)
class _Compiled:
    compiled: SQLCompiler
    sql: str
    processors: Mapping[str, Callable[[Any], Any]]
    positions: Sequence[str] | None  # the bind names in order, for a positional driver
    escaped: Mapping[str, str]  # bind names the driver sees spelt otherwise
    names: frozenset[str]  # the bind names
    returns: bool
    unread: bool  # a write whose answer nobody reads: held in a PostgreSQL transaction


class Prepared:
    """A Core statement (or one per dialect: ``build(dialect_name)``) for :func:`execute` and
    :meth:`~dsf_bridge.store.database.Database.run`. An ``UPDATE`` or ``DELETE`` whose row
    count nobody reads says so with the execution option
    :data:`~dsf_bridge.store.batched_pg.UNREAD`, as for a session (an ``INSERT`` without
    ``RETURNING`` is unread anyway)."""

    __slots__ = ("_build", "_by_dialect", "_many")

    def __init__(self, statement: Executable | Callable[[str], Executable]) -> None:
        self._build: Callable[[str], Executable] = (
            statement if callable(statement) else (lambda _name: statement)
        )
        self._by_dialect: dict[tuple[type[Dialect], Any], _Compiled] = {}
        self._many: dict[tuple[int, int], str] = {}  # (id of a compiled form, rows): its SQL

    def statement(self, dialect: str) -> Executable:
        """The Core statement for ``dialect`` (a name such as ``postgresql``)."""
        return self._build(dialect)

    def compiled(self, dialect: Dialect) -> _Compiled:
        key = (type(dialect), dialect.server_version_info)
        found = self._by_dialect.get(key)
        if found is None:
            found = self._by_dialect[key] = self._compile(dialect)
        return found

    def _compile(self, dialect: Dialect) -> _Compiled:
        statement: Any = self.statement(dialect.name)
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)  # noqa: S101 - a Core statement compiles so
        if compiled.insert_prefetch or compiled.update_prefetch:
            names = [
                column.name for column in (*compiled.insert_prefetch, *compiled.update_prefetch)
            ]
            raise TypeError(f"a prepared statement must give every column; defaults for {names}")
        if compiled.implicit_returning:
            # SQLAlchemy's own RETURNING of the new key, which nobody here reads: it would turn
            # a write into a read (on PostgreSQL a round trip of its own).
            raise TypeError("a prepared INSERT returns nothing unasked: build it with .inline()")
        if compiled.literal_execute_params or compiled.post_compile_params:
            raise TypeError("a prepared statement cannot expand parameters")
        for column in compiled._result_columns:
            if column.type._cached_result_processor(dialect, None) is not None:
                raise TypeError(
                    f"a prepared statement cannot return {column.name}: its type converts"
                )
        returns = bool(compiled._result_columns)
        unread = not returns and (
            bool(compiled.isinsert)
            or bool(statement.get_execution_options().get(batched_pg.UNREAD))
        )
        return _Compiled(
            compiled=compiled,
            sql=compiled.string,
            processors=cast("dict[str, Callable[[Any], Any]]", dict(compiled._bind_processors)),
            positions=tuple(compiled.positiontup or ()) if compiled.positional else None,
            escaped=dict(compiled.escaped_bind_names or {}),
            names=frozenset(compiled.binds),
            returns=returns,
            unread=unread,
        )


def bind(compiled: _Compiled, values: Mapping[str, Any]) -> Any:
    """``values`` as the driver takes them: as SQLAlchemy's execution context binds them."""
    params = compiled.compiled.construct_params(dict(values), escape_names=False)
    processors = compiled.processors
    if compiled.positions is not None:
        return tuple(
            processors[name](params[name]) if name in processors else params[name]
            for name in compiled.positions
        )
    escaped = compiled.escaped
    return {
        escaped.get(name, name): (processors[name](value) if name in processors else value)
        for name, value in params.items()
    }


def as_sqlalchemy(
    error: Any, dialect: Dialect, sql: str | None, params: Any, connection: Any = None
) -> StatementError:
    """The driver's ``error`` as SQLAlchemy raises it (``IntegrityError``,
    ``OperationalError``, ...), marked so when it says ``connection`` is lost."""
    wrapped: StatementError = DBAPIError.instance(
        sql,
        params,
        error,
        dialect.loaded_dbapi.Error,
        connection_invalidated=(
            connection is not None and dialect.is_disconnect(error, connection, None)
        ),
        dialect=dialect,
    )
    return wrapped


def _announce(engine: Engine, sql: str, params: Any, *, many: bool) -> None:
    """Tell the engine's ``before_cursor_execute`` listeners, as SQLAlchemy would (without a
    connection, cursor or context)."""
    for listener in engine.dispatch.before_cursor_execute:
        listener(None, None, sql, params, None, many)


async def run_on(
    dbapi_connection: Any,
    engine: Engine,
    prepared: Prepared,
    values: Mapping[str, Any],
    *,
    in_transaction: bool,
) -> DirectResult:
    """Run ``prepared`` with ``values`` on a pooled DBAPI connection of ``engine``
    (SQLAlchemy's adapted one: :class:`~dsf_bridge.store.batched_pg.BatchedConnection` or
    :class:`~dsf_bridge.store.inline_sqlite.InlineConnection`). ``in_transaction``: the
    connection is in a transaction SQLAlchemy began, where a PostgreSQL write nobody reads is
    held; otherwise the statement commits on its own. The engine's ``before_cursor_execute``
    listeners see it as they see SQLAlchemy's own statements (without a connection, cursor
    or context)."""
    dialect = engine.dialect
    compiled = prepared.compiled(dialect)
    params = _bound(compiled, values)
    _announce(engine, compiled.sql, params, many=False)
    try:
        if dialect.name == "postgresql":
            return await _run_postgresql(dbapi_connection, compiled, params, in_transaction)
        cursor = dbapi_connection.driver_connection.execute(compiled.sql, params)
        rows = cursor.fetchall() if compiled.returns else []
        return DirectResult(rows, cursor.rowcount)
    except dialect.loaded_dbapi.Error as error:
        raise as_sqlalchemy(error, dialect, compiled.sql, params, dbapi_connection) from error


# Rows of one INSERT on PostgreSQL at most; fewer when a row has many parameters (the
# protocol takes 65,535 in a statement). More go as several statements.
_MANY_ROWS = 1000
_MAX_PARAMETERS = 65_535
# A named parameter, or an escaped percent sign (kept as it is).
_NAMED = re.compile(r"%%|%\(([^)]+)\)s")


def _renamed(values: str, k: int) -> str:
    """A group of values with its parameters named as row ``k``'s."""
    return _NAMED.sub(
        lambda found: found.group(0) if found.group(1) is None else f"%({found.group(1)}__{k})s",
        values,
    )


def _one_group_of_values(sql: str) -> bool:
    """Whether ``sql`` is ``INSERT ... VALUES (...)`` and nothing after the group (no
    ``ON CONFLICT``, ``RETURNING``), without parameters before it (a CTE's)."""
    head, found, values = sql.partition(" VALUES (")
    if not found or "%(" in head or "?" in head:
        return False
    depth = 1
    for position, character in enumerate(values):
        depth += {"(": 1, ")": -1}.get(character, 0)
        if depth == 0:
            return position == len(values) - 1
    return False


def _rows_sql(prepared: Prepared, compiled: _Compiled, count: int) -> str:
    """``compiled``'s single-row ``INSERT ... VALUES (...)`` with ``count`` groups of values,
    the parameters of row ``k`` named ``name__k``: one statement for the server to run."""
    key = (id(compiled), count)
    found = prepared._many.get(key)
    if found is None:
        head, values = compiled.sql.split(" VALUES ", 1)
        groups = (_renamed(values, k) for k in range(count))
        found = f"{head} VALUES {', '.join(groups)}"
        if count <= 64:  # the counts a transaction gives: a handful of audit events
            prepared._many[key] = found
    return found


async def run_many_on(
    dbapi_connection: Any,
    engine: Engine,
    prepared: Prepared,
    rows: Sequence[Mapping[str, Any]],
) -> None:
    """Run an ``INSERT`` that returns nothing with each of ``rows``, in the transaction
    SQLAlchemy began on ``dbapi_connection``: on PostgreSQL as one statement of several
    ``VALUES`` (held with the transaction's other writes), on SQLite as sqlite3's
    ``executemany``. The rows are written in the order given."""
    dialect = engine.dialect
    compiled = prepared.compiled(dialect)
    if not (compiled.unread and compiled.compiled.isinsert and _one_group_of_values(compiled.sql)):
        raise TypeError(
            f"only a plain INSERT that returns nothing takes several rows: {compiled.sql}"
        )
    bound = [_bound(compiled, row) for row in rows]
    try:
        if dialect.name != "postgresql":
            _announce(engine, compiled.sql, bound, many=True)
            dbapi_connection.driver_connection.executemany(compiled.sql, bound)
            return
        if not dbapi_connection.in_transaction:  # the chunks would commit one by one
            raise TypeError("several rows are written in a transaction only")
        size = max(1, min(_MANY_ROWS, _MAX_PARAMETERS // max(1, len(compiled.names))))
        for start in range(0, len(bound), size):
            chunk = bound[start : start + size]
            sql = _rows_sql(prepared, compiled, len(chunk))
            params = {
                f"{name}__{k}": value for k, row in enumerate(chunk) for name, value in row.items()
            }
            _announce(engine, sql, params, many=False)
            dbapi_connection.hold(sql, params)
    except dialect.loaded_dbapi.Error as error:
        raise as_sqlalchemy(error, dialect, compiled.sql, bound, dbapi_connection) from error


def _bound(compiled: _Compiled, values: Mapping[str, Any]) -> Any:
    """:func:`bind`, with the checks and errors of :func:`run_on`."""
    unknown = values.keys() - compiled.names
    if unknown:  # the caller's values do not fit the statement: a bug, not a store error
        raise TypeError(f"the statement has no parameters {sorted(unknown)}: {compiled.sql}")
    try:
        return bind(compiled, values)
    except Exception as error:  # a value a column's type refuses, as a session reports it
        raise StatementError(str(error), compiled.sql, values, error) from error


async def _run_postgresql(
    connection: batched_pg.BatchedConnection, compiled: _Compiled, params: Any, in_transaction: bool
) -> DirectResult:
    if in_transaction and compiled.unread and connection.in_transaction:
        connection.hold(compiled.sql, params)
        return DirectResult([], -1)
    cursor = connection.driver_connection.cursor()
    held = connection.take_held() if connection.in_transaction else []
    if held:
        await connection.send(held, cursor, compiled.sql, params)
    else:
        await cursor.execute(compiled.sql, params)
    result = cursor.pgresult
    rows = (
        await cursor.fetchall()
        if result is not None and result.status == ExecStatus.TUPLES_OK
        else []
    )
    return DirectResult(rows, cursor.rowcount)
