"""uvicorn inside the bridge's own event loop: the admin API runs beside the workers.

The host process (the CLI, pytest) owns the signal handlers; stopping is immediate rather than
after uvicorn's 0.1 s poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator
from typing import Any

import structlog
import uvicorn

from dsf_bridge.errors import ConfigError

__all__ = ["ApiServer", "EmbeddedServer", "EmbeddedUvicorn", "listening_socket"]

_log = structlog.get_logger("dsf_bridge.api")


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that installs no signal handlers and stops as soon as it is asked."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.stop_requested = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def main_loop(self) -> None:
        # uvicorn's own loop polls should_exit every 0.1 s; this one stops at once when asked,
        # and ticks as often, which keeps the Date header current.
        counter = 0
        while not await self.on_tick(counter):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_requested.wait(), 0.1)
            if self.stop_requested.is_set():
                return
            counter = (counter + 1) % 864_000

    def request_stop(self) -> None:
        self.should_exit = True
        self.stop_requested.set()


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (port 0 picks a free one) with ``TCP_NODELAY`` on:
    uvicorn writes headers and body apart, and Nagle's algorithm with delayed ACKs would add
    about 40 ms to every response."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class EmbeddedUvicorn:
    """An ASGI app served by uvicorn in the running event loop on a socket of its own;
    ``options`` go to :class:`uvicorn.Config` (TLS, protocol classes)."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.options = {
            "lifespan": "off",
            "log_config": None,
            "access_log": False,
            "timeout_graceful_shutdown": 2,
            **options,
        }
        self._socket: socket.socket | None = None
        self._server: EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind (port 0 picks a free port, then ``port`` says which) and serve."""
        self._socket = listening_socket(self.host, self.port)
        self.port = self._socket.getsockname()[1]
        self._server = EmbeddedServer(uvicorn.Config(self.app, **self.options))
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                await self._task
                raise RuntimeError(f"the server on {self.host}:{self.port} stopped at start-up")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.request_stop()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._socket is not None:
            self._socket.close()
        self._server = self._task = self._socket = None

    async def wait(self) -> None:
        """Until the server stops or the task serving is cancelled."""
        if self._task is not None:
            await self._task


class ApiServer(EmbeddedUvicorn):
    """Serves the admin app on ``http://host:port`` while used as an async context manager."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(app, host=host, port=port, server_header=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> ApiServer:
        try:
            await self.start()
        except OSError as exc:
            raise ConfigError(
                f"api.port: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}",
                field="api.port",
            ) from exc
        _log.info("api.started", url=self.url)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
