"""Studies and results cross sites the way DSF moves data (issue 13, ``docs/privacy.md``).

The sender packages a series (:mod:`dsf_bridge.omi.package`), encrypts the package for the
recipient organization's certificate (:mod:`dsf_bridge.dsf.crypto`, DSF API v2's KEM format;
the certificate found with :func:`~dsf_bridge.dsf.certificates.recipient_certificate`, which
checks it against the recipient's thumbprints in the allow list), and stores it as a
``Binary`` on its *own* DSF FHIR server. The Binary's security context is a
``DocumentReference`` tagged readable by the local and the recipient organization only, so the
DSF FHIR server gives it to nobody else (DSF copies the security context's read access to the
Binary, ``on_binaries_insert.sql``). The recipient downloads it over DSF mutual TLS, streamed
and size-limited, decrypts it into a file, and uses it only after the GCM tag verified.

Files live in a temporary directory per step (``[omi] transfer_dir``), removed when the step
ends; nothing of a study is held in memory as a whole on the way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime as dt
import hashlib
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlsplit

import structlog
from cryptography import x509
from pydicom.dataset import Dataset

from dsf_bridge.dsf.certificates import recipient_certificate
from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.crypto import (
    KemPrivateKey,
    StreamDecryptor,
    certificate_public_key,
    encrypt_to,
)
from dsf_bridge.dsf.endpoints import resolve_target
from dsf_bridge.dsf.vocabulary import READ_ACCESS_TAG_SYSTEM
from dsf_bridge.errors import BridgeError, RemoteError
from dsf_bridge.omi.dicomweb import DicomWebArchive, DicomWebError, SeriesInfo
from dsf_bridge.omi.package import PackageManifest, PackageReader, PackageWriter
from dsf_bridge.omi.pseudonymize import Pseudonymizer

__all__ = [
    "RESULT_SERIES",
    "SERVICE_TRANSFER",
    "CopiedSeries",
    "PackagedSeries",
    "PseudonymStore",
    "PublishedPackage",
    "ReceivedPackage",
    "TransferError",
    "TransferSite",
    "copy_series",
    "encryption_certificate",
    "package_datasets",
    "package_series",
    "publish_package",
    "receive_package",
    "restore_identity",
    "series_info",
    "sweep_packages",
    "uids_in",
    "withdraw_package",
]

log = structlog.get_logger("dsf_bridge.plugins.transfer")

#: Service name of the site's :class:`TransferSite` (the daemon provides it).
SERVICE_TRANSFER = "omi.transfer"
#: Series a result package may hold: the SEG's and its DICOM SR measurement report's.
RESULT_SERIES = 2

#: Identifies the DocumentReference of a package by the process instance and its role.
TRANSFER_IDENTIFIER_SYSTEM = "http://dsf-bridge.dev/fhir/NamingSystem/transfer"
_READ_ACCESS_ORGANIZATION_EXTENSION = (
    "http://dsf.dev/fhir/StructureDefinition/extension-read-access-organization"
)
_ORGANIZATION_IDENTIFIER_SYSTEM = "http://dsf.dev/sid/organization-identifier"
_CHUNK = 1 << 20
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_VERSION = re.compile(r"[1-9][0-9]{0,17}")
PACKAGE_MEDIA_TYPE = "application/octet-stream"


class TransferError(BridgeError):
    """A package could not be made, sent, received or verified."""


class PseudonymStore(Protocol):
    """The site's mapping of original and replacement UIDs (its own SQL store)."""

    async def record(self, original_study_uid: str, uids: Mapping[str, str]) -> None: ...

    async def originals(self, replaced: list[str], *, study: str | None = None) -> dict[str, str]:
        """Replacement -> original for the replacements this site made; with ``study``, only
        those it made when it sent that (original) study."""
        ...


@dataclass
class TransferSite:
    """What the transfer needs of the site: its FHIR clients, key and certificate, the
    pseudonymizer and its mapping store, and the limits of ``[omi]``."""

    local: FhirClient
    remote: Callable[[str], FhirClient]
    # None: the site's client key cannot decrypt (an Ed25519 key only signs); it sends only.
    private_key: KemPrivateKey | None
    certificate: x509.Certificate
    local_organization: str
    pseudonymizer: Pseudonymizer | None = None
    pseudonyms: PseudonymStore | None = None
    directory: Path | None = None
    max_bytes: int = 4 << 30
    max_instances: int = 10_000

    @contextlib.contextmanager
    def workspace(self) -> Iterator[Path]:
        """A private directory for one step's files, removed when the step ends."""
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="dsf-bridge-transfer-", dir=self.directory))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    async def client_of(self, organization: str) -> FhirClient:
        """A client for ``organization``'s DSF FHIR server (its active Endpoint in the allow
        list), with this site's mutual TLS identity."""
        target = await resolve_target(self.local, {"organizationIdentifier": organization})
        return self.remote(target.address)


@dataclass
class PackagedSeries:
    """A series written as a package: its manifest and, for a pseudonymized copy, the UIDs it
    replaced (original -> replacement)."""

    path: Path
    manifest: PackageManifest
    uids: dict[str, str] = field(default_factory=dict)
    original_study_uid: str | None = None


@dataclass(frozen=True)
class PublishedPackage:
    """A package stored on the local DSF FHIR server for one recipient."""

    binary_url: str
    document_reference: str
    encrypted_bytes: int
    seconds: float


@dataclass(frozen=True)
class ReceivedPackage:
    """A package downloaded, decrypted and ready to read (the tag verified)."""

    path: Path
    encrypted_bytes: int
    seconds: float


async def package_series(
    archive: DicomWebArchive,
    study_instance_uid: str,
    series_instance_uid: str,
    target: Path,
    *,
    pseudonymizer: Pseudonymizer | None,
    max_instances: int,
) -> PackagedSeries:
    """Write one series of ``archive`` into a package at ``target``, each instance
    pseudonymized on the way when ``pseudonymizer`` is given (one instance in memory at a
    time: WADO-RS read as a stream). A stream that breaks (the archive away, a timeout) is read
    again from the start, as often as the archive's retry policy says."""
    policy = archive.retry
    for attempt in range(1, policy.attempts + 1):
        try:
            return await _package_once(
                archive,
                study_instance_uid,
                series_instance_uid,
                target,
                pseudonymizer=pseudonymizer,
                max_instances=max_instances,
            )
        except DicomWebError as exc:
            if not exc.retryable or attempt == policy.attempts:
                raise
            log.warning("transfer.stream_retried", attempt=attempt, status=exc.status)
            await asyncio.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


async def _package_once(
    archive: DicomWebArchive,
    study_instance_uid: str,
    series_instance_uid: str,
    target: Path,
    *,
    pseudonymizer: Pseudonymizer | None,
    max_instances: int,
) -> PackagedSeries:
    uids: dict[str, str] = {}
    count = 0
    # The writer is closed on every way out (a refused instance included): an open ZIP would
    # try to finish itself later on a closed file.
    with target.open("wb") as file, PackageWriter(file) as writer:

        def handle(instance: Dataset) -> None:
            nonlocal count
            count += 1
            if count > max_instances:
                raise TransferError(
                    f"the series has more than {max_instances} instances, the most one package "
                    "may hold ([omi] max_package_instances)",
                    retryable=False,
                )
            if pseudonymizer is None:
                writer.add(instance)
                return
            copy = pseudonymizer.pseudonymize(instance)
            uids.update(copy.uids)
            writer.add(copy.dataset)

        await archive.each_instance(study_instance_uid, series_instance_uid, handle)
        manifest = await asyncio.to_thread(writer.close)
    return PackagedSeries(
        path=target,
        manifest=manifest,
        uids=uids,
        original_study_uid=study_instance_uid if pseudonymizer is not None else None,
    )


def package_datasets(
    datasets: list[Dataset], target: Path, *, max_series: int = 1
) -> PackageManifest:
    """Write ``datasets`` (a result: a SEG, with ``max_series`` = :data:`RESULT_SERIES` its
    SR too) into a package at ``target``."""
    with target.open("wb") as file, PackageWriter(file, max_series=max_series) as writer:
        for dataset in datasets:
            writer.add(dataset)
        return writer.close()


async def _chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as file:
        while chunk := await asyncio.to_thread(file.read, _CHUNK):
            yield chunk


def _encrypt(source: Path, target: Path, certificate: x509.Certificate) -> int:
    with source.open("rb") as plain, target.open("wb") as sealed:
        return encrypt_to(plain, sealed, certificate_public_key(certificate))


def _sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.digest()


async def encryption_certificate(site: TransferSite, recipient: str) -> x509.Certificate:
    """``recipient``'s certificate to encrypt for: published on its DSF FHIR server, one of
    its thumbprints in this site's allow list
    (:func:`~dsf_bridge.dsf.certificates.recipient_certificate`)."""
    remote = await site.client_of(recipient)
    return await recipient_certificate(remote, site.local, recipient)


async def publish_package(
    site: TransferSite,
    package: Path,
    *,
    recipient: str,
    transfer_id: str,
    title: str,
    certificate: x509.Certificate | None = None,
) -> PublishedPackage:
    """Encrypt ``package`` for ``recipient`` (an organization identifier; its
    :func:`encryption_certificate` unless given) and store it on the local DSF FHIR server,
    readable by the local and the recipient organization only.

    The DocumentReference (identified by ``transfer_id``, created once even when the step
    runs again) is the Binary's security context and says what it holds: size and SHA-256
    of the encrypted bytes, the Binary's URL."""
    started = time.monotonic()
    if certificate is None:
        certificate = await encryption_certificate(site, recipient)
    sealed = package.with_suffix(".sealed")
    size = await asyncio.to_thread(_encrypt, package, sealed, certificate)
    digest = await asyncio.to_thread(_sha256, sealed)
    document: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "meta": {
            "tag": [
                {"system": READ_ACCESS_TAG_SYSTEM, "code": "LOCAL"},
                {
                    "system": READ_ACCESS_TAG_SYSTEM,
                    "code": "ORGANIZATION",
                    "extension": [
                        {
                            "url": _READ_ACCESS_ORGANIZATION_EXTENSION,
                            "valueIdentifier": {
                                "system": _ORGANIZATION_IDENTIFIER_SYSTEM,
                                "value": recipient,
                            },
                        }
                    ],
                },
            ]
        },
        "masterIdentifier": {"system": TRANSFER_IDENTIFIER_SYSTEM, "value": transfer_id},
        "status": "current",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "description": title,
        "content": [
            {
                "attachment": {
                    "contentType": PACKAGE_MEDIA_TYPE,
                    "size": size,
                    "hash": _base64(digest),
                    "title": title,
                }
            }
        ],
    }
    created = await site.local.create(
        document, if_none_exist=f"identifier={TRANSFER_IDENTIFIER_SYSTEM}|{transfer_id}"
    )
    if created.id is None:
        raise TransferError("the local DSF FHIR server answered a DocumentReference without id")
    context = f"DocumentReference/{created.id}"
    # A DocumentReference found (not created) is an earlier run's of this step, which stopped
    # after its upload but before its process variables were kept: the Binary it names would
    # stay readable by the recipient with nothing left to delete it. It goes first.
    stored = await site.local.read("DocumentReference", created.id)
    earlier = ((stored.get("content") or [{}])[0].get("attachment") or {}).get("url")
    if isinstance(earlier, str) and earlier:
        earlier_id = check_package_url(earlier, site.local.base_url)
        await site.local.delete("Binary", earlier_id)
        await _purge(site.local, "Binary", earlier_id)
        log.info("transfer.earlier_package_withdrawn")
    uploaded = await site.local.upload_binary(
        lambda: _chunks(sealed), content_type=PACKAGE_MEDIA_TYPE, security_context=context
    )
    if uploaded.id is None:
        raise TransferError("the local DSF FHIR server answered the Binary without an id")
    url = f"{site.local.base_url.rstrip('/')}/Binary/{uploaded.id}"
    # The DocumentReference points at its Binary, so that a run of this step that broke
    # between upload and process variables is cleaned up by the next run (above). Only a stop
    # between the upload and this update leaves a Binary nothing names (docs/privacy.md).
    stored["content"][0]["attachment"]["url"] = url
    await site.local.update(stored)
    seconds = time.monotonic() - started
    log.info("transfer.published", bytes=size, seconds=round(seconds, 3), recipient=recipient)
    return PublishedPackage(
        binary_url=url, document_reference=context, encrypted_bytes=size, seconds=seconds
    )


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def check_package_url(url: str, server: str) -> str:
    """The Binary id of ``url`` when it is a Binary on ``server`` (the sender organization's
    DSF FHIR server from the allow list); a package is never fetched from anywhere else."""
    base = server.rstrip("/") + "/"
    if not url.startswith(base):
        raise TransferError(
            f"the package {url} is not on the sender's DSF FHIR server {server} (allow list)",
            retryable=False,
        )
    rest = url[len(base) :].split("/")
    # Exactly Binary/<id> or Binary/<id>/_history/<n>, the id a FHIR id: the HTTP client
    # removes dot segments ("Binary/x/../.." is the server's base), and a server may decode
    # %2F or honour ";" parameters, so anything looser could fetch another path.
    if (
        len(rest) not in (2, 4)
        or rest[0] != "Binary"
        or not _FHIR_ID.fullmatch(rest[1])
        or rest[1] in (".", "..")
        or (len(rest) == 4 and (rest[2] != "_history" or not _VERSION.fullmatch(rest[3])))
        or urlsplit(url).query
        or urlsplit(url).fragment
    ):
        raise TransferError(f"the package reference {url} names no Binary", retryable=False)
    return rest[1]


async def receive_package(
    site: TransferSite, url: str, *, sender: str, target: Path
) -> ReceivedPackage:
    """Download the package at ``url`` from ``sender``'s DSF FHIR server, decrypting it into
    ``target`` while it streams; at most ``site.max_bytes``. ``target`` is complete and
    authentic only when this returns (the tag verified); on any error it is removed."""
    started = time.monotonic()
    remote = await site.client_of(sender)
    check_package_url(url, remote.base_url)
    if site.private_key is None:
        raise TransferError(
            "this site's DSF client key cannot decrypt (DSF's KEM takes RSA or EC keys): it "
            "cannot receive packages",
            retryable=False,
        )
    decryptor = StreamDecryptor(site.private_key, max_plaintext_bytes=site.max_bytes)
    file: BinaryIO = target.open("wb")
    try:

        def sink(chunk: bytes) -> None:
            file.write(decryptor.update(chunk))

        size = await remote.download_binary(url, sink, max_bytes=site.max_bytes + 4096)
        file.write(decryptor.finalize())
        file.close()
    except BaseException:
        file.close()
        # Unauthenticated plaintext never stays on disk.
        await asyncio.to_thread(target.unlink, missing_ok=True)
        raise
    seconds = time.monotonic() - started
    log.info("transfer.received", bytes=size, seconds=round(seconds, 3), sender=sender)
    return ReceivedPackage(path=target, encrypted_bytes=size, seconds=seconds)


def open_package(
    site: TransferSite, path: Path, *, max_series: int = 1
) -> tuple[PackageManifest, Callable[[], list[Dataset]]]:
    """The manifest of a received package (checked against the ZIP; at most ``max_series``
    series: one for a study package, :data:`RESULT_SERIES` for a result package) and a loader
    of its instances, each verified against its digest as it is read."""
    limits = {
        "max_instances": site.max_instances,
        "max_bytes": site.max_bytes,
        "max_series": max_series,
    }
    with PackageReader(path, **limits) as reader:
        manifest = reader.manifest

    def load() -> list[Dataset]:
        with PackageReader(path, **limits) as reader:
            return list(reader.instances())

    return manifest, load


def series_info(manifest: PackageManifest) -> SeriesInfo:
    """What QIDO-RS would say of the packaged series."""
    return SeriesInfo(
        series_instance_uid=manifest.series_instance_uid,
        modality=manifest.modality,
        instance_count=manifest.instance_count,
        body_part=manifest.body_part or None,
    )


async def withdraw_package(site: TransferSite, binary_url: str, document_reference: str) -> None:
    """Delete a package this site published (its Binary, then its DocumentReference); gone
    already is fine."""
    binary_id = check_package_url(binary_url, site.local.base_url)
    await site.local.delete("Binary", binary_id)
    # A deleted Binary keeps its versions in DSF's history: gone for good where the server
    # lets this site (DSF's $permanent-delete, a role a site may not have given its bridge).
    purged = await _purge(site.local, "Binary", binary_id)
    kind, _, document_id = document_reference.partition("/")
    if kind == "DocumentReference" and document_id:
        await site.local.delete("DocumentReference", document_id)
    log.info("transfer.withdrawn", purged=purged)


async def _purge(client: FhirClient, resource_type: str, resource_id: str) -> bool:
    try:
        await client.request("POST", f"{resource_type}/{resource_id}/$permanent-delete")
    except RemoteError as exc:
        if exc.retryable:
            raise
        return False  # 401/403 (no role), 404 (purged before): the delete stands
    return True


def uids_in(datasets: list[Dataset]) -> set[str]:
    """Every UID value (VR UI) in ``datasets``, in sequences and file meta information too: what
    a returned result may reference of the study this site sent."""
    found: set[str] = set()

    def walk(dataset: Dataset) -> None:
        for element in dataset:
            if element.VR == "SQ":
                for item in element.value or []:
                    walk(item)
            elif element.VR == "UI" and element.value:
                values = element.value if element.VM > 1 else [element.value]
                found.update(str(value) for value in values if value)

    for dataset in datasets:
        walk(dataset)
        meta = getattr(dataset, "file_meta", None)
        if meta is not None:
            walk(meta)
    return found


# What a result made from the pseudonymized copy says of the patient and the study, put back
# from the original (DICOM Patient, Patient Study and General Study modules): the SEG then
# belongs to the study it is stored in, also for an archive that keys studies by patient.
IDENTITY_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "EthnicGroup",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
)


# Type 2 in the Patient and General Study modules of every IOD (a SEG included): present, if
# need be empty. An original without them leaves them empty rather than removed.
_TYPE_2 = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
    }
)


def restore_identity(result: Dataset, original: Dataset) -> Dataset:
    """``result`` with the patient and study attributes of ``original`` (an instance of the
    study it was made from) in place of the pseudonymized ones; absent there, absent here,
    except that a Type 2 attribute stays present and empty."""
    for keyword in IDENTITY_ATTRIBUTES:
        if keyword in original:
            result[keyword] = copy.deepcopy(original[keyword])
        elif keyword in _TYPE_2 and keyword in result:
            result[keyword].value = None
        elif keyword in result:
            del result[keyword]
    return result


@dataclass
class CopiedSeries:
    """A series copied, pseudonymized, into another archive (an OMI DICOMweb gateway)."""

    study_instance_uid: str
    series_instance_uid: str
    instances: int
    uids: dict[str, str] = field(default_factory=dict)


async def copy_series(
    archive: DicomWebArchive,
    gateway: DicomWebArchive,
    study_instance_uid: str,
    series_instance_uid: str,
    *,
    pseudonymizer: Pseudonymizer,
    max_instances: int,
    record: Callable[[str, Mapping[str, str]], Awaitable[None]],
    batch: int = 16,
) -> CopiedSeries:
    """Stream one series from ``archive``, pseudonymize each instance and store the copies
    into ``gateway`` (STOW-RS, ``batch`` instances per request): the direct DICOMweb pull with
    the same pseudonymization as the way through DSF. At most ``batch`` instances are held;
    the UIDs of each batch are ``record``-ed before it leaves."""
    loop = asyncio.get_running_loop()
    uids: dict[str, str] = {}
    pending: list[Dataset] = []
    replaced: list[tuple[str, str]] = []
    count = 0

    async def store(datasets: list[Dataset]) -> None:
        await record(study_instance_uid, dict(uids))
        await gateway.store(datasets)

    def flush() -> None:
        # From the worker thread that reads the stream: the store runs on the event loop
        # (with its retries) and the thread waits for it.
        asyncio.run_coroutine_threadsafe(store(list(pending)), loop).result()
        pending.clear()

    def handle(instance: Dataset) -> None:
        nonlocal count
        count += 1
        if count > max_instances:
            raise TransferError(
                f"the series has more than {max_instances} instances, the most one copy may "
                "hold ([omi] max_package_instances)",
                retryable=False,
            )
        copy = pseudonymizer.pseudonymize(instance)
        uids.update(copy.uids)
        if not replaced:
            replaced.append(
                (str(copy.dataset.StudyInstanceUID), str(copy.dataset.SeriesInstanceUID))
            )
        pending.append(copy.dataset)
        if len(pending) >= batch:
            flush()

    await archive.each_instance(study_instance_uid, series_instance_uid, handle)
    if pending:
        await store(list(pending))
    [(study, series)] = replaced
    log.info("transfer.copied", instances=count)
    return CopiedSeries(study, series, count, uids)


async def sweep_packages(client: FhirClient, running: Callable[[str], Awaitable[bool]]) -> int:
    """Withdraw the packages this site published whose process instance no longer runs: what
    a stop between an upload and its withdrawal left on the local DSF FHIR server. Each
    package's DocumentReference names its instance (``<business key>/<role>``) and its Binary;
    ``running`` says whether an instance with that business key still runs (its package is
    still in use then). Returns how many were withdrawn; one that fails is logged and left."""
    found: list[dict[str, Any]] = []
    async for page in client.search_pages("DocumentReference", [("_count", "100")]):
        for entry in page.get("entry") or []:
            resource = entry.get("resource") or {}
            identifier = resource.get("masterIdentifier") or {}
            if identifier.get("system") == TRANSFER_IDENTIFIER_SYSTEM and resource.get("id"):
                found.append(resource)
    withdrawn = 0
    for resource in found:
        business_key = str(resource["masterIdentifier"].get("value") or "").rpartition("/")[0]
        if business_key and await running(business_key):
            continue
        url = next(
            (
                str((content.get("attachment") or {}).get("url"))
                for content in resource.get("content") or []
                if (content.get("attachment") or {}).get("url")
            ),
            None,
        )
        try:
            if url is not None:
                binary_id = check_package_url(url, client.base_url)
                await client.delete("Binary", binary_id)
                await _purge(client, "Binary", binary_id)
            await client.delete("DocumentReference", str(resource["id"]))
        except (RemoteError, TransferError) as exc:
            log.warning("transfer.sweep_failed", reason=str(exc))
            continue
        withdrawn += 1
    if withdrawn:
        log.info("transfer.swept", packages=withdrawn)
    return withdrawn
