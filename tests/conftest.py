"""Shared fixtures: real SQLite files and real PostgreSQL databases, one fresh store per test.

A migrated store is a copy of one migrated once per session (a file copy on SQLite, ``CREATE
DATABASE ... TEMPLATE`` on PostgreSQL): running the migrations for each of about a thousand
tests cost several minutes of CI, and ``tests/store/test_migrations.py`` runs them on empty
databases of its own. Empty databases (``db_url``) stay empty.

PostgreSQL comes from ``DSF_BRIDGE_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``, an account allowed to create databases).
Each test that asks for it gets its own database, dropped afterwards. When the server is not
reachable the tests fail, saying how to start it: the README promises PostgreSQL support, so it
is never skipped.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import psycopg
import pytest
from hypothesis import settings
from psycopg import sql
from sqlalchemy.engine import make_url

from dsf_bridge.store import Database, upgrade

# The real components' session fixtures, registered once here: a second conftest importing
# them would make a second fixture of the same name, and start the component twice.
from tests.components import kserve, mlserver, orthanc

__all__ = ["kserve", "mlserver", "orthanc"]

# Hypothesis: under CI=true the examples are derived from each test's name (the same ones on
# every run) and no example database is read or written; elsewhere they are random, and the
# failing ones are kept in .hypothesis/ and tried first next time.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "default")

POSTGRES_URL = os.environ.get(
    "DSF_BRIDGE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
POSTGRES_HINT = (
    "PostgreSQL is not reachable at {url}: start it with "
    "'pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start' "
    "(install: apt-get install postgresql), or point DSF_BRIDGE_TEST_POSTGRES_URL at a server "
    "where the user may create databases"
)


def _admin_conninfo() -> str:
    return make_url(POSTGRES_URL).set(drivername="postgresql").render_as_string(False)


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The admin URL of a reachable PostgreSQL server, or a failure saying how to get one."""
    try:
        with psycopg.connect(_admin_conninfo(), connect_timeout=5) as connection:
            connection.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        pytest.fail(f"{POSTGRES_HINT.format(url=POSTGRES_URL)} ({exc})")
    return POSTGRES_URL


def _postgres_database(server_url: str, template: str | None = None) -> Iterator[str]:
    """A new PostgreSQL database (a copy of ``template`` if given), dropped afterwards."""
    name = f"dsfb_test_{uuid.uuid4().hex[:16]}"
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        create = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)
        )
    with psycopg.connect(_admin_conninfo(), autocommit=True) as connection:
        connection.execute(create)
    try:
        yield make_url(server_url).set(database=name).render_as_string(False)
    finally:
        with psycopg.connect(_admin_conninfo(), autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    yield from _postgres_database(postgres_server)


@pytest.fixture(scope="session")
def postgres_template(postgres_server: str) -> Iterator[str]:
    """The name of a PostgreSQL database migrated to the newest revision once per session;
    nothing connects to it after the migration (``CREATE DATABASE ... TEMPLATE`` needs that)."""
    for url in _postgres_database(postgres_server):
        upgrade(url)
        name = make_url(url).database
        assert name is not None
        yield name


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to the newest revision once per session, never opened again
    (its engine is disposed: no write-ahead log is left beside it)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "bridge.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'bridge.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """An empty database of each supported kind."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture
def migrated_sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    """A SQLite store at the newest revision, copied from the session's template."""
    path = tmp_path / "bridge.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def migrated_postgres_url(postgres_server: str, postgres_template: str) -> Iterator[str]:
    """A PostgreSQL store at the newest revision, copied from the session's template."""
    yield from _postgres_database(postgres_server, template=postgres_template)


@pytest.fixture(params=["sqlite", "postgresql"])
def migrated_url(request: pytest.FixtureRequest) -> str:
    """A database of each kind, migrated to the newest revision."""
    fixture = "migrated_sqlite_url" if request.param == "sqlite" else "migrated_postgres_url"
    url: str = request.getfixturevalue(fixture)
    return url


async def _opened(url: str) -> AsyncIterator[Database]:
    db = Database(url)
    try:
        yield db
    finally:
        await db.dispose()


@pytest.fixture
async def sqlite_database(migrated_sqlite_url: str) -> AsyncIterator[Database]:
    """A migrated SQLite store alone, for tests about SQLite or that need only one kind."""
    async for db in _opened(migrated_sqlite_url):
        yield db


@pytest.fixture
async def postgres_database(postgres_url: str) -> AsyncIterator[Database]:
    """A migrated PostgreSQL store alone, for tests about PostgreSQL (row locks, replicas).

    Migrated in place, not copied: its tests also ask for ``postgres_url`` and must get the
    same database (a handful of tests; ``sqlite_database`` copies to ``sqlite_url``'s path)."""
    upgrade(postgres_url)
    async for db in _opened(postgres_url):
        yield db


@pytest.fixture
async def database(migrated_url: str) -> AsyncIterator[Database]:
    db = Database(migrated_url)
    try:
        yield db
    finally:
        await db.dispose()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under ``CI=true`` a skipped test fails: CI must run everything the README promises."""
    report: pytest.TestReport = yield
    ci = os.environ.get("CI") == "true"
    if ci and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which is not allowed: {report.longrepr}"
    return report


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="long fault and load runs (the crash test: more requests, kills and seeds); "
        "never under CI",
    )
