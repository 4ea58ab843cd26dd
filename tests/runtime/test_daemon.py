"""``dsf-bridge run`` as an administrator starts it: a process, a config file, signals."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from dsf_bridge.config import load_settings
from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.identity import build_ssl_context, load_identity
from dsf_bridge.store import Database, upgrade
from dsf_bridge.store.owner import bind_store
from tests.served import cli, served_sandbox

__all__ = ["served_sandbox"]


def _events(stderr: str) -> list[dict[str, object]]:
    events = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def test_run_refuses_an_outdated_schema(served_sandbox: Path, tmp_path: Path) -> None:
    config = served_sandbox / "Site_A" / "bridge.toml"
    result = cli("--config", str(config), "run", "--db-url", f"sqlite:///{tmp_path / 'new.db'}")
    assert result.returncode == 1
    assert "run 'dsf-bridge db upgrade' first" in result.stderr
    assert not (tmp_path / "new.db").exists()  # no empty store left where one was expected

    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    (tmp_path / "empty.db").touch()
    result = cli("--config", str(config), "run", "--db-url", empty)
    assert result.returncode == 1
    assert "run 'dsf-bridge db upgrade' first" in result.stderr


def test_run_refuses_a_store_of_another_organization(served_sandbox: Path, tmp_path: Path) -> None:
    config = served_sandbox / "Site_A" / "bridge.toml"
    db_url = f"sqlite:///{tmp_path / 'bridge.db'}"
    upgrade(db_url)

    async def bind_elsewhere() -> None:
        database = Database(db_url)
        try:
            async with database.transaction() as session:
                await bind_store(session, "other-site.example.org", actor="test")
        finally:
            await database.dispose()

    asyncio.run(bind_elsewhere())
    result = cli("--config", str(config), "run", "--db-url", db_url)
    assert result.returncode == 2, result.stderr
    assert "this store belongs to organization 'other-site.example.org'" in result.stderr
    assert "but this bridge runs for organization 'Site_A'" in result.stderr


def test_run_publishes_deploys_and_stops_on_sigterm(served_sandbox: Path, tmp_path: Path) -> None:
    config = served_sandbox / "Site_A" / "bridge.toml"
    db_url = f"sqlite:///{tmp_path / 'bridge.db'}"
    upgrade = cli("--config", str(config), "db", "upgrade", "--db-url", db_url)
    assert upgrade.returncode == 0, upgrade.stderr
    bridge = subprocess.Popen(
        [sys.executable, "-m", "dsf_bridge", "--config", str(config), "run", "--db-url", db_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert bridge.stderr is not None
        deadline = time.monotonic() + 60
        seen: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            line = bridge.stderr.readline()
            if not line:
                break
            if line.startswith("{"):
                seen.append(json.loads(line))
            if any(e.get("event") == "subscription.bound" for e in seen):
                break
        names = [e.get("event") for e in seen]
        assert "certificate.loaded" in names
        assert "plugin.deployed" in names
        assert "bridge.started" in names
        assert "subscription.bound" in names

        published = asyncio.run(_activity_definitions(config))
        assert "http://dsf.dev/bpe/Process/ping" in published

        bridge.send_signal(signal.SIGTERM)
        _out, rest = bridge.communicate(timeout=30)
    finally:
        if bridge.poll() is None:
            bridge.kill()
            bridge.wait()
    assert bridge.returncode == 0, rest[-2000:]
    assert "bridge.stopped" in [e.get("event") for e in _events(rest)]


async def _activity_definitions(config: Path) -> set[str]:
    settings = load_settings(config, environ={})
    assert settings.dsf.fhir_base_url is not None
    assert settings.dsf.client_certificate is not None
    identity = load_identity(settings.dsf.client_certificate, settings.dsf.client_key)
    context = build_ssl_context(identity, settings.dsf.ca_certificates)
    async with FhirClient(settings.dsf.fhir_base_url, ssl_context=context) as client:
        found = await client.search("ActivityDefinition", [("status", "active")])
    return {str(definition["url"]) for definition in found}
