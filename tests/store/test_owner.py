"""A store belongs to the organization that first ran on it; another one is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsf_bridge.errors import ConfigError
from dsf_bridge.store import Database, reasons_of
from dsf_bridge.store.owner import bind_store, store_owner
from tests.served import cli


async def test_the_first_run_binds_the_store_and_later_runs_of_it_pass(
    database: Database,
) -> None:
    async with database.transaction() as session:
        assert await store_owner(session) is None
        assert await bind_store(session, "site-a.example.org", actor="bridge") is True
    async with database.transaction() as session:
        assert await bind_store(session, "site-a.example.org", actor="bridge") is False
        assert await store_owner(session) == "site-a.example.org"
        assert await reasons_of(session, "store.bound") == [
            "the store belongs to this organization from now on"
        ]


async def test_another_organization_is_refused_naming_both(database: Database) -> None:
    async with database.transaction() as session:
        await bind_store(session, "site-a.example.org", actor="bridge")
    with pytest.raises(ConfigError) as refused:
        async with database.transaction() as session:
            await bind_store(session, "site-b.example.org", actor="bridge")
    assert refused.value.field == "db.url"
    assert "belongs to organization 'site-a.example.org'" in str(refused.value)
    assert "runs for organization 'site-b.example.org'" in str(refused.value)
    async with database.transaction() as session:
        assert await store_owner(session) == "site-a.example.org"


def test_db_upgrade_ties_a_store_to_its_organization(sqlite_url: str) -> None:
    first = cli("db", "upgrade", "--organization", "site-a.example.org", "--db-url", sqlite_url)
    assert first.returncode == 0, first.stderr
    assert "the store belongs to organization site-a.example.org" in first.stdout
    again = cli("db", "upgrade", "--organization", "site-a.example.org", "--db-url", sqlite_url)
    assert again.returncode == 0, again.stderr
    other = cli("db", "upgrade", "--organization", "site-b.example.org", "--db-url", sqlite_url)
    assert other.returncode == 2
    assert "belongs to organization 'site-a.example.org'" in other.stderr
    assert "runs for organization 'site-b.example.org'" in other.stderr


def test_db_upgrade_to_an_older_revision_takes_no_organization(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    older = cli("db", "upgrade", "0004", "--organization", "site-a.example.org", "--db-url", url)
    assert older.returncode == 2
    assert "--organization needs the newest schema" in older.stderr
    assert "not 0004" in older.stderr


@pytest.mark.parametrize("identifier", ["", " ", "site-a.example.org "])
def test_db_upgrade_binds_no_blank_or_padded_organization(sqlite_url: str, identifier: str) -> None:
    """``--organization "$ORG"`` with the variable unset bound the store to ``''``: every
    run after was refused as another organization's."""
    refused = cli("db", "upgrade", "--organization", identifier, "--db-url", sqlite_url)
    assert refused.returncode == 2, refused.stdout
    assert "is no DSF organization identifier" in refused.stderr
    bound = cli("db", "upgrade", "--organization", "site-a.example.org", "--db-url", sqlite_url)
    assert bound.returncode == 0, bound.stderr
    assert "the store belongs to organization site-a.example.org" in bound.stdout
