"""The certificate a site encrypts for: published on its own DSF FHIR server, found and checked
by the sender.

Like the MII data-transfer plugin's ``KeyProvider``, each site publishes a ``Bundle`` (type
``collection``, read-access tag ``ALL``) on its own DSF FHIR server: a ``DocumentReference``
whose attachment names the ``Binary`` by ``urn:uuid`` and carries its SHA-256, and the
``Binary`` itself. Unlike MII, what is published is the site's DSF **client certificate** (PEM)
rather than a bare key, so a sender can check what MII cannot: that its SHA-512 thumbprint is
one of the recipient Organization's thumbprints in the sender's own copy of the allow list
(the ``extension-certificate-thumbprint`` of that Organization on the *local* server), that it
is valid now, and that its key is one DSF's Kem can encrypt for. A remote server that served
another certificate could therefore not make the sender encrypt for a key outside the allow
list. Bundle identifier: :data:`CERTIFICATE_IDENTIFIER_SYSTEM` |
:data:`CERTIFICATE_IDENTIFIER_VALUE`.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import uuid
from collections.abc import Callable
from typing import Any

import structlog
from cryptography import x509

from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.crypto import CryptoError, certificate_public_key
from dsf_bridge.dsf.identity import thumbprint
from dsf_bridge.dsf.vocabulary import (
    ORGANIZATION_IDENTIFIER_SYSTEM,
    READ_ACCESS_TAG_SYSTEM,
    THUMBPRINT_EXTENSION,
)
from dsf_bridge.errors import BridgeError

__all__ = [
    "CERTIFICATE_IDENTIFIER_SYSTEM",
    "CERTIFICATE_IDENTIFIER_VALUE",
    "CERTIFICATE_MEDIA_TYPE",
    "CertificatePublicationError",
    "RecipientKeyError",
    "certificate_bundle",
    "publish_certificate",
    "recipient_certificate",
]

_log = structlog.get_logger()

CERTIFICATE_IDENTIFIER_SYSTEM = "http://dsf-bridge.dev/fhir/NamingSystem/encryption-certificate"
CERTIFICATE_IDENTIFIER_VALUE = "dsf-client-certificate"
CERTIFICATE_MEDIA_TYPE = "application/pem-certificate-chain"
_IDENTIFIER = f"{CERTIFICATE_IDENTIFIER_SYSTEM}|{CERTIFICATE_IDENTIFIER_VALUE}"


class CertificatePublicationError(BridgeError):
    """The site's own certificate cannot be published (unreadable PEM, several Bundles)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class RecipientKeyError(BridgeError):
    """No certificate of the recipient organization can be encrypted for; never retryable
    (an administrator must act: publish, renew, or update the allow list)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


def _parse_pem(data: bytes, describe: str, error: Callable[[str], BridgeError]) -> x509.Certificate:
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise error(f"{describe} is not a PEM certificate: {exc}") from exc
    return chain[0]  # the leaf first, as in a TLS chain file


def certificate_bundle(certificate_pem: bytes, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """The collection Bundle that publishes ``certificate_pem`` (see the module docstring)."""
    binary_id, document_id = str(uuid.uuid4()), str(uuid.uuid4())
    stamp = (now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds")
    identifier = {"system": CERTIFICATE_IDENTIFIER_SYSTEM, "value": CERTIFICATE_IDENTIFIER_VALUE}
    digest = base64.b64encode(hashlib.sha256(certificate_pem).digest()).decode()
    return {
        "resourceType": "Bundle",
        "meta": {"tag": [{"system": READ_ACCESS_TAG_SYSTEM, "code": "ALL"}]},
        "identifier": identifier,
        "type": "collection",
        "timestamp": stamp,
        "entry": [
            {
                "fullUrl": f"urn:uuid:{document_id}",
                "resource": {
                    "resourceType": "DocumentReference",
                    "masterIdentifier": identifier,
                    "status": "current",
                    "docStatus": "final",
                    "date": stamp,
                    "content": [
                        {
                            "attachment": {
                                "contentType": CERTIFICATE_MEDIA_TYPE,
                                "url": f"urn:uuid:{binary_id}",
                                "hash": digest,
                            }
                        }
                    ],
                },
            },
            {
                "fullUrl": f"urn:uuid:{binary_id}",
                "resource": {
                    "resourceType": "Binary",
                    "contentType": CERTIFICATE_MEDIA_TYPE,
                    "data": base64.b64encode(certificate_pem).decode(),
                },
            },
        ],
    }


def _published_pem(bundle: dict[str, Any], where: str) -> bytes:
    """The certificate PEM of a published Bundle, after the DocumentReference's hash matched."""
    entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict)]
    by_type: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for entry in entries:
        resource = entry.get("resource")
        if isinstance(resource, dict):
            by_type.setdefault(str(resource.get("resourceType")), []).append(
                (str(entry.get("fullUrl")), resource)
            )
    documents = [resource for _, resource in by_type.get("DocumentReference", [])]
    binaries = dict(by_type.get("Binary", []))
    if len(documents) != 1 or len(binaries) != 1:
        raise RecipientKeyError(
            f"the certificate Bundle {where} does not hold one DocumentReference and one "
            "Binary; it was not published by dsf-bridge"
        )
    attachment = ((documents[0].get("content") or [{}])[0] or {}).get("attachment") or {}
    binary = binaries.get(str(attachment.get("url")))
    if not isinstance(binary, dict):
        raise RecipientKeyError(
            f"the DocumentReference of the certificate Bundle {where} names no Binary of it"
        )
    try:
        pem = base64.b64decode(str(binary.get("data", "")), validate=True)
    except ValueError as exc:
        raise RecipientKeyError(f"the certificate Binary {where} is not base64") from exc
    expected = attachment.get("hash")
    if base64.b64encode(hashlib.sha256(pem).digest()).decode() != expected:
        raise RecipientKeyError(
            f"the certificate Binary {where} does not match the SHA-256 its DocumentReference "
            "gives; the Bundle was altered"
        )
    return pem


async def publish_certificate(client: FhirClient, certificate_pem: bytes) -> None:
    """Publish the site's client certificate on its own DSF FHIR server (``client``).

    Idempotent: nothing is written when the same certificate (same DER) is published already;
    a changed one (a renewed certificate) replaces the Bundle's content under the same id."""
    ours = _parse_pem(certificate_pem, "the certificate to publish", CertificatePublicationError)
    found = await client.search("Bundle", [("identifier", _IDENTIFIER)])
    if len(found) > 1:
        raise CertificatePublicationError(
            f"{client.base_url} holds {len(found)} Bundles with identifier {_IDENTIFIER}; "
            "delete all but one, then start again"
        )
    if not found:
        await client.create(
            certificate_bundle(certificate_pem), if_none_exist=f"identifier={_IDENTIFIER}"
        )
        _log.info("certificate.published", thumbprint=thumbprint(ours))
        return
    existing = found[0]
    where = f"Bundle/{existing.get('id')} on {client.base_url}"
    try:
        published = _parse_pem(_published_pem(existing, where), where, RecipientKeyError)
    except RecipientKeyError:
        published = None  # unreadable: replace it
    if published == ours:
        return
    bundle = certificate_bundle(certificate_pem)
    bundle["id"] = existing["id"]
    version = (existing.get("meta") or {}).get("versionId")
    await client.update(bundle, if_match=int(version) if version else None)
    _log.info("certificate.replaced", thumbprint=thumbprint(ours))


async def _allowed_thumbprints(local: FhirClient, organization_identifier: str) -> set[str]:
    organizations = await local.search(
        "Organization",
        [("identifier", f"{ORGANIZATION_IDENTIFIER_SYSTEM}|{organization_identifier}")],
    )
    active = [o for o in organizations if o.get("active", True) is not False]
    if not active:
        raise RecipientKeyError(
            f"organization {organization_identifier} is not an active Organization of the "
            f"allow list on {local.base_url}; nothing can be encrypted for it"
        )
    return {
        str(extension["valueString"]).lower()
        for organization in active
        for extension in organization.get("extension") or []
        if extension.get("url") == THUMBPRINT_EXTENSION and extension.get("valueString")
    }


async def recipient_certificate(
    remote: FhirClient,
    local: FhirClient,
    organization_identifier: str,
    *,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """The certificate to encrypt for ``organization_identifier``: published on its DSF FHIR
    server (``remote``), bound to it by a thumbprint in the local allow list (``local``),
    valid ``now``, with a key DSF's Kem supports. :class:`RecipientKeyError` says which check
    failed and who can fix it."""
    found = await remote.search("Bundle", [("identifier", _IDENTIFIER)])
    if not found:
        raise RecipientKeyError(
            f"organization {organization_identifier} has published no encryption certificate "
            f"on {remote.base_url} (Bundle with identifier {_IDENTIFIER}); its dsf-bridge "
            "publishes one when it starts"
        )
    if len(found) > 1:
        raise RecipientKeyError(
            f"{remote.base_url} holds {len(found)} certificate Bundles; organization "
            f"{organization_identifier} must delete all but one"
        )
    where = f"Bundle/{found[0].get('id')} on {remote.base_url}"
    certificate = _parse_pem(_published_pem(found[0], where), where, RecipientKeyError)
    printed = thumbprint(certificate)
    allowed = await _allowed_thumbprints(local, organization_identifier)
    if printed not in allowed:
        raise RecipientKeyError(
            f"the certificate published in {where} (thumbprint {printed}) is not one of "
            f"organization {organization_identifier}'s thumbprints in the allow list; "
            "refusing to encrypt for it. If that organization renewed its certificate, the "
            "allow list must be updated first"
        )
    moment = now or dt.datetime.now(dt.UTC)
    if not certificate.not_valid_before_utc <= moment <= certificate.not_valid_after_utc:
        raise RecipientKeyError(
            f"the certificate of organization {organization_identifier} (thumbprint {printed}) "
            f"is valid from {certificate.not_valid_before_utc.isoformat()} to "
            f"{certificate.not_valid_after_utc.isoformat()}, not now; it must publish a "
            "current one"
        )
    try:
        certificate_public_key(certificate)
    except CryptoError as exc:
        raise RecipientKeyError(
            f"the certificate of organization {organization_identifier} (thumbprint {printed}) "
            f"cannot be encrypted for: {exc.message}"
        ) from exc
    return certificate
