"""The OMI adapters through the site's forward proxy (``[proxy]``): the inference server, the
OMI registry and DICOMweb (http targets forwarded, an https archive tunnelled with mutual TLS),
hosts that bypass it, and no proxy from the environment.

The servers are tiny loopback stand-ins answering fixed JSON: what is tested is the route.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from dsf_bridge.omi.dicomweb import DicomWebArchive
from dsf_bridge.omi.inference import HttpInferenceClient
from dsf_bridge.omi.registry import FhirRegistryClient
from dsf_bridge.proxy import ForwardProxy
from dsf_bridge.retry import RetryPolicy
from dsf_bridge.sandbox.certs import CertificateAuthority
from tests.forward_proxy import ForwardProxyServer, ProxiedRequest

NO_RETRY = RetryPolicy(attempts=1, initial_delay=0, max_delay=0, retry_after_cap=0)
SERIES = [
    {"0020000E": {"vr": "UI", "Value": ["1.2.3.4"]}, "00080060": {"vr": "CS", "Value": ["CT"]}}
]


def _answer(path: str) -> tuple[str, bytes]:
    if path.startswith("/v2/health/ready"):
        return "application/json", b"{}"
    if path.startswith("/fhir/HealthcareService"):
        bundle = {"resourceType": "Bundle", "type": "searchset", "entry": []}
        return "application/fhir+json", json.dumps(bundle).encode()
    return "application/dicom+json", json.dumps(SERIES).encode()


@contextlib.asynccontextmanager
async def _server(context: ssl.SSLContext | None = None) -> AsyncIterator[tuple[int, list[str]]]:
    """A loopback HTTP(S) server answering every request 200 with fixed JSON; yields its port
    and the paths it was asked for."""
    paths: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ssl.SSLError):
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            paths.append(path)
            content_type, body = _answer(path)
            writer.write(
                f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1], paths
    finally:
        server.close()
        await server.wait_closed()


async def _inference(url: str, proxy: ForwardProxy | None) -> None:
    async with HttpInferenceClient(url, retry=NO_RETRY, proxy=proxy) as client:
        assert await client.server_ready()


async def _registry(url: str, proxy: ForwardProxy | None) -> None:
    async with FhirRegistryClient(f"{url}/fhir", proxy=proxy) as client:
        assert await client.find_services() == []


async def _dicomweb(url: str, proxy: ForwardProxy | None) -> None:
    archive = DicomWebArchive(f"{url}/dicom-web", retry=NO_RETRY, proxy=proxy)
    try:
        [series] = await archive.search_series("1.2.3")
    finally:
        archive.close()
    assert series.series_instance_uid == "1.2.3.4"


CALLS: dict[str, Callable[[str, ForwardProxy | None], Awaitable[None]]] = {
    "inference": _inference,
    "registry": _registry,
    "dicomweb": _dicomweb,
}


@pytest.mark.parametrize("call", sorted(CALLS))
async def test_http_calls_are_forwarded_by_the_proxy(call: str) -> None:
    async with _server() as (port, paths), ForwardProxyServer() as proxy:
        await CALLS[call](f"http://127.0.0.1:{port}", ForwardProxy(proxy.url))
    assert paths
    assert proxy.seen
    assert all(seen.target.startswith(f"http://127.0.0.1:{port}/") for seen in proxy.seen)


@pytest.mark.parametrize("call", sorted(CALLS))
async def test_a_loopback_server_bypasses_the_default_no_proxy(call: str) -> None:
    # The default [proxy] no_proxy: a local inference server or archive is reached directly.
    async with _server() as (port, paths), ForwardProxyServer() as proxy:
        proxied = ForwardProxy(proxy.url, no_proxy=("localhost", "127.0.0.1", "::1"))
        await CALLS[call](f"http://127.0.0.1:{port}", proxied)
    assert paths
    assert proxy.seen == []


@pytest.mark.parametrize("call", sorted(CALLS))
async def test_the_proxy_environment_is_not_read(
    call: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _server() as (port, paths), ForwardProxyServer() as proxy:
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"):
            monkeypatch.setenv(name, proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        await CALLS[call](f"http://127.0.0.1:{port}", None)
    assert paths
    assert proxy.seen == []


async def test_an_https_archive_through_a_connect_tunnel_with_mutual_tls(tmp_path: Path) -> None:
    ca = CertificateAuthority("OMI proxy test CA")
    ca.write(tmp_path / "ca.pem")
    ca.issue_server("localhost").write(tmp_path / "server.pem", tmp_path / "server.key")
    ca.issue_client("providing-site").write(tmp_path / "client.pem", tmp_path / "client.key")
    server_context = ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.pem")
    )
    server_context.verify_mode = ssl.CERT_REQUIRED  # no client certificate, no answer
    server_context.load_cert_chain(str(tmp_path / "server.pem"), str(tmp_path / "server.key"))
    client_context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    client_context.load_cert_chain(str(tmp_path / "client.pem"), str(tmp_path / "client.key"))

    async with _server(server_context) as (port, paths), ForwardProxyServer() as proxy:
        archive = DicomWebArchive(
            f"https://localhost:{port}/dicom-web",
            ssl_context=client_context,
            retry=NO_RETRY,
            proxy=ForwardProxy(proxy.url),
        )
        try:
            [series] = await archive.search_series("1.2.3")
        finally:
            archive.close()
    assert series.series_instance_uid == "1.2.3.4"
    assert paths and paths[0].startswith("/dicom-web/studies/1.2.3/series")
    assert proxy.seen == [ProxiedRequest("CONNECT", f"localhost:{port}", None)]
