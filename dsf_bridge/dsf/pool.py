"""A cheaper liveness check for pooled connections, under httpx's connection pool.

Before every request it places, httpcore's pool asks each idle connection whether it has
expired, and an idle connection answers by checking whether its socket is readable (the server
closed it). Over TLS on anyio, finding that socket builds the stream's whole table of extra
attributes each time, with a ``getpeername`` call in it: measured at 50 Tasks in flight, 13%
of the bridge's CPU went there (py-spy, ``bench/bridge.py``). :func:`install` wraps the pool's
network backend so that each connection keeps its socket from the moment it connects and
answers that question with one ``poll``. Everything else is passed through unchanged.

httpx does not take a network backend, so :func:`install` reaches into the transport's pool;
when a later httpx or httpcore lays it out otherwise, the transport is left as it is (slower,
not wrong) and :func:`installed` says so (a test checks it against the versions we install).
A later httpcore that adds a method to its stream interface would need it here too: the tests
of the FHIR client, TLS and the proxy run every request through this backend.
"""

from __future__ import annotations

import select
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

__all__ = ["install", "installed"]


def install(transport: httpx.AsyncHTTPTransport) -> httpx.AsyncHTTPTransport:
    """Give ``transport``'s pool (and a proxy's) the socket-keeping backend; return it."""
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if isinstance(backend, httpcore.AsyncNetworkBackend) and not isinstance(backend, _Backend):
        pool._network_backend = _Backend(backend)  # type: ignore[union-attr]
    return transport


def installed(transport: httpx.AsyncHTTPTransport) -> bool:
    """Whether :func:`install` took on ``transport``."""
    pool = getattr(transport, "_pool", None)
    return isinstance(getattr(pool, "_network_backend", None), _Backend)


def _readable(sock: socket.socket) -> bool:
    """Whether a read on ``sock`` would return at once: for an idle HTTP/1.1 connection, that
    the server closed it (or sent what it should not have). A socket closed here counts as
    readable, so that the pool drops the connection."""
    descriptor = sock.fileno()
    if descriptor < 0:
        return True
    if not hasattr(select, "poll"):  # Windows, or eventlet's green select
        return bool(select.select([descriptor], [], [], 0)[0])
    poller = select.poll()
    poller.register(descriptor, select.POLLIN)
    return bool(poller.poll(0))


class _Stream(httpcore.AsyncNetworkStream):
    # The signatures are httpcore's (``timeout`` included); every call goes to the stream within.

    def __init__(self, inner: httpcore.AsyncNetworkStream, sock: socket.socket | None) -> None:
        self._inner = inner
        self._socket = sock

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's signature
    ) -> httpcore.AsyncNetworkStream:
        # TLS over the same TCP socket (also inside a proxy's CONNECT tunnel).
        wrapped = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        return _Stream(wrapped, self._socket)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self._socket is not None:
            return _readable(self._socket)
        # No socket (a stream of another kind): its own answer.
        return self._inner.get_extra_info(info)


class _Backend(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's signature
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
        **more: Any,  # what a later httpcore may add, passed on
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(
            host,
            port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
            **more,
        )
        return _Stream(stream, stream.get_extra_info("socket"))

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's signature
        socket_options: Iterable[Any] | None = None,
        **more: Any,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(
            path, timeout=timeout, socket_options=socket_options, **more
        )
        return _Stream(stream, stream.get_extra_info("socket"))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
