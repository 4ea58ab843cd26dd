"""``dsf-bridge sandbox init`` and ``serve`` end to end, as subprocesses: the written layout,
the allow list's thumbprints, a ``bridge.toml`` the bridge's own config loader accepts, and a
served FHIR server the bridge's client finds itself on."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import sys
from pathlib import Path

from dsf_bridge.config import load_settings
from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.identity import build_ssl_context, load_identity
from dsf_bridge.dsf.organization import find_local_organization
from tests.sandbox.harness import FAST_RETRY


def _cli() -> list[str]:
    executable = shutil.which("dsf-bridge", path=str(Path(sys.executable).parent))
    assert executable is not None, "dsf-bridge is not installed in this environment"
    return [executable]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def _run(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *_cli(), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_init_writes_the_layout_and_a_loadable_config(tmp_path: Path) -> None:
    directory = tmp_path / "net"
    code, out, err = await _run("sandbox", "init", str(directory), "--org", "A", "--org", "B")
    assert code == 0, err
    for organization in ("A", "B"):
        for name in ("server.pem", "server-key.pem", "client.pem", "client-key.pem", "bridge.toml"):
            assert (directory / organization / name).is_file()
        assert (directory / organization / "client-key.pem").stat().st_mode & 0o077 == 0
    bundle = json.loads((directory / "allow-list.json").read_text())
    organizations = [
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Organization"
    ]
    thumbprints = {
        o["identifier"][0]["value"]: o["extension"][0]["valueString"] for o in organizations
    }
    identity = load_identity(directory / "A" / "client.pem", directory / "A" / "client-key.pem")
    assert thumbprints["A"] == identity.thumbprint
    assert f"A: https://127.0.0.1:8443/fhir config {directory / 'A' / 'bridge.toml'}" in out
    settings = load_settings(directory / "A" / "bridge.toml", environ={})
    assert settings.dsf.fhir_base_url == "https://127.0.0.1:8443/fhir"
    assert settings.dsf.client_certificate == (directory / "A" / "client.pem").resolve()
    assert settings.dsf.ca_certificates == [(directory / "ca.pem").resolve()]

    again = await _run("sandbox", "init", str(directory), "--org", "A")
    assert again[0] == 2
    assert "--force" in again[2]


async def test_serve_answers_the_bridge_configuration_of_its_site(tmp_path: Path) -> None:
    directory = tmp_path / "net"
    port = _free_port()
    code, _, err = await _run(
        "sandbox", "init", str(directory), "--org", "A", "--org", "B", "--base-port", str(port)
    )
    assert code == 0, err
    process = await asyncio.create_subprocess_exec(
        *_cli(),
        "sandbox",
        "serve",
        str(directory),
        "--org",
        "A",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        banner = ""
        while "serving A at" not in banner:
            line = await asyncio.wait_for(process.stderr.readline(), 20)
            assert line, "sandbox serve exited before serving"
            banner = line.decode()
        settings = load_settings(directory / "A" / "bridge.toml", environ={})
        dsf = settings.dsf
        assert dsf.fhir_base_url is not None
        assert dsf.client_certificate is not None
        identity = load_identity(dsf.client_certificate, dsf.client_key)
        context = build_ssl_context(identity, dsf.ca_certificates)
        async with FhirClient(dsf.fhir_base_url, ssl_context=context, retry=FAST_RETRY) as client:
            organization = await find_local_organization(client, dsf.fhir_base_url)
        assert organization.identifier == "A"
        organization.require_thumbprint(identity.thumbprint)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await process.communicate()
    assert process.returncode == 0


async def test_init_with_a_parent_organization_writes_its_affiliations(tmp_path: Path) -> None:
    directory = tmp_path / "net"
    args = ["sandbox", "init", str(directory), "--org", "Hub", "--org", "S1", "--org", "S2"]
    code, out, err = await _run(
        *args, "--parent", "Net", "--member", "S1=DIC,COS", "--member", "S2=HRP"
    )
    assert code == 0, err
    assert "parent organization Net: S1 (DIC,COS), S2 (HRP)" in out
    bundle = json.loads((directory / "allow-list.json").read_text())
    affiliations = [
        e for e in bundle["entry"] if e["resource"]["resourceType"] == "OrganizationAffiliation"
    ]
    assert [e["request"]["url"].rsplit("|", 1)[-1] for e in affiliations] == ["S1", "S2"]
    assert [[c["coding"][0]["code"] for c in e["resource"]["code"]] for e in affiliations] == [
        ["DIC", "COS"],
        ["HRP"],
    ]

    unknown = await _run(*args, "--force", "--parent", "Net", "--member", "S3=DIC")
    assert unknown[0] == 2
    assert "member 'S3' of parent organization 'Net' is not an organization" in unknown[2]
    orphan = await _run(*args, "--force", "--member", "S1=DIC")
    assert orphan[0] == 2
    assert "--member needs --parent" in orphan[2]
