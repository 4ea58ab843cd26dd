"""What ``deploy/`` and the ``Dockerfile`` promise, checked against the code: alert rules and the
dashboard use metrics a running app exposes (promtool checks and unit-tests the rules), the
compose file and the image's settings load as the bridge loads them, the entry point runs,
the systemd unit passes ``systemd-analyze verify``.

The image itself is not built here: this machine has no container runtime that can fetch a base
image (docs/operations.md says how to build it)."""

from __future__ import annotations

import datetime as dt
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from dsf_bridge.api import create_app, heartbeat_probe, subscription_probe
from dsf_bridge.config import ApiSettings, load_settings
from dsf_bridge.store import Database
from tests.api.test_metrics import TOKEN, _scrape
from tests.served import cli

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
METRIC = re.compile(r"\bdsf_bridge_[a-z0-9_]+")
HISTOGRAM_SAMPLES = ("_bucket", "_count", "_sum")


@dataclass
class Alive:
    heartbeat: dt.datetime | None
    connected: bool = True
    disconnected_at: dt.datetime | None = None


def _require(tool: str, install: str) -> str:
    found = shutil.which(tool)
    if found is None:
        pytest.fail(f"{tool} is missing: {install}")
    return found


async def _exposed(database: Database) -> set[str]:
    """The metric names ``/metrics`` of an app with a bridge's probes declares (``# TYPE``),
    with the sample names of its histograms."""
    now = dt.datetime.now(dt.UTC)
    alive = Alive(now)
    probes = [
        subscription_probe("subscription Task", lambda: alive, 900, 30),
        heartbeat_probe("workers", lambda: alive, 900, kind="worker"),
    ]
    app = create_app(database, ApiSettings(token=SecretStr(TOKEN)), probes=probes)
    text, _samples = await _scrape(app)
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _hash, _type, name, kind = line.split(" ")
            names.add(name)
            if kind == "histogram":
                names.update(name + suffix for suffix in HISTOGRAM_SAMPLES)
            if kind == "info":
                names.add(f"{name}_info")
    return names


def _alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((DEPLOY / "alerts.yaml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


async def test_alerts_and_dashboard_use_only_metrics_the_app_exposes(
    sqlite_database: Database,
) -> None:
    exposed = await _exposed(sqlite_database)
    rules = _alert_rules()
    queries = _dashboard_queries()
    for where, expressions in (
        ("alert", {rule["alert"]: rule["expr"] for rule in rules}),
        ("panel query", {f"#{i}": expr for i, expr in enumerate(queries)}),
    ):
        for name, expr in expressions.items():
            used = set(METRIC.findall(expr))
            assert used or re.search(r"\bup\{", expr), f"{where} {name} uses no bridge metric"
            assert used <= exposed, f"{where} {name}: {sorted(used - exposed)} not in /metrics"
    # The alerts the operations guide promises, each named there.
    names = {rule["alert"] for rule in rules}
    assert {
        "DsfBridgeDown",
        "DsfBridgeNotReady",
        "DsfBridgeSubscriptionDisconnected",
        "DsfBridgeIncidentsOpen",
        "DsfBridgeBacklogGrowing",
        "DsfBridgeSendFailures",
        "DsfBridgeAuditUnsealed",
    } <= names
    guide = (ROOT / "docs" / "operations.md").read_text()
    assert [name for name in sorted(names) if f"`{name}`" not in guide] == []
    # Every duration histogram and the backlog are on the dashboard.
    on_dashboard = {name for expr in queries for name in METRIC.findall(expr)}
    for family in (
        "dsf_bridge_subscription_connected",
        "dsf_bridge_backlog",
        "dsf_bridge_incidents_open",
        "dsf_bridge_step_duration_seconds_bucket",
        "dsf_bridge_send_duration_seconds_bucket",
        "dsf_bridge_dicomweb_request_duration_seconds_bucket",
        "dsf_bridge_inference_request_duration_seconds_bucket",
    ):
        assert family in on_dashboard, family


def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    promtool = _require("promtool", "apt-get install prometheus (Debian ships promtool with it)")
    check = subprocess.run(
        [promtool, "check", "rules", str(DEPLOY / "alerts.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in check.stdout
    # Alerts fire when the thing happens (and not before their `for`), per tests/*.yaml.
    unit = subprocess.run(
        [promtool, "test", "rules", str(ROOT / "tests" / "deploy_alerts_test.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


def _dockerfile() -> list[tuple[str, str]]:
    """The final stage's instructions as (INSTRUCTION, arguments), continuations joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
        for parts in [line.strip().split(None, 1)]
    ]
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def _env_pairs(arguments: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(arguments))


def test_the_image_runs_dsf_bridge_as_a_user_with_volumes_and_a_ready_check(
    tmp_path: Path,
) -> None:
    stage = _dockerfile()
    single = {name: args for name, args in stage}
    env: dict[str, str] = {}
    for name, args in stage:
        if name == "ENV":
            env.update(_env_pairs(args))

    assert single["USER"] not in ("root", "0")
    volumes = json.loads(single["VOLUME"])
    assert {"/etc/dsf-bridge", "/var/lib/dsf-bridge", "/opt/dsf-bridge/plugins"} <= set(volumes)
    assert env["DSF_BRIDGE_CONFIG"].startswith("/etc/dsf-bridge/")
    assert env["DSF_BRIDGE_DB__URL"] == "sqlite:////var/lib/dsf-bridge/bridge.db"
    assert single["EXPOSE"] == env["DSF_BRIDGE_API__PORT"]

    # The entry point is the console script, and its command is one the CLI takes.
    entrypoint, command = json.loads(single["ENTRYPOINT"]), json.loads(single["CMD"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["dsf-bridge"] and "dsf-bridge" in scripts
    assert command[0] == "run"
    help_text = cli(*command, "--help")
    assert help_text.returncode == 0, help_text.stderr
    for option in command[1:]:
        assert option in help_text.stdout

    # The image's settings are valid settings (an unknown variable would stop start-up).
    config = tmp_path / "bridge.toml"
    config.write_text((DEPLOY / "bridge.toml").read_text())
    settings = load_settings(environ={**env, "DSF_BRIDGE_CONFIG": str(config)})
    assert settings.api.enabled and settings.api.host == "0.0.0.0"  # noqa: S104 - the image's
    assert settings.api.port == int(env["DSF_BRIDGE_API__PORT"])

    # The health check is deploy/healthcheck.py, copied into the image.
    health = single["HEALTHCHECK"]
    assert "CMD" in health
    check = json.loads(health.split("CMD", 1)[1])
    copies = [args.split() for name, args in stage if name == "COPY"]
    assert ["deploy/healthcheck.py", check[-1]] in copies
    assert check[0] == "python"


def test_the_health_check_asks_ready(tmp_path: Path) -> None:
    """deploy/healthcheck.py against a real listening socket: 200 is 0, 503 is 1 with the
    failing check, nothing listening is 1."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    answers = [
        (200, {"status": "ready", "checks": []}),
        (
            503,
            {
                "status": "not ready",
                "checks": [
                    {"name": "database", "ok": True, "detail": "reachable"},
                    {"name": "subscription Task", "ok": False, "detail": "websocket down"},
                ],
            },
        ),
    ]
    paths: list[str] = []

    class Ready(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            paths.append(self.path)
            status, body = answers[min(len(paths), len(answers)) - 1]
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            return None

    server = HTTPServer(("127.0.0.1", 0), Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = str(server.server_address[1])
    try:
        ready = _healthcheck(port)
        not_ready = _healthcheck(port)
    finally:
        server.shutdown()
        server.server_close()
    gone = _healthcheck(port)
    assert paths == ["/ready", "/ready"]
    assert ready.returncode == 0, ready.stdout
    assert not_ready.returncode == 1
    assert "503 subscription Task: websocket down" in not_ready.stdout
    assert "database" not in not_ready.stdout
    assert gone.returncode == 1


def _healthcheck(port: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"DSF_BRIDGE_API__PORT": port},
    )


def test_compose_places_the_bridge_beside_a_dsf_fhir_server(tmp_path: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    # DSF's FHIR setup (proxy, app, database) and the bridge with its database in the BPE's seat.
    assert {"fhir-proxy", "fhir-app", "fhir-db", "bridge", "bridge-db"} <= set(services)
    bridge = services["bridge"]
    assert (DEPLOY / bridge["build"]["context"] / bridge["build"]["dockerfile"]).is_file()
    for mount in bridge["volumes"]:
        assert (DEPLOY / mount["source"]).exists(), mount["source"]
        assert mount.get("read_only") is True
    # Every secret a service mounts is declared, as a file under ./secrets; every /run/secrets
    # path a service names is one it mounts.
    declared = compose["secrets"]
    for name, service in services.items():
        mounted = set(service.get("secrets", []))
        assert mounted <= set(declared), name
        for value in service.get("environment", {}).values():
            for secret in re.findall(r"/run/secrets/([\w.-]+)", str(value)):
                assert secret in mounted, f"{name}: {secret} is not mounted"
    assert all(spec["file"].startswith("./secrets/") for spec in declared.values())

    # The bridge's environment and deploy/bridge.toml load as the bridge loads them, the
    # secrets read from their files (*_FILE), as Docker mounts them.
    environment = {key: str(value) for key, value in bridge["environment"].items()}
    files = {}
    for secret in bridge["secrets"]:
        files[secret] = tmp_path / secret
        files[secret].write_text(f"{secret}-value-with-16-chars\n")
    resolved = {
        key: re.sub(r"/run/secrets/([\w.-]+)", lambda m: str(files[m.group(1)]), value)
        for key, value in environment.items()
        if key.startswith("DSF_BRIDGE_")
    }
    assert {key for key in resolved if key.endswith("_FILE")} == {
        "DSF_BRIDGE_DB__PASSWORD_FILE",
        "DSF_BRIDGE_DSF__CLIENT_KEY_PASSWORD_FILE",
        "DSF_BRIDGE_API__TOKEN_FILE",
    }
    settings = load_settings(DEPLOY / "bridge.toml", environ=resolved)
    assert settings.db.url == (
        "postgresql://dsf_bridge:bridge_db_user.password-value-with-16-chars"
        "@bridge-db:5432/dsf_bridge"
    )
    assert settings.api.token is not None
    assert settings.api.token.get_secret_value() == "bridge_api_token-value-with-16-chars"
    assert (
        settings.dsf.fhir_base_url
        == services["fhir-app"]["environment"]["DEV_DSF_FHIR_SERVER_BASE_URL"]
    )
    assert settings.dsf.ca_certificates == [files["ssl_ca_certificate_file.pem"]]
    # The bridge's database and its API stay off the internet.
    assert compose["networks"]["bridge-backend"]["internal"] is True
    assert all(port.startswith("127.0.0.1:") for port in bridge["ports"])


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = _require("systemd-analyze", "apt-get install systemd")
    unit = (DEPLOY / "dsf-bridge.service").read_text()
    service = _unit_section(unit, "Service")
    assert service["ExecStart"] == ["/opt/dsf-bridge/venv/bin/dsf-bridge run"]
    assert service["Restart"] == ["on-failure"]
    assert service["User"] == ["dsf-bridge"]
    assert any(
        entry.endswith("/etc/dsf-bridge/dsf-bridge.env") for entry in service["EnvironmentFile"]
    )
    # verify checks that the commands exist: point them at this environment's console script.
    script = Path(sys.executable).with_name("dsf-bridge")
    assert script.is_file(), f"{script} is missing: pip install -e '.[dev]'"
    copy = tmp_path / "dsf-bridge.service"
    copy.write_text(unit.replace("/opt/dsf-bridge/venv/bin/dsf-bridge", str(script)))
    verify = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stderr.strip() == "", verify.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=true", str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert found is not None, security.stdout + security.stderr
    assert float(found.group(1)) < 2.0  # "OK" starts below 3.0 (0 safest, 10 unsafe)


def _unit_section(unit: str, section: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    current = None
    for raw in unit.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        if current == section:
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values
