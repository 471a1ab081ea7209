"""OpenTelemetry and Prometheus exporters over the per-utterance metrics records.

Role: the engine calls every observer once per utterance, when its
:class:`~tts_stream.metrics.UtteranceMetrics` record is final (``Engine(observers=[...])`` or
``engine.add_observer``), with the kind of each sink (``{"wav:out.wav": "wav"}``). Nothing
here runs on the per-delta path. :func:`figures` turns a record into the list of
:class:`Figure` values both exporters publish (one definition of what is measured):

==========================  ==============================================  ========  =======
key                         OpenTelemetry name                              type      unit
==========================  ==============================================  ========  =======
``time_to_first_chunk``     ``gen_ai.client.operation.time_to_first_chunk``  histogram s
``duration``                ``gen_ai.client.operation.duration``             histogram s
``acquire``                 ``tts_stream.connection.acquire.duration``       histogram s
``added_latency``           ``tts_stream.engine.added_latency``              histogram s
``sink_lateness``           ``tts_stream.sink.lateness``                     histogram s
``underruns``               ``tts_stream.sink.underruns``                    counter
``interrupts``              ``tts_stream.utterance.interrupts``              counter
``retries``                 ``tts_stream.utterance.retries``                 counter
``resumes``                 ``tts_stream.utterance.resumes``                 counter
``lost_chars``              ``tts_stream.utterance.lost_characters``         counter
``billed_characters``       ``tts_stream.billed_characters``                 counter
``audio``                   ``tts_stream.audio.duration``                    counter   s
``utterances``              ``tts_stream.utterances``                        counter
==========================  ==============================================  ========  =======

Attributes: the model (``gen_ai.request.model``), the sink kinds of the utterance joined with
``+`` (``tts_stream.sinks``), and per figure ``connection_reused``, ``tts_stream.sink.kind``,
``error.type`` or ``tts_stream.outcome``. Never the voice name (its middle part is the
user's chosen name) and never the key. Prometheus names are ``tts_stream_*`` with the unit as
a suffix (see :data:`METRICS`).

``OtelExporter`` needs the ``otel`` extra (``opentelemetry-api``; an SDK or a distro of your
choice collects); ``PrometheusExporter`` needs the ``prometheus`` extra and also publishes the
engine's :meth:`~tts_stream.engine.Engine.stats` at scrape time (pool spares ready, dials in
flight, warm and cold acquires, speeches in flight).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ._prometheus import MetricsEndpoint, call_in_loop, require_prometheus, start_endpoint
from .errors import UsageError
from .metrics import UtteranceMetrics

if TYPE_CHECKING:
    import asyncio

    from .engine import Engine, EngineStats

__all__ = [
    "METRICS",
    "Figure",
    "MetricSpec",
    "OtelExporter",
    "PrometheusExporter",
    "figures",
]

#: Histogram bucket boundaries in seconds (latencies from 1 ms up to a long utterance).
BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
             30.0, 60.0)  # fmt: skip


@dataclass(frozen=True)
class MetricSpec:
    """One published quantity: its names in both systems and its extra attributes."""

    key: str
    otel: str
    prometheus: str
    type: Literal["histogram", "counter"]
    unit: str
    description: str
    labels: tuple[str, ...] = ()  # beyond ("model", "sinks")


_SPECS = (
    MetricSpec("time_to_first_chunk", "gen_ai.client.operation.time_to_first_chunk",
               "tts_stream_time_to_first_chunk_seconds", "histogram", "s",
               "First text sent to the first audio delta received"),
    MetricSpec("duration", "gen_ai.client.operation.duration",
               "tts_stream_operation_duration_seconds", "histogram", "s",
               "First text sent to the last audio delta received", ("error_type",)),
    MetricSpec("acquire", "tts_stream.connection.acquire.duration",
               "tts_stream_connection_acquire_seconds", "histogram", "s",
               "Time to get a configured session (warm spare or fresh dial)",
               ("connection_reused",)),
    MetricSpec("added_latency", "tts_stream.engine.added_latency",
               "tts_stream_engine_added_latency_seconds", "histogram", "s",
               "Median of delta receive time minus the server's send stamp (when stamped)"),
    MetricSpec("sink_lateness", "tts_stream.sink.lateness", "tts_stream_sink_lateness_seconds",
               "histogram", "s", "First audio delta received to first sample out of the sink",
               ("sink_kind",)),
    MetricSpec("underruns", "tts_stream.sink.underruns", "tts_stream_sink_underruns",
               "counter", "{underrun}", "Sink underruns (silence played while starved)"),
    MetricSpec("interrupts", "tts_stream.utterance.interrupts", "tts_stream_interrupts",
               "counter", "{interrupt}", "Utterances stopped by a barge-in"),
    MetricSpec("retries", "tts_stream.utterance.retries", "tts_stream_retries", "counter",
               "{retry}", "Sessions retried before any audio reached a sink"),
    MetricSpec("resumes", "tts_stream.utterance.resumes", "tts_stream_resumes", "counter",
               "{resume}", "Sessions resumed after a loss after audio (on_loss='resume')"),
    MetricSpec("lost_chars", "tts_stream.utterance.lost_characters",
               "tts_stream_lost_characters", "counter", "{character}",
               "Characters of the sentences a lost connection cut (heard in part, not resumed)"),
    MetricSpec("billed_characters", "tts_stream.billed_characters",
               "tts_stream_billed_characters", "counter", "{character}",
               "Billed characters (sum of usage.characters)"),
    MetricSpec("audio", "tts_stream.audio.duration", "tts_stream_audio_seconds", "counter", "s",
               "Audio received from the service"),
    MetricSpec("utterances", "tts_stream.utterances", "tts_stream_utterances", "counter",
               "{utterance}", "Utterances finished, by outcome (ok, error, interrupted)",
               ("outcome",)),
)  # fmt: skip

#: Every published quantity by key.
METRICS: Mapping[str, MetricSpec] = {s.key: s for s in _SPECS}

_OTEL_ATTR = {
    "model": "gen_ai.request.model",
    "sinks": "tts_stream.sinks",
    "sink_kind": "tts_stream.sink.kind",
    "error_type": "error.type",
    "outcome": "tts_stream.outcome",
    "connection_reused": "connection_reused",
}
_CACHE_MAX = 4096  # label sets remembered per exporter (bounded: models x sink mixes)
_GEN_AI = frozenset({"time_to_first_chunk", "duration"})
_OTEL_COMMON = {"gen_ai.operation.name": "text_to_speech", "gen_ai.provider.name": "dashscope"}


@dataclass(frozen=True, slots=True)
class Figure:
    """One value to publish: ``METRICS[key]`` with these label values."""

    key: str
    value: float
    labels: tuple[tuple[str, str], ...]  # ("model", m), ("sinks", s), then the spec's labels


def _error_type(error: str | None) -> str:
    return error.split("(", 1)[0] if error else ""


_last: list[Any] = [None, None, ()]  # the last (record, kinds, figures): both exporters share it


def figures(record: UtteranceMetrics, sink_kinds: Mapping[str, str]) -> tuple[Figure, ...]:
    """What one finished utterance contributes to each metric (pure; the last is remembered,
    so several exporters of one engine compute it once)."""
    if _last[0] is record and _last[1] is sink_kinds:
        cached: tuple[Figure, ...] = _last[2]
        return cached
    out = _figures(record, sink_kinds)
    _last[:] = [record, sink_kinds, out]
    return out


def _figures(record: UtteranceMetrics, sink_kinds: Mapping[str, str]) -> tuple[Figure, ...]:
    base = (("model", record.model), ("sinks", "+".join(sorted(set(sink_kinds.values())))))
    out: list[Figure] = []

    def add(key: str, value: float | None, **extra: str) -> None:
        if value is not None:
            out.append(Figure(key, float(value), (*base, *extra.items()) if extra else base))

    first = record.first_audio_ms
    add("time_to_first_chunk", None if first is None else first / 1000.0)
    add("duration", None if record.synthesis_ms is None else record.synthesis_ms / 1000.0,
        error_type=_error_type(record.error))  # fmt: skip
    if record.acquire_ms is not None:
        add("acquire", record.acquire_ms / 1000.0,
            connection_reused="true" if record.was_warm else "false")  # fmt: skip
    lag = record.server_lag_ms_p50
    add("added_latency", None if lag is None else lag / 1000.0)
    if first is not None:
        for name, at in record.sink_first_sample_ms.items():
            kind = sink_kinds.get(name, name.split(":", 1)[0])
            add("sink_lateness", max(at - first, 0.0) / 1000.0, sink_kind=kind)
    add("underruns", record.underruns or None)
    add("interrupts", 1 if record.interrupted else None)
    add("retries", record.retries or None)
    add("resumes", record.resumes or None)
    add("lost_chars", record.lost_chars or None)
    add("billed_characters", record.billed_characters or None)
    add("audio", record.audio_ms / 1000.0 if record.audio_ms else None)
    outcome = "error" if record.error else "interrupted" if record.interrupted else "ok"
    add("utterances", 1, outcome=outcome)
    return tuple(out)


# --- OpenTelemetry -------------------------------------------------------------------------------


def _require_otel() -> tuple[Any, Any]:
    try:
        from opentelemetry import metrics, trace
    except ImportError as exc:
        raise UsageError(
            'OpenTelemetry export needs opentelemetry-api: pip install "tts-stream[otel]"'
        ) from exc
    return metrics, trace


class OtelExporter:
    """Record every utterance into OpenTelemetry instruments (and optionally spans).

    ``meter_provider`` / ``tracer_provider`` default to the global ones. With ``spans=True``
    each utterance becomes a ``tts_stream.utterance`` span (after the fact, with its real start
    and end) with child spans for its phases: ``acquire``, ``first_chunk`` (first text →
    first audio) and ``synthesis`` (first audio → last audio).
    """

    def __init__(
        self, *, meter_provider: Any = None, tracer_provider: Any = None, spans: bool = False
    ) -> None:
        otel_metrics, otel_trace = _require_otel()
        from . import __version__

        provider = meter_provider or otel_metrics.get_meter_provider()
        meter = provider.get_meter("tts_stream", __version__)
        self._instruments: dict[str, Any] = {}
        self._attrs: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
        self._totals: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        self._gen_ai_attrs: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
        for spec in _SPECS:
            if spec.type == "histogram":
                inst = meter.create_histogram(
                    spec.otel, unit=spec.unit, description=spec.description,
                    explicit_bucket_boundaries_advisory=list(BUCKETS_S),
                )  # fmt: skip
            else:
                # Counters are summed here (a dict update per utterance) and read by the SDK
                # at collection time: a third of the SDK's per-measurement cost saved.
                totals = self._totals[spec.key] = {}
                inst = meter.create_observable_counter(
                    spec.otel, callbacks=[self._observe(otel_metrics.Observation, totals)],
                    unit=spec.unit, description=spec.description,
                )  # fmt: skip
            self._instruments[spec.key] = inst
        self._tracer = None
        if spans:
            tp = tracer_provider or otel_trace.get_tracer_provider()
            self._tracer = tp.get_tracer("tts_stream", __version__)

    def _observe(
        self, observation: Any, totals: dict[tuple[tuple[str, str], ...], float]
    ) -> Callable[[Any], Iterator[Any]]:
        def callback(_options: Any) -> Iterator[Any]:
            # list() of a dict is atomic under the GIL: the reader's thread may call this.
            for labels, value in list(totals.items()):
                yield observation(value, self._attributes(labels))

        return callback

    def _attributes(self, labels: tuple[tuple[str, str], ...]) -> dict[str, str]:
        cache = self._attrs
        attrs = cache.get(labels)
        if attrs is None:
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            attrs = cache[labels] = {_OTEL_ATTR[k]: v for k, v in labels}
        return attrs

    def __call__(self, record: UtteranceMetrics, sink_kinds: Mapping[str, str]) -> None:
        for fig in figures(record, sink_kinds):
            totals = self._totals.get(fig.key)
            if totals is not None:
                totals[fig.labels] = totals.get(fig.labels, 0.0) + fig.value
                continue
            attrs = self._attributes(fig.labels)
            if fig.key in _GEN_AI:  # the semantic conventions' required attributes
                attrs = self._gen_ai_attrs.get(fig.labels) or self._gen_ai_attrs.setdefault(
                    fig.labels, {**_OTEL_COMMON, **attrs})
            self._instruments[fig.key].record(fig.value, attributes=attrs)
        if self._tracer is not None:
            self._span(record, sink_kinds)

    def _span(self, r: UtteranceMetrics, sink_kinds: Mapping[str, str]) -> None:
        assert self._tracer is not None
        # Records hold monotonic times; spans want epoch nanoseconds.
        offset = time.time() - time.monotonic()

        def ns(mono: float) -> int:
            return int((mono + offset) * 1e9)

        start = r.started_at
        text_at = r.first_text_at if r.first_text_at is not None else start
        first = None if r.first_audio_ms is None else text_at + r.first_audio_ms / 1000.0
        last = None if r.synthesis_ms is None else text_at + r.synthesis_ms / 1000.0
        end = max(t for t in (start, text_at, first, last) if t is not None)
        attrs = {
            **_OTEL_COMMON, "gen_ai.request.model": r.model,
            "tts_stream.sinks": "+".join(sorted(set(sink_kinds.values()))),
            "tts_stream.mode": r.mode, "tts_stream.billed_characters": r.billed_characters,
            "tts_stream.audio_seconds": r.audio_ms / 1000.0, "tts_stream.retries": r.retries,
            "tts_stream.resumes": r.resumes, "tts_stream.interrupted": r.interrupted,
        }  # fmt: skip
        _, otel_trace = _require_otel()
        span = self._tracer.start_span("tts_stream.utterance", start_time=ns(start),
                                       attributes=attrs)  # fmt: skip
        if r.error:
            span.set_attribute("error.type", _error_type(r.error))
            span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, _error_type(r.error)))
        ctx = otel_trace.set_span_in_context(span)
        phases: list[tuple[str, float, float | None, dict[str, Any]]] = []
        if r.acquire_ms is not None:
            phases.append(("acquire", start, start + r.acquire_ms / 1000.0,
                           {"connection_reused": bool(r.was_warm)}))  # fmt: skip
        phases.append(("first_chunk", text_at, first, {}))
        if first is not None:
            phases.append(("synthesis", first, last, {}))
        for name, a, b, extra in phases:
            if b is None:
                continue
            child = self._tracer.start_span(name, context=ctx, start_time=ns(a),
                                            attributes=extra)  # fmt: skip
            child.end(end_time=ns(b))
        span.end(end_time=ns(end))


# --- Prometheus ----------------------------------------------------------------------------------


class PrometheusExporter:
    """Prometheus metrics of an engine: per-utterance figures plus the engine's stats.

    ``PrometheusExporter(engine)`` registers itself as an observer of ``engine`` and its
    collector in ``registry`` (default: a fresh ``CollectorRegistry``; pass
    ``prometheus_client.REGISTRY`` to join the process-wide one). :meth:`start_http` serves it
    (127.0.0.1 unless told). Scrapes run on prometheus_client's thread; the engine's stats are
    read on the event loop (``call_in_loop``).
    """

    def __init__(
        self, engine: Engine | None = None, *, registry: Any = None, observe: bool = True
    ) -> None:
        prom = require_prometheus()
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        self._engine = engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._metrics: dict[str, Any] = {}
        self._children: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        for spec in _SPECS:
            labels = ("model", "sinks", *spec.labels)
            desc = f"{spec.description} ({spec.otel})"
            if spec.type == "histogram":
                m = prom.Histogram(spec.prometheus, desc, labels, registry=self.registry,
                                   buckets=(*BUCKETS_S, float("inf")))  # fmt: skip
            else:
                m = prom.Counter(spec.prometheus, desc, labels, registry=self.registry)
            self._metrics[spec.key] = m
        self._endpoint: MetricsEndpoint | None = None
        if engine is not None:
            import asyncio

            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                self._loop = None
            self.registry.register(_EngineCollector(self))
            if observe:  # observe=False: the caller adds it itself (to wrap it, say)
                engine.add_observer(self)

    def __call__(self, record: UtteranceMetrics, sink_kinds: Mapping[str, str]) -> None:
        children = self._children
        for fig in figures(record, sink_kinds):
            key = (fig.key, fig.labels)
            child = children.get(key)
            if child is None:
                if len(children) >= _CACHE_MAX:
                    children.clear()
                child = children[key] = self._metrics[fig.key].labels(*(v for _, v in fig.labels))
                child = children[key] = (
                    child.observe if METRICS[fig.key].type == "histogram" else child.inc
                )
            child(fig.value)

    def engine_stats(self) -> EngineStats | None:
        """The engine's stats, read on its event loop (None without an engine)."""
        engine = self._engine
        if engine is None:
            return None
        return call_in_loop(self._loop, engine.stats)

    def start_http(self, port: int = 0, *, host: str = "127.0.0.1") -> MetricsEndpoint:
        """Serve ``/metrics`` on ``host:port`` in prometheus_client's thread; returns it."""
        if self._endpoint is None:
            self._endpoint = start_endpoint(self.registry, port=port, host=host)
        return self._endpoint

    def close(self) -> None:
        """Stop the HTTP endpoint (if started)."""
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None


class _EngineCollector:
    """Gauges and counters read from ``engine.stats()`` at scrape time."""

    def __init__(self, exporter: PrometheusExporter) -> None:
        self._exporter = exporter

    def describe(self) -> Sequence[Any]:
        return []  # no eager collect() at registration (the loop may not be free then)

    def collect(self) -> Iterator[Any]:
        prom = require_prometheus()
        core = prom.core
        st = self._exporter.engine_stats()
        if st is None:
            return
        pool = st.pool
        spares = core.GaugeMetricFamily(
            "tts_stream_pool_spares_ready", "Warm spares connected and configured now",
            labels=["model"],
        )  # fmt: skip
        by_model: dict[str, int] = {}
        for key, n in pool.spares.items():
            by_model[key.model] = by_model.get(key.model, 0) + n
        for model, n in sorted(by_model.items()):
            spares.add_metric([model], n)
        yield spares
        yield core.GaugeMetricFamily("tts_stream_pool_dials_in_flight",
                                     "Dials of the pool in progress", value=pool.dials_in_flight)
        acq = core.CounterMetricFamily("tts_stream_pool_acquires", "Sessions handed out",
                                       labels=["warm"])  # fmt: skip
        acq.add_metric(["true"], pool.warm_acquires)
        acq.add_metric(["false"], pool.cold_acquires)
        yield acq
        yield core.CounterMetricFamily("tts_stream_pool_dials", "Dials started", value=pool.dials)
        yield core.CounterMetricFamily("tts_stream_pool_dial_failures", "Dials that failed",
                                       value=pool.dial_failures)  # fmt: skip
        yield core.GaugeMetricFamily("tts_stream_speeches_in_flight",
                                     "Speeches open now", value=st.speeches_in_flight)
        yield core.GaugeMetricFamily("tts_stream_engine_accepting",
                                     "1 while the engine takes new speech, 0 once shutting down",
                                     value=1 if st.accepting else 0)  # fmt: skip
