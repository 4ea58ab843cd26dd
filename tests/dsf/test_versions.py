"""The DSF version a bridge learns from its server's CapabilityStatement, and the sandbox
answering as the version it was told to run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.identity import build_ssl_context, load_identity
from dsf_bridge.dsf.versions import (
    DSF_1,
    DSF_2,
    DsfRelease,
    UnknownDsfVersionError,
    release,
    release_of_capability_statement,
    release_of_software_version,
    server_release,
)
from dsf_bridge.sandbox.certs import CertificateAuthority
from dsf_bridge.sandbox.server import SandboxServer
from dsf_bridge.sandbox.sites import build_service, init_sandbox, sandbox_release
from tests.sandbox.harness import FAST_RETRY


@pytest.mark.parametrize(
    ("software_version", "expected"),
    [
        ("2.1.0 (main/9a986fc)", DSF_2),  # what DSF's ConformanceServiceImpl writes
        ("2.0.2", DSF_2),
        ("2.1.1-SNAPSHOT (develop/?)", DSF_2),
        ("1.9.0", DSF_1),
        ("1.7.1 (main/1234567)", DSF_1),
    ],
)
def test_the_release_line_comes_from_software_version(
    software_version: str, expected: object
) -> None:
    assert release_of_software_version(software_version) is expected


@pytest.mark.parametrize("software_version", ["3.0.0", "latest", "", "v2"])
def test_an_unknown_software_version_is_refused_with_what_the_server_said(
    software_version: str,
) -> None:
    statement = {"resourceType": "CapabilityStatement", "software": {"version": software_version}}
    with pytest.raises(UnknownDsfVersionError) as caught:
        release_of_capability_statement(statement)
    assert caught.value.retryable is False
    assert (software_version or "no software.version") in str(caught.value)


def test_a_capability_statement_without_software_is_not_a_dsf_server() -> None:
    with pytest.raises(UnknownDsfVersionError, match=r"names no software\.version"):
        release_of_capability_statement({"resourceType": "CapabilityStatement"})


def test_unknown_sandbox_version_names_the_known_ones() -> None:
    with pytest.raises(UnknownDsfVersionError, match=r"known: 2\.1, 1\.9"):
        release("1.8")


@pytest.mark.parametrize("dsf_release", [DSF_2, DSF_1], ids=["2.1", "1.9"])
async def test_a_bridge_learns_the_sandbox_version_over_mutual_tls(
    tmp_path: Path, dsf_release: DsfRelease
) -> None:
    ca = CertificateAuthority("versions test CA")
    sites = init_sandbox(tmp_path / "net", ["A"], ca=ca, dsf_release=dsf_release)
    site = sites[0]
    assert sandbox_release(tmp_path / "net") is dsf_release
    assert json.loads((tmp_path / "net" / "sandbox.json").read_text()) == {
        "dsf_version": dsf_release.name
    }
    allow_list = json.loads(site.allow_list.read_text())
    service = build_service("A", allow_list, site.base_url, dsf_release=dsf_release)
    identity = load_identity(site.client_certificate, site.client_key)
    context = build_ssl_context(identity, [site.ca])
    async with (
        SandboxServer(
            service, certificate=site.server_certificate, key=site.server_key, ca_files=[site.ca]
        ) as server,
        FhirClient(server.base_url, ssl_context=context, retry=FAST_RETRY) as client,
    ):
        assert await server_release(client) is dsf_release
