"""A sandbox site's :class:`~dsf_bridge.plugins.transfer.TransferSite` for tests that call the
transfer functions directly (the bridges build theirs in ``runtime/transfers.py``)."""

from __future__ import annotations

from dsf_bridge.dsf.certificates import publish_certificate
from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.crypto import decryption_key
from dsf_bridge.dsf.identity import build_ssl_context, load_identity
from dsf_bridge.plugins.transfer import PseudonymStore, TransferSite
from dsf_bridge.sandbox.demo import InferenceNetwork


def transfer_site(
    network: InferenceNetwork,
    organization: str,
    clients: list[FhirClient],
    pseudonyms: PseudonymStore | None = None,
) -> TransferSite:
    """``organization``'s transfer service with its sandbox identity; every FHIR client it
    opens is appended to ``clients`` for the test to close."""
    files = network.sites[organization]
    identity = load_identity(files.client_certificate, files.client_key)
    context = build_ssl_context(identity, [files.ca])

    def client(url: str) -> FhirClient:
        opened = FhirClient(url, ssl_context=context)
        clients.append(opened)
        return opened

    return TransferSite(
        local=client(files.base_url),
        remote=client,
        private_key=decryption_key(identity.key),
        certificate=identity.certificate,
        local_organization=organization,
        pseudonyms=pseudonyms,
    )


async def publish_certificates(network: InferenceNetwork, *organizations: str) -> None:
    """Each organization's encryption certificate on its own server, as its bridge publishes
    it at start-up (for sites that run no bridge in the test)."""
    for organization in organizations:
        async with network.client(organization) as client:
            pem = network.sites[organization].client_certificate.read_bytes()
            await publish_certificate(client, pem)
