"""Prometheus plumbing shared by the engine's exporter and the local server's ``/metrics``.

Role: import ``prometheus_client`` (the ``prometheus`` extra) with an error naming the extra,
start its HTTP endpoint on loopback by default, and read a snapshot of asyncio-owned state from
the scrape thread. ``prometheus_client.start_http_server`` serves scrapes from its own thread,
while the engine's and the server's state belong to the event loop: :func:`call_in_loop` runs
the snapshot on the loop (bounded wait) instead of reading dicts that the loop is changing.

Boundary: neither client nor server; both import it. No asyncio task is started here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

from .errors import UsageError

__all__ = ["MetricsEndpoint", "call_in_loop", "require_prometheus", "start_endpoint"]

T = TypeVar("T")

_SNAPSHOT_TIMEOUT_S = 2.0


def require_prometheus() -> ModuleType:
    """``prometheus_client``, or a :class:`UsageError` naming the extra to install."""
    try:
        import prometheus_client
        import prometheus_client.core  # the metric families of custom collectors
    except ImportError as exc:
        raise UsageError(
            'Prometheus export needs prometheus_client: pip install "tts-stream[prometheus]"'
        ) from exc
    return prometheus_client


def call_in_loop(loop: asyncio.AbstractEventLoop | None, fn: Callable[[], T]) -> T:
    """``fn()`` on ``loop``'s thread (directly when already there or when there is no loop)."""
    if loop is None or loop.is_closed():
        return fn()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        return fn()
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            fut.set_result(fn())
        except BaseException as exc:  # handed to the scrape thread, raised there
            fut.set_exception(exc)

    loop.call_soon_threadsafe(run)
    return fut.result(timeout=_SNAPSHOT_TIMEOUT_S)


class MetricsEndpoint:
    """A running ``prometheus_client`` HTTP endpoint; :meth:`close` stops it (idempotent)."""

    def __init__(self, server: Any, thread: Any) -> None:
        self._server, self._thread = server, thread
        self.port: int = int(server.server_address[1])
        self.host: str = str(server.server_address[0])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()
            server.server_close()
            self._thread.join(timeout=_SNAPSHOT_TIMEOUT_S)


def start_endpoint(registry: Any, *, port: int, host: str = "127.0.0.1") -> MetricsEndpoint:
    """Serve ``registry`` at ``http://host:port/metrics`` (``port=0``: any free port)."""
    prom = require_prometheus()
    server, thread = prom.start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(server, thread)
