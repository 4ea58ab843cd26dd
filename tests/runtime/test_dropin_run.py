"""``dsf-bridge run`` with a plugins folder: the good drop-ins are published and deployed beside
the installed plugins; a bad one (import error, resources the FHIR server refuses) is logged at
error and left out, and the bridge runs."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.plugins.test_dropin import _activity_definition, plugin_folder
from tests.runtime.test_daemon import _activity_definitions
from tests.served import cli, served_sandbox

__all__ = ["served_sandbox"]


def test_run_loads_the_good_drop_ins_and_leaves_out_the_bad(
    served_sandbox: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "plugins"
    folder.mkdir(mode=0o700)
    plugin_folder(folder / "hello", "hello")
    plugin_folder(folder / "noimport", "noimport")
    (folder / "noimport" / "handlers.py").write_text("raise RuntimeError('broken on import')\n")
    # Valid for `plugins check`, refused by the FHIR server: no read-access tag.
    plugin_folder(folder / "untagged", "untagged")
    untagged = _activity_definition("untagged")
    del untagged["meta"]
    (folder / "untagged" / "fhir" / "ActivityDefinition" / "untagged.json").write_text(
        json.dumps(untagged)
    )
    site = served_sandbox / "Site_A" / "bridge.toml"
    config = tmp_path / "bridge.toml"
    config.write_text(
        site.read_text()
        + f'[db]\nurl = "sqlite:///{tmp_path / "bridge.db"}"\n[plugins]\nfolder = "{folder}"\n'
    )
    upgrade = cli("--config", str(config), "db", "upgrade")
    assert upgrade.returncode == 0, upgrade.stderr

    bridge = subprocess.Popen(
        [sys.executable, "-m", "dsf_bridge", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: list[dict[str, object]] = []
    try:
        assert bridge.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = bridge.stderr.readline()
            if not line:
                break
            if line.startswith("{"):
                seen.append(json.loads(line))
            if any(e.get("event") == "subscription.bound" for e in seen):
                break
        published = asyncio.run(_activity_definitions(config))
        bridge.send_signal(signal.SIGTERM)
        bridge.communicate(timeout=30)
    finally:
        if bridge.poll() is None:
            bridge.kill()
            bridge.wait()

    assert bridge.returncode == 0
    assert "subscription.bound" in [e.get("event") for e in seen]
    deployed = {e.get("plugin") for e in seen if e.get("event") == "plugin.deployed"}
    assert deployed == {
        "hello",
        "dsf-bridge-ping-pong",
        "dsf-bridge-omi-inference",
        "dsf-bridge-omi-consortium",
    }
    rejected = [e for e in seen if e.get("event") == "plugin.rejected"]
    assert {e["level"] for e in rejected} == {"error"}
    reasons = {str(e.get("source") or e.get("plugin")): str(e["reason"]) for e in rejected}
    assert "RuntimeError: broken on import" in reasons[str(folder / "noimport")]
    assert "untagged" in reasons  # passed the checks, refused by the server at publication
    assert "http://example.org/bpe/Process/hello" in published
    assert "http://example.org/bpe/Process/untagged" not in published
    assert "http://dsf.dev/bpe/Process/ping" in published
