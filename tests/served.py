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

__all__ = ["cli", "free_port", "serve_sandbox", "served_sandbox", "served_sandbox_module"]


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
    yield from _served(tmp_path)


@pytest.fixture(scope="module")
def served_sandbox_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """:func:`served_sandbox` once for a module whose tests only read from the server (a
    ``sandbox init`` and a server start cost about 5 s per test): they may add files of their
    own to the folder, never change the ones ``sandbox init`` wrote."""
    yield from _served(tmp_path_factory.mktemp("served"))


def _served(tmp_path: Path) -> Iterator[Path]:
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
    server = serve_sandbox(directory, "Site_A", port)
    try:
        yield directory
    finally:
        server.terminate()
        server.wait(10)


def serve_sandbox(directory: Path, organization: str, port: int) -> subprocess.Popen[bytes]:
    """``sandbox serve DIR --org ORG`` in its own process, once it accepts connections on
    ``port`` (its port from ``sandbox init``); the caller stops it."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dsf_bridge",
            "sandbox",
            "serve",
            str(directory),
            "--org",
            organization,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return server
        if server.poll() is not None:
            break
        time.sleep(0.1)
    server.kill()
    server.wait(10)
    pytest.fail(f"the sandbox server of {organization} did not start on port {port}")
