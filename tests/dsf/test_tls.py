"""Mutual TLS on real loopback sockets against the sandbox: the happy path and every refusal
(no client certificate, another CA, an unknown thumbprint, an expired certificate, a wrong host
name, a server from another CA) ends in a clear :class:`RemoteError`."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest

from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.identity import build_ssl_context, load_identity, thumbprint
from dsf_bridge.dsf.organization import find_local_organization
from dsf_bridge.errors import RemoteError
from dsf_bridge.sandbox.certs import CertificateAuthority, IssuedCertificate
from dsf_bridge.sandbox.server import SandboxServer
from dsf_bridge.sandbox.sites import build_service
from tests.sandbox.harness import FAST_RETRY, LOCAL, REMOTE, Sandbox


def _context_with(
    issued: IssuedCertificate | None, ca_file: Path, tmp_path: Path
) -> ssl.SSLContext:
    """A client context that trusts ``ca_file`` and presents ``issued`` without the bridge's
    checks (which would refuse expired certificates before any socket is opened)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca_file))
    if issued is not None:
        certificate, key = tmp_path / "presented.pem", tmp_path / "presented-key.pem"
        issued.write(certificate, key)
        context.load_cert_chain(str(certificate), str(key))
    return context


async def test_happy_path_finds_the_local_organization(sandbox: Sandbox) -> None:
    site = sandbox.sites[LOCAL]
    identity = load_identity(site.client_certificate, site.client_key)
    async with FhirClient(
        sandbox.base_url, ssl_context=build_ssl_context(identity, [site.ca]), retry=FAST_RETRY
    ) as client:
        organization = await find_local_organization(client, sandbox.base_url)
    assert organization.identifier == LOCAL
    assert organization.thumbprints == (identity.thumbprint,)
    assert organization.endpoint["address"] == sandbox.base_url
    organization.require_thumbprint(identity.thumbprint)


async def test_remote_organization_is_known_too(sandbox: Sandbox) -> None:
    async with sandbox.client(REMOTE) as client:
        endpoints = await client.search("Endpoint", {"status": "active"})
    assert sorted(e["identifier"][0]["value"] for e in endpoints) == [
        f"{LOCAL}_Endpoint",
        f"{REMOTE}_Endpoint",
    ]


async def test_no_client_certificate_is_refused(sandbox: Sandbox, tmp_path: Path) -> None:
    context = _context_with(None, sandbox.sites[LOCAL].ca, tmp_path)
    async with FhirClient(sandbox.base_url, ssl_context=context, retry=FAST_RETRY) as client:
        with pytest.raises(
            RemoteError, match=r"(rejected|refused) our client certificate"
        ) as caught:
            await client.read("Organization", "x")
    assert "check dsf.client_certificate" in str(caught.value)


async def test_certificate_from_another_ca_is_refused(sandbox: Sandbox, tmp_path: Path) -> None:
    stranger = CertificateAuthority("Some other CA").issue_client(LOCAL)
    context = _context_with(stranger, sandbox.sites[LOCAL].ca, tmp_path)
    async with FhirClient(sandbox.base_url, ssl_context=context, retry=FAST_RETRY) as client:
        with pytest.raises(RemoteError, match=r"(rejected|refused) our client certificate"):
            await client.search("Task", {})


async def test_expired_certificate_is_refused_on_the_wire(sandbox: Sandbox, tmp_path: Path) -> None:
    expired = sandbox.ca.issue_expired_client("Site_A expired")
    context = _context_with(expired, sandbox.sites[LOCAL].ca, tmp_path)
    async with FhirClient(sandbox.base_url, ssl_context=context, retry=FAST_RETRY) as client:
        with pytest.raises(
            RemoteError, match=r"(rejected|refused) our client certificate"
        ) as caught:
            await client.search("Task", {})
    # Refused in the handshake, before any HTTP status.
    assert caught.value.status is None


async def test_unknown_thumbprint_gets_401_with_outcome(sandbox: Sandbox, tmp_path: Path) -> None:
    unknown = sandbox.ca.issue_client("Not in the allow list")
    context = _context_with(unknown, sandbox.sites[LOCAL].ca, tmp_path)
    async with FhirClient(sandbox.base_url, ssl_context=context, retry=FAST_RETRY) as client:
        with pytest.raises(RemoteError) as caught:
            await client.search("Task", {})
    assert caught.value.status == 401
    assert thumbprint(unknown.certificate) in str(caught.value)
    assert "belongs to no organization of the allow list" in str(caught.value)
    assert caught.value.retryable is False


async def test_wrong_host_name_is_refused(sandbox: Sandbox, tmp_path: Path) -> None:
    site = sandbox.sites[LOCAL]
    wrong = sandbox.ca.issue_server("elsewhere", hosts=["elsewhere.example"])
    certificate, key = tmp_path / "wrong.pem", tmp_path / "wrong-key.pem"
    wrong.write(certificate, key)
    service = build_service(LOCAL, _allow_list(site.allow_list), site.base_url)
    async with (
        SandboxServer(service, certificate=certificate, key=key, ca_files=[site.ca]) as server,
        FhirClient(server.base_url, ssl_context=sandbox.context(LOCAL), retry=FAST_RETRY) as client,
    ):
        with pytest.raises(RemoteError, match="not trusted") as caught:
            await client.search("Task", {})
    assert "mismatch, certificate is not valid for" in str(caught.value)
    assert caught.value.retryable is False


async def test_server_from_another_ca_is_refused(sandbox: Sandbox, tmp_path: Path) -> None:
    site = sandbox.sites[LOCAL]
    foreign = CertificateAuthority("Foreign server CA").issue_server("localhost")
    certificate, key = tmp_path / "foreign.pem", tmp_path / "foreign-key.pem"
    foreign.write(certificate, key)
    service = build_service(LOCAL, _allow_list(site.allow_list), site.base_url)
    async with (
        SandboxServer(service, certificate=certificate, key=key, ca_files=[site.ca]) as server,
        FhirClient(server.base_url, ssl_context=sandbox.context(LOCAL), retry=FAST_RETRY) as client,
    ):
        with pytest.raises(RemoteError, match="not trusted") as caught:
            await client.search("Task", {})
    assert "dsf.ca_certificates" in str(caught.value)


def _allow_list(path: Path) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(path.read_text())
    return loaded


@pytest.mark.parametrize("form", ["encrypted-pem", "pkcs12"])
async def test_protected_keys_work_on_the_wire(sandbox: Sandbox, tmp_path: Path, form: str) -> None:
    site = sandbox.sites[LOCAL]
    identity = load_identity(site.client_certificate, site.client_key)
    issued = IssuedCertificate(identity.certificate, identity.key, sandbox.ca.certificate)  # type: ignore[arg-type]
    if form == "pkcs12":
        bundle = tmp_path / "client.p12"
        bundle.write_bytes(issued.pkcs12("pw"))
        protected = load_identity(bundle, password="pw")
    else:
        certificate, key = tmp_path / "c.pem", tmp_path / "k.pem"
        issued.write(certificate, key, password="pw")
        protected = load_identity(certificate, key, password="pw")
    context = build_ssl_context(protected, [site.ca], password="pw")
    async with FhirClient(sandbox.base_url, ssl_context=context, retry=FAST_RETRY) as client:
        organization = await find_local_organization(client, sandbox.base_url)
    assert organization.identifier == LOCAL
    assert protected.thumbprint in organization.thumbprints
