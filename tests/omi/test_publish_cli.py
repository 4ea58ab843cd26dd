"""``dsf-bridge omi publish`` and ``omi search`` as users run them: a subprocess against a
registry served over HTTP (``tests/omi/fhir_registry.py``), their help and their errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dsf_bridge.api.server import EmbeddedUvicorn
from tests.omi.fhir_registry import FhirRegistry
from tests.served import cli, free_port, served_sandbox

__all__ = ["served_sandbox"]

CATALOGUE = [
    {"id": "tc", "name": "Tissue composition", "inference_url": "http://127.0.0.1:8080"},
    {"id": "elsewhere", "organization": "other.test"},
]


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSF_BRIDGE_")}
    env.update({f"DSF_BRIDGE_{key.upper()}": value for key, value in settings.items()})
    return env


def _run(*args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    return cli(*args, env=_env(**settings))


def test_help() -> None:
    root = _run("omi", "--help")
    assert root.returncode == 0
    assert "publish" in root.stdout
    assert "search" in root.stdout
    publish = _run("omi", "publish", "--help")
    assert publish.returncode == 0
    for option in ("--dry-run", "--organization", "--json", "--config"):
        assert option in publish.stdout
    search = _run("omi", "search", "--help")
    assert search.returncode == 0
    for option in ("--modality", "--body-part", "--task", "--json"):
        assert option in search.stdout


def test_errors_say_what_to_set() -> None:
    # Six processes that each spend a few seconds importing and then fail at once: run side by
    # side (a third of the wall time on two cores), checked one by one below.
    catalogue = json.dumps(CATALOGUE)
    runs: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
        "nothing": (("omi", "publish"), {}),
        "no_registry": (("omi", "publish"), {"OMI__CATALOGUE": catalogue}),
        "no_site": (
            ("omi", "publish"),
            {"OMI__CATALOGUE": catalogue, "OMI__REGISTRY_URL": "http://127.0.0.1:9/fhir"},
        ),
        "publish_alone": (("config", "show"), {"OMI__PUBLISH": "true"}),
        "no_registry_to_search": (("omi", "search", "--modality", "CT"), {}),
        "bad_task": (
            ("omi", "search", "--task", "painting"),
            {"OMI__REGISTRY_URL": "http://x/fhir"},
        ),
    }
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        futures = {name: pool.submit(_run, *args, **env) for name, (args, env) in runs.items()}
        done = {name: future.result() for name, future in futures.items()}
    expected = {
        "nothing": "offers no service to publish",
        "no_registry": "omi.registry_url is not set",
        "no_site": "dsf.fhir_base_url is not set",
        "publish_alone": "publish = true needs registry_url",
        "no_registry_to_search": "omi.registry_url is not set",
        "bad_task": "task must be one of",
    }
    for name, fragment in expected.items():
        assert done[name].returncode == 2, (name, done[name].stderr)
        assert fragment in done[name].stderr, (name, done[name].stderr)


def test_dry_run_prints_the_resources_and_contacts_nothing() -> None:
    shown = _run(
        "omi",
        "publish",
        "--dry-run",
        "--organization",
        "provider.test",
        "--json",
        OMI__CATALOGUE=json.dumps(CATALOGUE),
        # Nothing listens there: a dry run must not ask.
        OMI__REGISTRY_URL="http://127.0.0.1:9/fhir",
    )
    assert shown.returncode == 0, shown.stderr
    body = json.loads(shown.stdout)
    assert body["dry_run"] is True
    assert list(body["services"]) == ["tc"]
    resources = body["services"]["tc"]
    assert sorted(resources) == ["Device", "Endpoint", "HealthcareService"]
    assert resources["Endpoint"]["address"] == "http://127.0.0.1:8080"
    assert resources["HealthcareService"]["providedBy"]["identifier"]["value"] == "provider.test"


async def test_publish_twice_then_search() -> None:
    registry = FhirRegistry()
    server = EmbeddedUvicorn(registry.app)
    await server.start()
    settings = {
        "OMI__CATALOGUE": json.dumps(CATALOGUE),
        "OMI__REGISTRY_URL": f"http://127.0.0.1:{server.port}/fhir",
    }

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(_run, *args, **settings)

    try:
        publish = ("omi", "publish", "--organization", "provider.test")
        first = await run(*publish)
        assert first.returncode == 0, first.stderr
        assert "HealthcareService/" in first.stdout
        assert first.stdout.count("created") == 3
        second = await run(*publish, "--json")
        assert second.returncode == 0, second.stderr
        outcomes = [r["outcome"] for r in json.loads(second.stdout)["services"]["tc"]]
        assert outcomes == ["unchanged"] * 3
        found = await run("omi", "search", "--modality", "CT", "--body-part", "ABDOMEN", "--json")
        assert found.returncode == 0, found.stderr
        [row] = json.loads(found.stdout)
        assert (row["name"], row["organization"], row["modalities"]) == (
            "Tissue composition",
            "provider.test",
            ["CT"],
        )
        assert (row["contract"], row["contract_problem"]) == ("tissue-composition", None)
        text = await run("omi", "search", "--modality", "CT")
        assert text.stdout.rstrip().endswith("contract tissue-composition"), text.stdout
        none = await run("omi", "search", "--modality", "MR")
        assert none.returncode == 1
        assert "no service matches" in none.stderr
    finally:
        await server.stop()
    assert len(registry.all("HealthcareService")) == 1


async def test_run_publishes_and_beats_as_the_site(served_sandbox: Path, tmp_path: Path) -> None:
    """``omi publish`` finds the site's organization on its DSF FHIR server; ``run`` with
    ``[omi] publish`` publishes at start-up and sends heartbeats (a model server that is not
    there: unavailable), and stops on SIGTERM as before."""
    config = served_sandbox / "Site_A" / "bridge.toml"
    db_url = f"sqlite:///{tmp_path / 'bridge.db'}"
    registry = FhirRegistry()
    server = EmbeddedUvicorn(registry.app)
    await server.start()
    catalogue = [{"id": "tc", "inference_url": f"http://127.0.0.1:{free_port()}"}]
    env = _env(
        OMI__CATALOGUE=json.dumps(catalogue),
        OMI__REGISTRY_URL=f"http://127.0.0.1:{server.port}/fhir",
        OMI__HEARTBEAT_INTERVAL="0.3",
    )
    bridge: asyncio.subprocess.Process | None = None
    try:
        published = await asyncio.to_thread(
            cli, "--config", str(config), "omi", "publish", "--json", env=env
        )
        assert published.returncode == 0, published.stderr
        assert json.loads(published.stdout)["organization"] == "Site_A"
        upgraded = await asyncio.to_thread(
            cli, "--config", str(config), "db", "upgrade", "--db-url", db_url, env=env
        )
        assert upgraded.returncode == 0, upgraded.stderr
        bridge = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dsf_bridge",
            "--config",
            str(config),
            "run",
            "--db-url",
            db_url,
            env={**env, "DSF_BRIDGE_OMI__PUBLISH": "true"},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        beats: list[dict[str, Any]] = []
        for _ in range(600):
            [service] = registry.all("HealthcareService")
            beats = [e for e in service.get("extension", []) if e["url"].endswith("/heartbeat")]
            if beats or bridge.returncode is not None:
                break
            await asyncio.sleep(0.1)
        assert beats, "no heartbeat within 60 s"
        parts = {part["url"]: part for part in beats[0]["extension"]}
        assert parts["status"]["valueCode"] == "unavailable"
        assert parts["queueLength"]["valueInteger"] == 0
        bridge.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(bridge.communicate(), 30)
        assert bridge.returncode == 0, err.decode()[-2000:]
        events = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
        assert "heartbeat.sent" in [e.get("event") for e in events]
    finally:
        if bridge is not None and bridge.returncode is None:
            bridge.kill()
            await bridge.wait()
        await server.stop()
    # Published by the command, then again at start-up: still one of each.
    assert len(registry.all("Device")) == len(registry.all("Endpoint")) == 1
