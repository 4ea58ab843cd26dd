"""The admin API as administrators start it: with ``dsf-bridge run``, and alone with
``dsf-bridge api serve``; real processes, real sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from dsf_bridge.config import load_settings
from tests.served import cli, free_port, served_sandbox

__all__ = ["served_sandbox"]

TOKEN = "cli-test-token-0123456"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextmanager
def _process(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "dsf_bridge", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _wait_for(url: str, *, status: int = 200, timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: httpx.Response | None = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url, timeout=2)
            if last.status_code == status:
                return last
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer {status}: {last.text if last else 'no answer'}")


def test_run_serves_readiness_metrics_and_audit(served_sandbox: Path, tmp_path: Path) -> None:
    config = served_sandbox / "Site_A" / "bridge.toml"
    db_url = f"sqlite:///{tmp_path / 'bridge.db'}"
    port = free_port()
    env = {
        "DSF_BRIDGE_API__ENABLED": "true",
        "DSF_BRIDGE_API__PORT": str(port),
        "DSF_BRIDGE_API__TOKEN": TOKEN,
    }
    base = f"http://127.0.0.1:{port}"
    args = ["--config", str(config), "run", "--upgrade-db", "--db-url", db_url]
    with _process(args, env) as bridge:
        ready = _wait_for(f"{base}/ready").json()
        checks = {check["name"]: check["ok"] for check in ready["checks"]}
        assert checks == {
            "database": True,
            "subscription Task": True,
            "subscription QuestionnaireResponse": True,
            "workers": True,
        }
        health = httpx.get(f"{base}/health").json()
        assert health["site"] == "Site_A"
        metrics = httpx.get(f"{base}/metrics", headers=AUTH)
        probes = {
            sample.labels["probe"]: sample.value
            for family in text_string_to_metric_families(metrics.text)
            for sample in family.samples
            if sample.name == "dsf_bridge_probe_ok"
        }
        assert probes["subscription Task"] == 1
        deployed = httpx.get(f"{base}/api/v1/audit?action=process.deployed", headers=AUTH).json()
        subjects = {event["subject"] for event in deployed["events"]}
        assert "ProcessDefinition/dsfdev_ping|1.0" in subjects
        assert httpx.get(f"{base}/api/v1/audit").status_code == 401

        bridge.send_signal(signal.SIGTERM)
        _out, err = bridge.communicate(timeout=30)
    assert bridge.returncode == 0, err[-2000:]
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    names = [event.get("event") for event in events]
    assert "api.listening" in names
    assert "api.closed" not in names
    assert TOKEN not in err  # the token never reaches the log


def test_api_serve_audits_a_store_without_a_bridge(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'store.db'}"
    assert cli("db", "upgrade", "--db-url", db_url).returncode == 0
    port = free_port()
    args = ["api", "serve", "--db-url", db_url, "--port", str(port)]
    with _process(args, {}) as server:
        ready = _wait_for(f"http://127.0.0.1:{port}/ready").json()
        closed = httpx.get(f"http://127.0.0.1:{port}/api/v1/instances")
        server.send_signal(signal.SIGTERM)
        _out, err = server.communicate(timeout=30)
    assert [check["name"] for check in ready["checks"]] == ["database"]
    assert closed.status_code == 403
    assert server.returncode == 0, err[-2000:]
    assert "api.closed" in err  # it says why the audit paths refuse


def test_api_serve_refuses_a_missing_store_and_a_short_token(tmp_path: Path) -> None:
    missing = cli("api", "serve", "--db-url", f"sqlite:///{tmp_path / 'none.db'}")
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr
    short = subprocess.run(
        [sys.executable, "-m", "dsf_bridge", "api", "serve"],
        capture_output=True,
        text=True,
        env={**os.environ, "DSF_BRIDGE_API__TOKEN": "short"},
        timeout=60,
        check=False,
    )
    assert short.returncode == 2
    assert "api.token" in short.stderr
    assert "at least 16 characters" in short.stderr


def test_api_serve_names_the_setting_when_the_port_is_taken(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'store.db'}"
    assert cli("db", "upgrade", "--db-url", db_url).returncode == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = cli("api", "serve", "--db-url", db_url, "--port", str(port))
    assert result.returncode == 2
    assert f"api.port: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_token_from_a_secret_file_loses_its_newline() -> None:
    settings = load_settings(None, environ={"DSF_BRIDGE_API__TOKEN": f"  {TOKEN}\n"})
    assert settings.api.token is not None
    assert settings.api.token.get_secret_value() == TOKEN
