"""The local server's own Prometheus metrics (``tts-stream serve --metrics-port``).

Role: a ``prometheus_client`` collector over :meth:`LocalServer.stats` and
:meth:`LocalServer.synthesis_queue`, read on the server's event loop at scrape time: sessions
(opened, active, finished), the synthesis queue (segments waiting, responses running),
responses, deltas and audio sent, and errors (error events sent, handshakes refused).
Names are ``tts_stream_server_*``.

Boundary: server side; uses the shared plumbing in ``tts_stream._prometheus`` only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .._prometheus import MetricsEndpoint, call_in_loop, require_prometheus, start_endpoint

if TYPE_CHECKING:
    from . import LocalServer

__all__ = ["ServerCollector", "serve_metrics"]

# (field of ServerStats, metric name without prefix, help)
_COUNTERS = (
    ("sessions_opened", "sessions_opened", "Realtime sessions opened"),
    ("sessions_finished", "sessions_finished", "Sessions that sent session.finished"),
    ("handshakes", "handshakes", "WebSocket upgrade attempts"),
    ("handshakes_refused", "handshakes_refused", "WebSocket upgrades refused"),
    ("responses", "responses", "Responses completed (response.done sent)"),
    ("deltas_sent", "deltas_sent", "Audio deltas sent"),
    ("audio_samples_sent", "audio_samples_sent", "Audio samples sent"),
    ("errors_sent", "errors", "Error events sent to clients"),
    ("deltas_late_20ms", "deltas_late_20ms", "Real-time deltas sent > 20 ms after due"),
    ("deltas_late_50ms", "deltas_late_50ms", "Real-time deltas sent > 50 ms after due"),
    ("http_requests", "http_requests", "Enrollment HTTP requests"),
    ("voices_created", "voices_created", "Voices enrolled"),
)
_P = "tts_stream_server_"


class ServerCollector:
    """Collects a :class:`LocalServer`'s counters and queue (register it in a registry)."""

    def __init__(self, srv: LocalServer, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._srv = srv
        self._loop = loop

    def describe(self) -> Sequence[Any]:
        return []  # no eager collect() at registration

    def _snapshot(self) -> tuple[Any, tuple[int, int]]:
        return self._srv.stats(), self._srv.synthesis_queue()

    def collect(self) -> Iterator[Any]:
        core = require_prometheus().core
        st, (queued, running) = call_in_loop(self._loop, self._snapshot)
        for field, name, doc in _COUNTERS:
            yield core.CounterMetricFamily(_P + name, doc, value=getattr(st, field))
        yield core.GaugeMetricFamily(_P + "sessions_active", "Realtime sessions open now",
                                     value=st.sessions_active)  # fmt: skip
        yield core.GaugeMetricFamily(_P + "synthesis_queue",
                                     "Text segments waiting to be synthesized", value=queued)
        yield core.GaugeMetricFamily(_P + "synthesis_running", "Responses synthesizing now",
                                     value=running)  # fmt: skip


def serve_metrics(srv: LocalServer, *, port: int, host: str = "127.0.0.1") -> MetricsEndpoint:
    """Serve ``srv``'s metrics at ``http://host:port/metrics`` (call on the server's loop)."""
    prom = require_prometheus()
    registry = prom.CollectorRegistry()
    registry.register(ServerCollector(srv, asyncio.get_running_loop()))
    return start_endpoint(registry, port=port, host=host)
