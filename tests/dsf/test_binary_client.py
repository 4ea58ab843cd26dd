"""``FhirClient``'s Binary transfer against the sandbox over mutual TLS: streamed upload with
``X-Security-Context`` (retried only with a factory), bounded streamed download, delete."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import httpx
import pytest

from dsf_bridge.dsf.client import BinaryTooLargeError, FhirClient
from dsf_bridge.dsf.vocabulary import (
    ORGANIZATION_IDENTIFIER_SYSTEM,
    READ_ACCESS_ORGANIZATION_EXTENSION,
    READ_ACCESS_TAG_SYSTEM,
)
from dsf_bridge.errors import RemoteError
from dsf_bridge.retry import RetryPolicy
from tests.sandbox.harness import FAST_RETRY, LOCAL, REMOTE, Sandbox

MB = 1024 * 1024


async def _security_context(client: FhirClient, reader: str = REMOTE) -> str:
    """A ResearchStudy the local organization and ``reader`` may read."""
    study: dict[str, Any] = {
        "resourceType": "ResearchStudy",
        "status": "active",
        "meta": {
            "tag": [
                {"system": READ_ACCESS_TAG_SYSTEM, "code": "LOCAL"},
                {
                    "system": READ_ACCESS_TAG_SYSTEM,
                    "code": "ORGANIZATION",
                    "extension": [
                        {
                            "url": READ_ACCESS_ORGANIZATION_EXTENSION,
                            "valueIdentifier": {
                                "system": ORGANIZATION_IDENTIFIER_SYSTEM,
                                "value": reader,
                            },
                        }
                    ],
                },
            ]
        },
    }
    created = await client.create(study)
    return f"ResearchStudy/{created.id}"


async def _chunks(total: int, size: int = MB) -> AsyncIterator[bytes]:
    block = bytes(range(256)) * (size // 256)
    sent = 0
    while sent < total:
        piece = block[: min(size, total - sent)]
        sent += len(piece)
        yield piece


def _expected(total: int, size: int = MB) -> bytes:
    block = bytes(range(256)) * (size // 256)
    return (block * (total // size + 1))[:total]


async def test_upload_and_download_round_trip(sandbox: Sandbox) -> None:
    async with sandbox.client(LOCAL) as local, sandbox.client(REMOTE) as remote:
        context = await _security_context(local)
        created = await local.upload_binary(
            lambda: _chunks(3 * MB + 17), content_type="application/zip", security_context=context
        )
        received = bytearray()

        async def sink(chunk: bytes) -> None:
            received.extend(chunk)

        count = await remote.download_binary(
            f"Binary/{created.id}", sink, max_bytes=4 * MB, accept="application/zip"
        )
        again = bytearray()
        absolute = f"{sandbox.base_url}/Binary/{created.id}/_history/1"
        await local.download_binary(absolute, again.extend, max_bytes=4 * MB, accept="*/*")
        # DSF answers 406 when Accept does not fit the stored content type.
        with pytest.raises(RemoteError) as not_acceptable:
            await local.download_binary(absolute, again.extend, max_bytes=4 * MB)
    assert not_acceptable.value.status == 406 and not not_acceptable.value.retryable
    assert created.status == 201 and created.version == 1 and created.resource is None
    assert count == 3 * MB + 17
    assert bytes(received) == _expected(3 * MB + 17) == bytes(again)
    stored = sandbox.server.service.store.read("Binary", str(created.id))
    assert stored is not None and stored["securityContext"] == {"reference": context}


async def test_content_length_above_the_limit_is_refused_before_reading(sandbox: Sandbox) -> None:
    async with sandbox.client(LOCAL) as local:
        context = await _security_context(local)
        created = await local.upload_binary(
            lambda: _chunks(2 * MB),
            content_type="application/octet-stream",
            security_context=context,
        )
        handed: list[bytes] = []
        with pytest.raises(BinaryTooLargeError) as caught:
            await local.download_binary(f"Binary/{created.id}", handed.append, max_bytes=MB)
    assert handed == []
    assert caught.value.retryable is False and caught.value.limit == MB
    assert f"limit of {MB} bytes" in caught.value.message
    assert f"has {2 * MB} bytes" in caught.value.message


async def test_a_stream_without_length_is_cut_at_the_limit() -> None:
    """A server that sends no ``Content-Length`` (DSF 1.9 writes raw Binaries chunked) is cut
    off as soon as the limit is crossed, not after the whole body."""
    produced = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal produced
        while True:
            produced += 64 * 1024
            yield bytes(64 * 1024)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"Content-Type": "application/octet-stream"}, content=endless()
        )

    received = 0

    def sink(chunk: bytes) -> None:
        nonlocal received
        received += len(chunk)

    client = FhirClient("https://dsf.test/fhir", transport=httpx.MockTransport(handler))
    async with client:
        with pytest.raises(BinaryTooLargeError) as caught:
            await client.download_binary("Binary/abc", sink, max_bytes=MB)
    assert received <= MB
    assert produced <= MB + 2 * 64 * 1024
    assert "exceeds the limit of 1048576 bytes" in caught.value.message


async def test_a_download_from_another_server_is_refused(sandbox: Sandbox) -> None:
    async with sandbox.client(LOCAL) as local:
        with pytest.raises(RemoteError, match="leaves the server"):
            await local.download_binary(
                "https://elsewhere.test/fhir/Binary/x", lambda _c: None, max_bytes=MB
            )
        with pytest.raises(ValueError, match="neither an absolute URL nor a Binary"):
            await local.download_binary("Task/x", lambda _c: None, max_bytes=MB)


async def test_a_third_party_gets_403_and_not_the_bytes(sandbox: Sandbox) -> None:
    """The security context admits Site_A only (no ORGANIZATION tag for Site_B)."""
    async with sandbox.client(LOCAL) as local, sandbox.client(REMOTE) as remote:
        context = await _security_context(local, reader=LOCAL)
        created = await local.upload_binary(
            lambda: _chunks(10), content_type="text/plain", security_context=context
        )
        handed: list[bytes] = []
        with pytest.raises(RemoteError) as caught:
            await remote.download_binary(f"Binary/{created.id}", handed.append, max_bytes=MB)
    assert caught.value.status == 403 and not caught.value.retryable
    assert "Operation read forbidden" in caught.value.message
    assert handed == []


class _DropFirstUpload(httpx.AsyncBaseTransport):
    """A real TLS transport whose first POST loses its connection halfway through the body."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.dropped = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and self.dropped == 0:
            self.dropped += 1
            assert isinstance(request.stream, AsyncIterable)
            async for _chunk in request.stream:
                break  # part of the body went out, then the connection broke
            raise httpx.WriteError("connection dropped during the upload")
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_an_upload_with_a_factory_is_retried_after_a_dropped_connection(
    sandbox: Sandbox,
) -> None:
    transport = _DropFirstUpload(httpx.AsyncHTTPTransport(verify=sandbox.context(LOCAL)))
    fresh = 0

    def factory() -> AsyncIterator[bytes]:
        nonlocal fresh
        fresh += 1
        return _chunks(2 * MB)

    async with sandbox.client(LOCAL) as local:
        context = await _security_context(local)
    client = FhirClient(sandbox.base_url, transport=transport, retry=FAST_RETRY)
    async with client:
        created = await client.upload_binary(
            factory, content_type="application/octet-stream", security_context=context
        )
    assert transport.dropped == 1 and fresh == 2
    stored = sandbox.server.service.binaries.get(str(created.id), "1")
    assert stored is not None and stored.path.read_bytes() == _expected(2 * MB)
    assert len(sandbox.server.service.store.all("Binary")) == 1


async def test_an_upload_without_a_factory_is_not_retried(sandbox: Sandbox) -> None:
    transport = _DropFirstUpload(httpx.AsyncHTTPTransport(verify=sandbox.context(LOCAL)))
    async with sandbox.client(LOCAL) as local:
        context = await _security_context(local)
    client = FhirClient(sandbox.base_url, transport=transport, retry=FAST_RETRY)
    async with client:
        with pytest.raises(RemoteError) as caught:
            await client.upload_binary(
                _chunks(MB), content_type="application/octet-stream", security_context=context
            )
    assert transport.dropped == 1
    assert caught.value.retryable  # the runtime decides; the body cannot be sent again here
    assert sandbox.server.service.store.all("Binary") == []


async def test_an_upload_without_security_context_answer_is_a_clear_error(
    sandbox: Sandbox,
) -> None:
    """A security context DSF does not accept (a Task) is refused with 403, not retried."""
    async with sandbox.client(LOCAL) as local:
        with pytest.raises(RemoteError) as caught:
            await local.upload_binary(
                lambda: _chunks(10), content_type="text/plain", security_context="Task/unknown"
            )
        with pytest.raises(ValueError, match="parse the body as a FHIR resource"):
            await local.upload_binary(
                lambda: _chunks(10), content_type="application/fhir+json", security_context="x"
            )
    assert caught.value.status == 403 and not caught.value.retryable


async def test_delete_is_done_when_the_binary_is_gone(sandbox: Sandbox) -> None:
    async with sandbox.client(LOCAL) as local:
        context = await _security_context(local)
        created = await local.upload_binary(
            lambda: _chunks(10), content_type="text/plain", security_context=context
        )
        await local.delete("Binary", str(created.id))
        await local.delete("Binary", str(created.id))  # deleted already
        await local.delete("Binary", "00000000-0000-0000-0000-000000000000")  # never there
        with pytest.raises(RemoteError) as caught:
            await local.read("Binary", str(created.id))
    assert caught.value.status == 410


async def test_delete_refused_is_an_error(sandbox: Sandbox) -> None:
    async with sandbox.client(LOCAL) as local, sandbox.client(REMOTE) as remote:
        context = await _security_context(local)
        created = await local.upload_binary(
            lambda: _chunks(10), content_type="text/plain", security_context=context
        )
        with pytest.raises(RemoteError) as caught:
            await remote.delete("Binary", str(created.id))
    assert caught.value.status == 403


async def test_download_memory_stays_bounded(sandbox: Sandbox) -> None:
    """30 MB through upload_binary and download_binary: the heap (client and sandbox share
    this process) peaks at a few megabytes."""
    total = 30 * MB
    async with sandbox.client(LOCAL) as local, sandbox.client(REMOTE) as remote:
        context = await _security_context(local)
        gc.collect()
        tracemalloc.start()
        try:
            created = await local.upload_binary(
                lambda: _chunks(total),
                content_type="application/octet-stream",
                security_context=context,
            )
            count = await remote.download_binary(
                f"Binary/{created.id}", lambda _chunk: None, max_bytes=total
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert count == total
    assert peak < 10 * MB, f"peak {peak / MB:.1f} MB for {total // MB} MB"


class _SlowServer:
    """Plain HTTP/1.1 on a real socket: a Binary and ``Task/slow`` come 10 bytes every 0.1 s
    (10 s, never a read timeout), any other Task at once. Counts the requests it serves."""

    def __init__(self) -> None:
        self.busy = 0
        self.changed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                path = line.split()[1].decode()
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                self.busy += 1
                self.changed.set()
                if path.startswith("/Binary") or path == "/Task/slow":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                    for _ in range(100):
                        writer.write(b"x" * 10)
                        await writer.drain()
                        await asyncio.sleep(0.1)
                body = b'{"resourceType":"Task","id":"t","status":"requested"}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                self.busy -= 1
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def serving(self, count: int) -> None:
        async with asyncio.timeout(5):
            while self.busy < count:
                self.changed.clear()
                await self.changed.wait()


async def test_binary_transfers_do_not_hold_up_the_other_requests() -> None:
    slow = _SlowServer()
    async with slow as url:
        client = FhirClient(url, timeout=2.0, retry=FAST_RETRY, connections=2)
        downloads = [
            asyncio.ensure_future(
                client.download_binary(f"Binary/b{number}", lambda _chunk: None, max_bytes=MB)
            )
            for number in range(4)  # twice as many as the client keeps for its requests
        ]
        try:
            await slow.serving(4)
            async with asyncio.timeout(1):
                assert (await client.read("Task", "t"))["status"] == "requested"
        finally:
            for download in downloads:
                download.cancel()
            await asyncio.gather(*downloads, return_exceptions=True)
            await client.aclose()


async def test_no_free_connection_is_a_clear_error() -> None:
    slow = _SlowServer()
    async with slow as url:
        client = FhirClient(url, timeout=0.5, retry=RetryPolicy(attempts=1), connections=1)
        hanging = asyncio.ensure_future(client.read("Task", "slow"))
        try:
            await slow.serving(1)
            with pytest.raises(
                RemoteError,
                match=r"no free connection to the server within "
                r"0\.5 s \(all 1 busy\)",
            ) as caught:
                await client.read("Task", "t")
            assert caught.value.retryable
        finally:
            hanging.cancel()
            await asyncio.gather(hanging, return_exceptions=True)
            await client.aclose()
