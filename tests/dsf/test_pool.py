"""The pool's check of idle connections (``dsf_bridge.dsf.pool``), on real loopback sockets,
plain and TLS: a connection the server keeps open is used again, one the server closed while
it was idle is dropped before a request goes out on it (the request then succeeds on a new
one)."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import httpcore
import httpx
import pytest

from dsf_bridge.dsf import pool
from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.sandbox.certs import CertificateAuthority

_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 2\r\n\r\n{}"


@dataclass
class _Server:
    """Answers every request with ``{}``; ``close_after_answer``: then closes the connection
    without saying so (no ``Connection: close``), as a server's keep-alive expiry does."""

    close_after_answer: bool
    connections: int = 0
    requests: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                self.requests += 1
                writer.write(_ANSWER)
                await writer.drain()
                if self.close_after_answer:
                    # A moment later, as an expiring keep-alive does: a close that came with
                    # the answer would be read (over TLS) with it, and no pool sees it coming.
                    await asyncio.sleep(0.05)
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


def _contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for localhost, and a client context trusting it."""
    authority = CertificateAuthority()
    authority.issue_server("localhost").write(tmp_path / "server.pem", tmp_path / "key.pem")
    authority.write(tmp_path / "ca.pem")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "server.pem", tmp_path / "key.pem")
    return server, ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))


@pytest.mark.parametrize("close_after_answer", [False, True])
async def test_an_idle_connection_is_used_again_unless_the_server_closed_it(
    tmp_path: Path, close_after_answer: bool
) -> None:
    for scheme in ("http", "https"):
        server_context, client_context = _contexts(tmp_path) if scheme == "https" else (None, None)
        handler = _Server(close_after_answer)
        server = await asyncio.start_server(handler.serve, "127.0.0.1", 0, ssl=server_context)
        port = server.sockets[0].getsockname()[1]
        # httpx on its own: no retry hides a request sent on a connection the server closed.
        transport = pool.install(httpx.AsyncHTTPTransport(verify=client_context or True))
        try:
            async with httpx.AsyncClient(
                transport=transport, base_url=f"{scheme}://localhost:{port}"
            ) as client:
                first = (await client.get("/fhir/Task")).json()
                await asyncio.sleep(0.3)  # the close reaches the client's socket
                second = (await client.get("/fhir/Task")).json()
        finally:
            server.close()
            for writer in handler.writers:
                writer.close()
            await server.wait_closed()
        assert (first, second) == ({}, {})
        assert handler.requests == 2
        # Kept open: one connection for both; closed while idle: a new one for the second,
        # with no request lost on the dead one.
        assert handler.connections == (2 if close_after_answer else 1), scheme


async def test_the_fhir_client_pools_connections_with_it() -> None:
    async with FhirClient("https://localhost:1/fhir") as client:
        for http in (client._http, client._bulk):
            assert pool.installed(http._transport)  # type: ignore[arg-type]


def test_install_wraps_a_transport_once_and_leaves_one_it_does_not_know() -> None:
    transport = httpx.AsyncHTTPTransport()
    assert pool.install(transport) is transport
    assert pool.installed(transport)
    backend = transport._pool._network_backend
    assert pool.install(transport) is transport  # twice: wrapped once
    assert transport._pool._network_backend is backend
    mocked = httpx.MockTransport(lambda request: httpx.Response(200))
    pool.install(mocked)  # type: ignore[arg-type]
    assert not pool.installed(mocked)  # type: ignore[arg-type]


async def test_a_stream_without_a_socket_answers_for_itself() -> None:
    # httpcore's mock stream has no socket and says nothing of being readable: the connection
    # is not taken for closed (it would never be used again).
    answer = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"]
    backend = pool._Backend(httpcore.AsyncMockBackend(answer * 2))
    stream = await backend.connect_tcp("localhost", 443)
    assert stream.get_extra_info("is_readable") is None
    async with httpcore.AsyncConnectionPool(network_backend=backend) as connections:
        for _ in range(2):
            response = await connections.request("GET", "http://localhost/fhir/Task")
            assert response.content == b"{}"
        assert len(connections.connections) == 1
