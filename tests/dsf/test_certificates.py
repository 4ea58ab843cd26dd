"""Publishing and finding the certificate to encrypt for, against two real sandbox servers over
mutual TLS: Site_B publishes on its own server, Site_A reads it there and checks it against the
allow list on its own server."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from dsf_bridge.dsf.certificates import (
    CERTIFICATE_IDENTIFIER_SYSTEM,
    CERTIFICATE_IDENTIFIER_VALUE,
    RecipientKeyError,
    publish_certificate,
    recipient_certificate,
)
from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.identity import thumbprint
from dsf_bridge.dsf.vocabulary import ORGANIZATION_IDENTIFIER_SYSTEM, THUMBPRINT_EXTENSION
from dsf_bridge.sandbox.certs import CertificateAuthority
from dsf_bridge.sandbox.server import SandboxServer
from dsf_bridge.sandbox.sites import build_service
from tests.sandbox.harness import FAST_RETRY, LOCAL, REMOTE, Sandbox

IDENTIFIER = f"{CERTIFICATE_IDENTIFIER_SYSTEM}|{CERTIFICATE_IDENTIFIER_VALUE}"


@dataclass
class Network:
    """Site_A's server (the sandbox fixture) and Site_B's, with the clients of the test."""

    sandbox: Sandbox
    b_own: FhirClient  # Site_B's bridge on its own server
    a_at_b: FhirClient  # Site_A's bridge reading Site_B's server
    a_own: FhirClient  # Site_A's bridge on its own server (the allow list it trusts)

    @property
    def b_certificate_pem(self) -> bytes:
        return self.sandbox.sites[REMOTE].client_certificate.read_bytes()

    async def bundles(self) -> list[dict[str, Any]]:
        return await self.b_own.search("Bundle", [("identifier", IDENTIFIER)])


@pytest.fixture
async def network(sandbox: Sandbox) -> AsyncIterator[Network]:
    site = sandbox.sites[REMOTE]
    service = build_service(REMOTE, json.loads(site.allow_list.read_text()), site.base_url)
    async with SandboxServer(
        service, certificate=site.server_certificate, key=site.server_key, ca_files=[site.ca]
    ) as server:
        clients = (
            FhirClient(server.base_url, ssl_context=sandbox.context(REMOTE), retry=FAST_RETRY),
            FhirClient(server.base_url, ssl_context=sandbox.context(LOCAL), retry=FAST_RETRY),
            sandbox.client(LOCAL),
        )
        try:
            yield Network(sandbox, *clients)
        finally:
            for client in clients:
                await client.aclose()


async def test_published_certificate_is_found_and_bound_to_the_organization(
    network: Network,
) -> None:
    await publish_certificate(network.b_own, network.b_certificate_pem)
    certificate = await recipient_certificate(network.a_at_b, network.a_own, REMOTE)
    assert certificate.public_bytes(serialization.Encoding.PEM) == network.b_certificate_pem
    (organization,) = await network.a_own.search(
        "Organization", [("identifier", f"{ORGANIZATION_IDENTIFIER_SYSTEM}|{REMOTE}")]
    )
    assert thumbprint(certificate) in {
        e["valueString"] for e in organization["extension"] if e["url"] == THUMBPRINT_EXTENSION
    }


async def test_publishing_is_idempotent_and_a_renewed_certificate_replaces_the_old(
    network: Network,
) -> None:
    await publish_certificate(network.b_own, network.b_certificate_pem)
    await publish_certificate(network.b_own, network.b_certificate_pem)
    (first,) = await network.bundles()
    assert first["meta"]["versionId"] == "1"
    assert {t["code"] for t in first["meta"]["tag"]} == {"ALL"}

    renewed = network.sandbox.ca.issue_client("Site_B renewed").certificate_pem()
    await publish_certificate(network.b_own, renewed)
    await publish_certificate(network.b_own, renewed)
    (second,) = await network.bundles()
    assert second["id"] == first["id"]
    assert second["meta"]["versionId"] == "2"
    binary = next(
        e["resource"] for e in second["entry"] if e["resource"]["resourceType"] == "Binary"
    )
    assert base64.b64decode(binary["data"]) == renewed


async def test_a_certificate_outside_the_allow_list_is_refused(network: Network) -> None:
    # Valid, from the network's own CA, with the organization's name: only the thumbprint
    # tells it is not Site_B's.
    forged = network.sandbox.ca.issue_client(REMOTE).certificate_pem()
    await publish_certificate(network.b_own, forged)
    with pytest.raises(
        RecipientKeyError, match="is not one of organization Site_B's thumbprints in the allow"
    ):
        await recipient_certificate(network.a_at_b, network.a_own, REMOTE)


async def test_a_certificate_from_another_ca_is_refused_too(network: Network) -> None:
    forged = CertificateAuthority("attacker CA").issue_client(REMOTE).certificate_pem()
    await publish_certificate(network.b_own, forged)
    with pytest.raises(RecipientKeyError, match="refusing to encrypt for it"):
        await recipient_certificate(network.a_at_b, network.a_own, REMOTE)


async def test_nothing_published_and_unknown_organizations_are_named(network: Network) -> None:
    with pytest.raises(RecipientKeyError, match="Site_B has published no encryption certificate"):
        await recipient_certificate(network.a_at_b, network.a_own, REMOTE)
    await publish_certificate(network.b_own, network.b_certificate_pem)
    with pytest.raises(RecipientKeyError, match="Site_X is not an active Organization"):
        await recipient_certificate(network.a_at_b, network.a_own, "Site_X")


async def test_an_expired_certificate_is_refused(network: Network) -> None:
    await publish_certificate(network.b_own, network.b_certificate_pem)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=20 * 365)
    with pytest.raises(RecipientKeyError, match="not now; it must publish a current one"):
        await recipient_certificate(network.a_at_b, network.a_own, REMOTE, now=later)


async def test_an_altered_bundle_is_refused(network: Network) -> None:
    await publish_certificate(network.b_own, network.b_certificate_pem)
    (bundle,) = await network.bundles()
    other = network.sandbox.ca.issue_client("other").certificate_pem()
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "Binary":
            entry["resource"]["data"] = base64.b64encode(other).decode()
    await network.b_own.update(bundle)
    with pytest.raises(RecipientKeyError, match="does not match the SHA-256"):
        await recipient_certificate(network.a_at_b, network.a_own, REMOTE)
    # Publishing again repairs it.
    await publish_certificate(network.b_own, network.b_certificate_pem)
    assert await recipient_certificate(network.a_at_b, network.a_own, REMOTE)


async def test_a_key_that_cannot_be_encrypted_for_is_refused(network: Network) -> None:
    # An Ed25519 certificate (sign-only key) that the allow list does list for Site_B.
    ca = network.sandbox.ca
    key = ed25519.Ed25519PrivateKey.generate()
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, REMOTE)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(ca.key, hashes.SHA256())
    )
    (organization,) = await network.a_own.search(
        "Organization", [("identifier", f"{ORGANIZATION_IDENTIFIER_SYSTEM}|{REMOTE}")]
    )
    organization["extension"].append(
        {"url": THUMBPRINT_EXTENSION, "valueString": thumbprint(certificate)}
    )
    await network.a_own.update(organization)
    await publish_certificate(network.b_own, certificate.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(RecipientKeyError, match=r"cannot be encrypted for: .*only sign"):
        await recipient_certificate(network.a_at_b, network.a_own, REMOTE)
