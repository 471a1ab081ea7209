"""The local server's listening socket: one accept at a time, under a connection cap.

Role: accept TCP connections for the aiohttp request handler factory, never more than
``max_connections`` open at once, and never spin when the process is out of file
descriptors.

Why this is written here instead of ``loop.create_server`` / ``web.TCPSite``: aiohttp has no
connection cap (it calls that the application's duty, aiohttp#675), and asyncio's own accept
loop, once the process is out of descriptors, retries ``backlog`` times per wake-up and
reschedules itself as often, logging every failure (CPython ``selector_events``): 100 % CPU
and about 10,000 error records a second. Here the next connection is accepted only while
fewer than the cap are open; at the cap the client waits in the kernel's listen backlog (no
descriptor spent) until one closes. ``EMFILE``/``ENFILE`` pause accepting for
``retry_s`` and are logged at most once per ``log_interval_s`` (:class:`RateLimitedLog`).

Boundary: sockets and the event loop; the HTTP protocol objects come from the factory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import time
from collections.abc import Callable

__all__ = ["FD_RESERVE", "ClientFaultFilter", "Listener", "RateLimitedLog", "connection_cap"]

log = logging.getLogger(__name__)

FD_RESERVE = 64
"""Descriptors kept free for everything but client sockets (database, logs, downloads...)."""
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def connection_cap(requested: int) -> int:
    """``requested``, lowered to fit the process's open-files limit less :data:`FD_RESERVE`."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    return max(1, min(requested, soft - FD_RESERVE))


class _RateLimit:
    """One event per ``interval_s``: :meth:`allow` gives how many were dropped since, or None."""

    def __init__(self, interval_s: float, clock: Callable[[], float]) -> None:
        self._interval, self._clock = interval_s, clock
        self._next = float("-inf")
        self.suppressed = 0

    def allow(self) -> int | None:
        now = self._clock()
        if now < self._next:
            self.suppressed += 1
            return None
        dropped, self.suppressed, self._next = self.suppressed, 0, now + self._interval
        return dropped


class RateLimitedLog:
    """Log one record per ``interval_s`` at most; the next one says how many were dropped."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._limit = _RateLimit(interval_s, clock)

    @property
    def suppressed(self) -> int:
        return self._limit.suppressed

    def log(self, level: int, msg: str, *args: object) -> None:
        dropped = self._limit.allow()
        if dropped is None:
            return
        if dropped:
            msg += " (%d similar record(s) dropped before this one)"
            args = (*args, dropped)
        self._logger.log(level, msg, *args)


class ClientFaultFilter(logging.Filter):
    """For the HTTP server's logger: a client's fault is one WARNING line, rate-limited.

    aiohttp logs every malformed request and every client that disconnects mid-request at
    ERROR with a full traceback; a client can trigger that at will. Records whose exception
    is the client's doing (``client_faults``) lose their traceback, become WARNING and pass
    at most once per ``interval_s`` (the next one counts the dropped ones). Others pass.
    """

    def __init__(
        self,
        client_faults: tuple[type[BaseException], ...],
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._faults = client_faults
        self._limit = _RateLimit(interval_s, clock)

    @property
    def suppressed(self) -> int:
        return self._limit.suppressed

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, self._faults):
            return True
        dropped = self._limit.allow()
        if dropped is None:
            return False
        extra = f" ({dropped} similar record(s) dropped before this one)" if dropped else ""
        record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}".replace("\n", " ")
        record.msg += extra
        record.args, record.exc_info, record.exc_text = None, None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class _Counted(asyncio.Protocol):
    """Forwards every event to the real protocol and tells the listener when it is closed."""

    __slots__ = ("_inner", "_on_lost")

    def __init__(self, inner: asyncio.Protocol, on_lost: Callable[[], None]) -> None:
        self._inner, self._on_lost = inner, on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._inner.connection_lost(exc)
        finally:
            self._on_lost()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class Listener:
    """Accepts connections on ``host:port`` for ``factory`` while fewer than the cap are open."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        *,
        max_connections: int,
        backlog: int = 2048,
        retry_s: float = 0.5,
        log_interval_s: float = 10.0,
    ) -> None:
        self._factory = factory
        self.max_connections = max_connections
        self.open = 0  # connections accepted and not yet closed
        self._below_cap = asyncio.Event()
        self._below_cap.set()
        self._backlog = backlog
        self._retry_s = retry_s
        self._errors = RateLimitedLog(log, log_interval_s)
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0
        self.waited_at_cap = 0  # accepts that had to wait for a connection to close

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(self._backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.create_task(self._accept_loop(sock), name="local-server-accept")

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._below_cap.is_set():
                self.waited_at_cap += 1
                await self._below_cap.wait()
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    continue  # ECONNABORTED and the like: that client is gone
                self._errors.log(logging.ERROR, "cannot accept a connection: %s; pausing "
                                 "%.1f s", exc.strerror, self._retry_s)  # fmt: skip
                await asyncio.sleep(self._retry_s)
                continue
            self._opened()
            try:
                await loop.connect_accepted_socket(
                    lambda: _Counted(self._factory(), self._closed), conn
                )
            except OSError as exc:  # the peer reset before the transport was set up
                log.debug("connection dropped at accept: %s", exc)
                conn.close()
                self._closed()

    def _opened(self) -> None:
        self.open += 1
        if self.open >= self.max_connections:
            self._below_cap.clear()

    def _closed(self) -> None:
        self.open -= 1
        if self.open < self.max_connections:
            self._below_cap.set()

    async def close(self) -> None:
        """Stop accepting and close the listening socket (open connections are untouched)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
