"""The command line as users run it: a subprocess, real databases, real exit codes."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dsf_bridge.cli import app
from dsf_bridge.dsf.versions import DSF_RELEASES
from dsf_bridge.store import schema_status


def run(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsf_bridge", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
        env=env,
    )


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("config", "db", "audit"):
        assert command in result.stdout
    for group, sub in (
        ("db", "upgrade"),
        ("db", "downgrade"),
        ("db", "current"),
        ("audit", "verify"),
        ("config", "show"),
        ("instances", "list"),
        ("instances", "show"),
        ("instances", "incidents"),
        ("instances", "retry"),
        ("instances", "cancel"),
    ):
        sub_help = run(group, sub, "--help")
        assert sub_help.returncode == 0, sub_help.stderr
        assert "Usage" in sub_help.stdout


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("dsf-bridge ")


def test_db_lifecycle(db_url: str) -> None:
    up = run("db", "upgrade", "--db-url", db_url)
    assert up.returncode == 0, up.stderr
    assert schema_status(db_url).up_to_date

    current = run("db", "current", "--db-url", db_url)
    assert current.returncode == 0
    assert "up to date" in current.stdout

    verify = run("audit", "verify", "--db-url", db_url)
    assert verify.returncode == 0, verify.stderr
    assert "intact: 0 events" in verify.stdout

    down = run("db", "downgrade", "base", "--db-url", db_url)
    assert down.returncode == 0, down.stderr
    assert schema_status(db_url).current is None
    behind = run("db", "current", "--db-url", db_url)
    assert behind.returncode == 1
    assert "db upgrade" in behind.stdout


def test_default_database_is_a_file_in_the_working_directory(tmp_path: Path) -> None:
    result = run("db", "upgrade", cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "dsf-bridge.db").is_file()


def test_bad_config_stops_with_the_field_named(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text("[db]\npool_size = -1\n")
    result = run("--config", str(config), "config", "show")
    assert result.returncode == 2
    assert "db.pool_size" in result.stderr


def test_unknown_revision_is_a_clear_error(sqlite_url: str) -> None:
    result = run("db", "downgrade", "nonsense", "--db-url", sqlite_url)
    assert result.returncode == 1
    assert "nonsense" in result.stderr


def test_audit_verify_on_a_missing_database(tmp_path: Path) -> None:
    result = run("audit", "verify", "--db-url", f"sqlite:///{tmp_path / 'absent.db'}")
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert not (tmp_path / "absent.db").exists()


def test_config_show_hides_secrets_and_reports_json(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(
        '[dsf]\nclient_key_password = "topsecret"\nfhir_base_url = "https://dsf.test/fhir/"\n'
        '[api]\ntoken = "admin-token-topsecret"\n'
    )
    result = run(
        "--config",
        str(config),
        "config",
        "show",
        "--json",
        "--db-url",
        "postgresql://u:pw@db:5432/x",
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["dsf"]["client_key_password"] == "***"
    assert shown["api"]["token"] == "***"
    assert shown["dsf"]["fhir_base_url"] == "https://dsf.test/fhir"
    assert shown["db"]["url"] == "postgresql://u:***@db:5432/x"
    assert "topsecret" not in result.stdout and ":pw@" not in result.stdout


def test_config_show_toml_round_trips() -> None:
    result = run("config", "show", "--db-url", "sqlite:///a.db", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    data = tomllib.loads(result.stdout)
    assert data["db"]["url"] == "sqlite:///a.db"
    assert data["log"]["level"] == "info"


def test_secrets_from_files_as_docker_mounts_them(tmp_path: Path) -> None:
    token = tmp_path / "api-token"
    token.write_text("token-from-a-docker-secret\n")
    env = {**os.environ, "DSF_BRIDGE_API__TOKEN_FILE": str(token)}
    shown = run("config", "show", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["api"]["token"] == "***"
    assert "token-from" not in shown.stdout

    token.chmod(0)
    if os.access(token, os.R_OK):  # root reads anything: a path that is no file then
        token = tmp_path
    refused = run("config", "show", env={**os.environ, "DSF_BRIDGE_API__TOKEN_FILE": str(token)})
    assert refused.returncode == 2
    assert f"DSF_BRIDGE_API__TOKEN_FILE: cannot read {token}" in refused.stderr


def _commands(
    group: typer.core.TyperGroup, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    context = typer.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        yield (*path, name)
        if isinstance(command, typer.core.TyperGroup):
            yield from _commands(command, (*path, name))


def test_help_of_every_command_works() -> None:
    root = typer.main.get_group(app)
    commands = list(_commands(root))
    # The lazily imported groups are walked too.
    assert ("sandbox", "init") in commands and ("plugins", "check") in commands
    assert ("version",) in commands
    runner = CliRunner()
    for command in commands:
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage" in result.output, command


def test_help_imports_no_engine_store_web_or_http_stack() -> None:
    # What makes `dsf-bridge --help` instant (bench/cli.py times it): the command line
    # imports what a command uses only when that command runs.
    probe = (
        "import sys\n"
        "from dsf_bridge.cli import main\n"
        "sys.argv = ['dsf-bridge', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('MODULES', *sorted(sys.modules), file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert "Usage" in result.stdout
    modules = set(result.stderr.split("MODULES", 1)[1].split())
    heavy = {
        "fastapi",
        "sqlalchemy",
        "httpx",
        "pydantic",
        "pydantic_settings",
        "structlog",
        "numpy",
        "pydicom",
        "lxml",
        "cryptography",
        "dsf_bridge.config",
        "dsf_bridge.engine",
        "dsf_bridge.store",
        "dsf_bridge.runtime",
        "dsf_bridge.plugins",
        "dsf_bridge.sandbox",
        "dsf_bridge.api",
    }
    assert heavy & modules == set()


def test_version_names_the_package_python_and_the_dsf_versions() -> None:
    result = run("version")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"dsf-bridge  {version('dsf-bridge')}"
    assert lines[1].startswith(f"python      {platform.python_version()} ")
    assert [line.split()[1] for line in lines[2:]] == ["2.x", "1.x"]

    as_json = run("version", "--json")
    assert as_json.returncode == 0, as_json.stderr
    shown = json.loads(as_json.stdout)
    assert shown["dsf_bridge"] == version("dsf-bridge")
    assert shown["python"] == platform.python_version()
    assert [d["tested_as"] for d in shown["dsf"]] == [
        r.software_version for r in DSF_RELEASES.values()
    ]
    assert shown["dsf"][0]["task_base_profile"] == (
        "http://dsf.dev/fhir/StructureDefinition/task|2.1.0"
    )


def test_config_after_the_command_as_before_it(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text('[log]\nlevel = "DEBUG"\n[db]\nurl = "sqlite:///from-file.db"\n')
    before = run("--config", str(config), "config", "show", "--json")
    after = run("config", "show", "--json", "--config", str(config))
    short = run("config", "show", "-c", str(config), "--json")
    # The same file twice, however spelt, is one meaning.
    same = config.parent / ".." / config.parent.name / config.name
    both = run("-c", str(config), "config", "show", "--json", "--config", str(same))
    for result in (before, after, short, both):
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["db"]["url"] == "sqlite:///from-file.db"
        assert json.loads(result.stdout)["log"]["level"] == "debug"

    bad = tmp_path / "bad.toml"
    bad.write_text("[db]\npool_size = -1\n")
    # `run` reads --config after the command (it was "No such option"); the bad file stops it.
    refused = run("run", "--config", str(bad))
    assert refused.returncode == 2
    assert "db.pool_size" in refused.stderr

    twice = run("--config", str(config), "run", "--config", str(bad))
    assert twice.returncode == 2
    assert f"--config given twice, {config} before the command and {bad} after it" in (twice.stderr)


SETTINGS_COMMANDS = [
    ("config", "show"),
    ("db", "upgrade"),
    ("db", "downgrade", "base"),
    ("db", "current"),
    ("audit", "verify"),
    ("instances", "list"),
    ("instances", "show", "some-instance"),
    ("instances", "incidents"),
    ("instances", "retry", "some-instance", "1"),
    ("instances", "cancel", "some-instance", "--reason", "test"),
    ("run",),
    ("api", "serve"),
    ("check-connection",),
]


@pytest.mark.parametrize("command", SETTINGS_COMMANDS, ids=" ".join)
def test_every_command_with_settings_takes_config_after_it(
    command: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[db]\npool_size = 3\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("[db]\npool_size = -1\n")
    # The flag beats DSF_BRIDGE_CONFIG, after the command as before it.
    monkeypatch.setenv("DSF_BRIDGE_CONFIG", str(good))
    result = CliRunner().invoke(app, [*command, "--config", str(bad)])
    assert result.exit_code == 2, result.output
    assert "db.pool_size" in result.output
