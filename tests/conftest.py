"""Shared fixtures: real SQLite files and real PostgreSQL databases, one fresh store per test.

PostgreSQL comes from ``DSF_BRIDGE_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``, an account allowed to create databases).
Each test that asks for it gets its own database, dropped afterwards. When the server is not
reachable the tests fail, saying how to start it: the README promises PostgreSQL support, so it
is never skipped.
"""

from __future__ import annotations

import os
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


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    name = f"dsfb_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(_admin_conninfo(), autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(postgres_server).set(database=name).render_as_string(False)
    finally:
        with psycopg.connect(_admin_conninfo(), autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


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
def migrated_url(db_url: str) -> str:
    """A database of each kind, migrated to the newest revision."""
    upgrade(db_url)
    return db_url


async def _migrated(url: str) -> AsyncIterator[Database]:
    upgrade(url)
    db = Database(url)
    try:
        yield db
    finally:
        await db.dispose()


@pytest.fixture
async def sqlite_database(sqlite_url: str) -> AsyncIterator[Database]:
    """A migrated SQLite store alone, for tests about SQLite or that need only one kind."""
    async for db in _migrated(sqlite_url):
        yield db


@pytest.fixture
async def postgres_database(postgres_url: str) -> AsyncIterator[Database]:
    """A migrated PostgreSQL store alone, for tests about PostgreSQL (row locks, replicas)."""
    async for db in _migrated(postgres_url):
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
