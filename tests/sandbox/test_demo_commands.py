"""The demo prints only commands that work: with ``--keep`` each printed command runs against
the kept stores; without it none is printed for files already deleted."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from dsf_bridge.sandbox.demo import audit_summary

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "dsf-bridge "


def _commands(output: str) -> list[list[str]]:
    return [
        shlex.split(line.strip())[1:]
        for line in output.splitlines()
        if line.strip().startswith(PREFIX)
    ]


def test_without_keep_no_command_names_the_deleted_stores() -> None:
    urls = {"Hospital_A": "sqlite:////srv/demo/a.db", "AI_Provider": "sqlite:////srv/demo/b.db"}
    events = {"Hospital_A": 12, "AI_Provider": 9}

    removed = audit_summary(urls, events, kept=False, served=False)
    kept = audit_summary(urls, events, kept=True, served=True)

    assert _commands(removed) == []
    assert "/srv/demo" not in removed
    assert "Hospital_A: 12 events" in removed
    assert "run it with --keep" in removed
    assert _commands(kept) == [
        ["audit", "verify", "--db-url", urls["Hospital_A"]],
        ["instances", "list", "--db-url", urls["Hospital_A"]],
        ["audit", "verify", "--db-url", urls["AI_Provider"]],
        ["instances", "list", "--db-url", urls["AI_Provider"]],
    ]
    assert "--serve" not in kept  # served already


def test_every_command_the_demo_prints_with_keep_runs(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSF_BRIDGE_")}
    for name in ("DSF_BRIDGE_REFERENCE_DIR", "DSF_BRIDGE_MLSERVER_VENV"):
        if name in os.environ:  # where the components are, not bridge settings
            env[name] = os.environ[name]
    env["TMPDIR"] = str(tmp_path)
    demo = subprocess.run(
        [sys.executable, "-m", "dsf_bridge", "demo", "--keep", "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    [kept] = list(tmp_path.iterdir())
    assert f"kept the demo's files in {kept}" in demo.stderr

    commands = _commands(demo.stdout)
    assert len(commands) == 4, demo.stdout
    for command in commands:
        done = subprocess.run(
            [sys.executable, "-m", "dsf_bridge", *command],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,  # nothing relative to where the demo ran
            check=False,
        )
        assert done.returncode == 0, (command, done.stderr)
        if command[0] == "audit":
            assert done.stdout.startswith("audit chain intact:"), done.stdout
        else:
            assert " completed " in done.stdout, done.stdout
