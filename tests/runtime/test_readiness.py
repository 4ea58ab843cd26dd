"""``/ready`` and ``/metrics`` of ``dsf-bridge run`` while its DSF FHIR server goes away and comes
back: the sandbox server in its own process, stopped and started again on the same port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.served import cli, free_port, serve_sandbox

HEALTHCHECK = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"

TOKEN = "readiness-token-for-tests"
DISCONNECTED_AFTER = 2.0


def _connected(api: str) -> dict[str, float]:
    """``dsf_bridge_subscription_connected`` by probe."""
    response = httpx.get(f"{api}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    return {
        sample.labels["probe"]: sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == "dsf_bridge_subscription_connected"
    }


def _healthcheck(api_port: int) -> int:
    """The container's health check (deploy/healthcheck.py) against this bridge."""
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)],
        capture_output=True,
        timeout=30,
        check=False,
        env={"DSF_BRIDGE_API__PORT": str(api_port)},
    ).returncode


def _until(
    api: str,
    accept: Callable[[httpx.Response], bool],
    timeout: float,
    bridge: subprocess.Popen[str],
) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: httpx.Response | None = None
    while time.monotonic() < deadline:
        assert bridge.poll() is None, "the bridge stopped"
        try:
            last = httpx.get(f"{api}/ready", timeout=10)
        except httpx.TransportError:
            last = None
        if last is not None and accept(last):
            return last
        time.sleep(0.2)
    raise AssertionError(f"/ready never as expected; last: {last and last.text}")


def _websocket_down(response: httpx.Response) -> bool:
    return response.status_code == 503 and "websocket down" in response.text


def test_ready_fails_while_the_fhir_server_is_away_and_recovers(tmp_path: Path) -> None:
    port = free_port()
    directory = tmp_path / "sandbox"
    init = cli("sandbox", "init", str(directory), "--org", "Site_A", "--base-port", str(port))
    assert init.returncode == 0, init.stderr
    config = directory / "Site_A" / "bridge.toml"
    db_url = f"sqlite:///{tmp_path / 'bridge.db'}"
    upgrade = cli("--config", str(config), "db", "upgrade", "--db-url", db_url)
    assert upgrade.returncode == 0, upgrade.stderr
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    env = {
        **os.environ,
        "DSF_BRIDGE_API__ENABLED": "true",
        "DSF_BRIDGE_API__PORT": str(api_port),
        "DSF_BRIDGE_API__TOKEN": TOKEN,
        "DSF_BRIDGE_API__DISCONNECTED_AFTER": str(DISCONNECTED_AFTER),
    }
    server = serve_sandbox(directory, "Site_A", port)
    bridge = subprocess.Popen(
        [sys.executable, "-m", "dsf_bridge", "--config", str(config), "run", "--db-url", db_url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        _until(api, lambda r: r.status_code == 200, 90, bridge)
        assert set(_connected(api).values()) == {1.0}
        assert _healthcheck(api_port) == 0
        assert set(_connected(api)) == {
            "subscription Task",
            "subscription QuestionnaireResponse",
        }

        stopped = time.monotonic()
        server.terminate()
        server.wait(10)
        down = _until(api, _websocket_down, 60, bridge)
        # Not before the limit (a reconnect takes a moment), and not 15 minutes later as
        # before (api.stale_after); the margin is for a loaded machine.
        assert DISCONNECTED_AFTER <= time.monotonic() - stopped < DISCONNECTED_AFTER + 30
        checks = {c["name"]: c for c in down.json()["checks"]}
        task = checks["subscription Task"]
        assert not task["ok"] and task["connected"] is False
        assert f"(limit {DISCONNECTED_AFTER:.0f} s), reconnecting" in task["detail"]
        assert checks["database"]["ok"] and checks["workers"]["ok"]
        assert set(_connected(api).values()) == {0.0}
        assert _healthcheck(api_port) == 1

        server = serve_sandbox(directory, "Site_A", port)
        # The reconnect back-off doubles from 1 s while the server is away.
        back = _until(api, lambda r: r.status_code == 200, 90, bridge)
        assert all(c["ok"] for c in back.json()["checks"])
        assert set(_connected(api).values()) == {1.0}

        bridge.send_signal(signal.SIGTERM)
        assert bridge.wait(60) == 0
    finally:
        for process in (bridge, server):
            if process.poll() is None:
                process.kill()
                process.wait()
