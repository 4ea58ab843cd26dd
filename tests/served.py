"""A sandbox network on disk with one organization's server in its own process, and the CLI as
users run it: for tests of ``check-connection`` and ``run``."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["cli", "free_port", "served_sandbox"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(
    *args: str, cwd: Path | None = None, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsf_bridge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env=env,
    )


@pytest.fixture
def served_sandbox(tmp_path: Path) -> Iterator[Path]:
    """``sandbox init`` for Site_A and Site_B, and Site_A's server running; yields the folder."""
    port = free_port()
    directory = tmp_path / "sandbox"
    init = cli(
        "sandbox",
        "init",
        str(directory),
        "--org",
        "Site_A",
        "--org",
        "Site_B",
        "--base-port",
        str(port),
    )
    assert init.returncode == 0, init.stderr
    server = subprocess.Popen(
        [sys.executable, "-m", "dsf_bridge", "sandbox", "serve", str(directory), "--org", "Site_A"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            pytest.fail("sandbox server did not start")
        yield directory
    finally:
        server.terminate()
        server.wait(10)
