"""uvicorn on the running event loop: the HTTP door starts and drains with the gRPC server.

`HttpServer.start(host, port)` binds the socket itself (so a busy port is a clear
FailedPreconditionError and port 0 reports the port it got), then serves the app on the
current loop without touching signal handlers (`deltaserve serve` owns SIGTERM and
drains both doors). `stop(grace)` closes the listener, lets responses in progress end
for up to `grace` seconds, then cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn

from deltaserve.errors import FailedPreconditionError

BACKLOG = 2048


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # signals belong to the process's own drain, not to uvicorn


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); "[::]"/"::" listens on IPv6 and IPv4."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise FailedPreconditionError(f"cannot serve HTTP on {host}:{port}: {exc.strerror}") from None
    return sock


class HttpServer:
    """One uvicorn server for `app` (an ASGI app)."""

    def __init__(self, app: object) -> None:
        self._app = app
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int, grace: float = 5.0) -> int:
        """Bind and serve; returns the bound port."""
        sock = bind_socket(host, port)
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=grace,
            server_header=False,
        )
        self._server = _Uvicorn(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise FailedPreconditionError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
        self._server = None
        self._task = None
