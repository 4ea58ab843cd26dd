"""DICOMweb over mutual TLS with the same kind of ssl.SSLContext the DSF side uses.

Debian's Orthanc 1.10.1 crashes (SIGSEGV) on its first HTTPS connection, so, as sites usually
deploy it, the real Orthanc sits behind a TLS terminator: a loopback proxy that demands a client
certificate of the sandbox CA and forwards the bytes to Orthanc's HTTP port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from pydicom.dataset import Dataset

from dsf_bridge.omi.dicomweb import ArchiveUnavailableError, DicomWebArchive
from dsf_bridge.retry import RetryPolicy
from dsf_bridge.sandbox.certs import CertificateAuthority
from dsf_bridge.sandbox.components import OrthancProcess


@dataclass(frozen=True)
class TlsFront:
    dicomweb_url: str
    directory: Path
    handshakes: list[str]

    def context(self, *, ca: str = "ca.pem", client: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.directory / ca))
        if client:
            context.load_cert_chain(
                str(self.directory / "client.pem"), str(self.directory / "client.key")
            )
        return context


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            writer.close()


@pytest.fixture
async def tls_front(orthanc: OrthancProcess, tmp_path: Path) -> AsyncIterator[TlsFront]:
    ca = CertificateAuthority("OMI test CA")
    ca.write(tmp_path / "ca.pem")
    server = ca.issue_server("localhost")
    server.write(tmp_path / "server.pem", tmp_path / "server.key")
    ca.issue_client("requesting-site").write(tmp_path / "client.pem", tmp_path / "client.key")
    server_context = ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.pem")
    )
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.load_cert_chain(str(tmp_path / "server.pem"), str(tmp_path / "server.key"))
    upstream = urlsplit(orthanc.base_url)
    handshakes: list[str] = []

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert") or {}
        handshakes.append(dict(item[0] for item in peer.get("subject", ())).get("commonName", ""))
        up_reader, up_writer = await asyncio.open_connection(upstream.hostname, upstream.port)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    proxy = await asyncio.start_server(forward, "127.0.0.1", 0, ssl=server_context)
    port = proxy.sockets[0].getsockname()[1]
    try:
        yield TlsFront(f"https://localhost:{port}/dicom-web", tmp_path, handshakes)
    finally:
        proxy.close()
        await proxy.wait_closed()


async def test_store_and_retrieve_over_mutual_tls(tls_front: TlsFront, ct_small: Dataset) -> None:
    archive = DicomWebArchive(
        tls_front.dicomweb_url, ssl_context=tls_front.context(), retry=RetryPolicy(attempts=1)
    )
    try:
        await archive.store([ct_small])
        [dataset] = await archive.retrieve_study(str(ct_small.StudyInstanceUID))
    finally:
        archive.close()
    assert dataset.SOPInstanceUID == ct_small.SOPInstanceUID
    assert "requesting-site" in tls_front.handshakes


async def test_without_client_certificate_the_archive_refuses(tls_front: TlsFront) -> None:
    context = tls_front.context(client=False)
    archive = DicomWebArchive(
        tls_front.dicomweb_url, ssl_context=context, retry=RetryPolicy(attempts=1), timeout=5
    )
    try:
        with pytest.raises(ArchiveUnavailableError, match="cannot be reached"):
            await archive.search_series("1.2.3")
    finally:
        archive.close()
    assert "requesting-site" not in tls_front.handshakes


async def test_an_untrusted_server_is_refused(tls_front: TlsFront) -> None:
    CertificateAuthority("someone else").write(tls_front.directory / "other-ca.pem")
    context = tls_front.context(ca="other-ca.pem")
    archive = DicomWebArchive(
        tls_front.dicomweb_url, ssl_context=context, retry=RetryPolicy(attempts=1), timeout=5
    )
    try:
        with pytest.raises(ArchiveUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
            await archive.search_series("1.2.3")
    finally:
        archive.close()
