"""A tiny HTTP forward proxy on the loopback, for tests of ``[proxy]``.

It tunnels ``CONNECT host:port`` (what clients do for https and wss targets: TLS runs end to end
inside, so mutual TLS must still work) and forwards absolute-form requests
(``GET http://host:port/path``, what clients do for http targets). It records the request line
and the ``Proxy-Authorization`` header of every connection; with ``credentials`` it answers 407
to a client that sends other ones, and with ``refuse`` 403 to every new request. Use it as an
async context manager in async tests, or with :meth:`ForwardProxyServer.in_thread` beside a
subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["ForwardProxyServer", "ProxiedRequest"]


@dataclass(frozen=True)
class ProxiedRequest:
    method: str
    target: str
    authorization: str | None


@dataclass
class ForwardProxyServer:
    credentials: tuple[str, str] | None = None
    seen: list[ProxiedRequest] = field(default_factory=list)
    # True: every new request is answered 403 (tunnels already open stay open).
    refuse: bool = False
    port: int = 0
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ForwardProxyServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    @classmethod
    @contextlib.contextmanager
    def in_thread(cls, credentials: tuple[str, str] | None = None) -> Iterator[ForwardProxyServer]:
        """The proxy served by an event loop of its own, for tests that run a subprocess."""
        proxy = cls(credentials=credentials)
        started = threading.Event()
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()

        async def serve() -> None:
            async with proxy:
                started.set()
                await stop.wait()

        thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
        thread.start()
        try:
            assert started.wait(10), "the proxy did not start"
            yield proxy
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(10)
            loop.close()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._handle(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, version = request_line.split(" ")
            headers = [line.split(":", 1) for line in header_lines if ":" in line]
            authorization = next(
                (v.strip() for k, v in headers if k.strip().lower() == "proxy-authorization"),
                None,
            )
            self.seen.append(ProxiedRequest(method, target, authorization))
            if self.refuse:
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            if self.credentials is not None:
                expected = base64.b64encode(":".join(self.credentials).encode()).decode()
                if authorization != f"Basic {expected}":
                    writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
                    writer.write(b'Proxy-Authenticate: Basic realm="test"\r\n')
                    writer.write(b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                    await writer.drain()
                    return
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                up_reader, upstream = await asyncio.open_connection(host.strip("[]"), int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                parts = urlsplit(target)
                up_reader, upstream = await asyncio.open_connection(
                    parts.hostname, parts.port or 80
                )
                path = parts.path or "/"
                if parts.query:
                    path += f"?{parts.query}"
                kept = [
                    f"{k}:{v}" for k, v in headers if not k.strip().lower().startswith("proxy-")
                ]
                upstream.write(
                    "\r\n".join([f"{method} {path} {version}", *kept, "", ""]).encode("latin-1")
                )
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            for stream in (writer, upstream):
                if stream is not None:
                    stream.close()
                    with contextlib.suppress(OSError):
                        await stream.wait_closed()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except OSError:
        pass
    finally:
        if sink.can_write_eof():
            with contextlib.suppress(OSError):
                sink.write_eof()
