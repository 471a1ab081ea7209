"""OpenTelemetry and Prometheus export of the engine's metrics, and the engine's health.

Loopback tier: the real Engine against the real LocalServer (tone backend); OpenTelemetry
through the real SDK's ``InMemoryMetricReader`` / ``InMemorySpanExporter``; Prometheus by
scraping a real ``prometheus_client`` HTTP endpoint on 127.0.0.1 and parsing the exposition
text with ``prometheus_client.parser``. Faults come from the server's knobs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from sinks import ArraySink, WavSink
from tests.conftest import Enroll
from tests.test_rtp_ffmpeg import until
from tts_stream import ClosedError, ConnectionLost, Engine, Voice
from tts_stream.messages import VC_MODELS
from tts_stream.metrics import UtteranceMetrics
from tts_stream.observability import METRICS, OtelExporter, PrometheusExporter, figures
from tts_stream.server import LocalServer

TIMEOUT = 30.0
MODEL = VC_MODELS[0]
TEXT = "Hello there. This is a test of the exporters, with two sentences."


@pytest.fixture
async def voice(server: LocalServer, enroll: Enroll) -> Voice:
    return Voice(await enroll(server, preferred_name="secretname"), MODEL)


def engine_for(srv: LocalServer, **kwargs: Any) -> Engine:
    return Engine(base_url=srv.base_url, api_key=srv.api_key, **kwargs)


def otel_points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[str, list[Any]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def span_times(span: ReadableSpan) -> tuple[int, int]:
    """A finished span's start and end (ns)."""
    assert span.start_time is not None and span.end_time is not None
    return span.start_time, span.end_time


def outcomes(points: dict[str, list[Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in points["tts_stream.utterances"]:
        key = p.attributes["tts_stream.outcome"]
        out[key] = out.get(key, 0) + p.value
    return out


def all_attribute_values(points: dict[str, list[Any]]) -> Iterator[str]:
    for pts in points.values():
        for pt in pts:
            yield from (str(v) for v in pt.attributes.values())


# --- pure: figures -------------------------------------------------------------------------------


def test_figures_of_a_record() -> None:
    rec = UtteranceMetrics(
        model="m", voice="qwen-tts-vc-bob-voice-1", acquire_ms=2.0, was_warm=True,
        first_audio_ms=10.0, synthesis_ms=500.0, sink_first_sample_ms={"wav:x": 12.5},
        server_lag_ms_p50=0.5, billed_characters=7, audio_ms=1500.0, underruns=3,
        retries=1, interrupted=True,
    )  # fmt: skip
    got = {(f.key, frozenset(f.labels)): f.value for f in figures(rec, {"wav:x": "wav"})}

    def at(key: str, **extra: str) -> float:
        return got[(key, frozenset({"model": "m", "sinks": "wav", **extra}.items()))]

    assert at("time_to_first_chunk") == pytest.approx(0.010)
    assert at("duration", error_type="") == pytest.approx(0.5)
    assert at("acquire", connection_reused="true") == pytest.approx(0.002)
    assert at("sink_lateness", sink_kind="wav") == pytest.approx(0.0025)
    assert at("added_latency") == pytest.approx(0.0005)
    assert at("billed_characters") == 7
    assert at("audio") == pytest.approx(1.5)
    assert at("underruns") == 3
    assert at("retries") == 1
    assert at("interrupts") == 1
    assert at("utterances", outcome="interrupted") == 1
    assert "resumes" not in {k for k, _ in got}  # zero counts are not published
    assert all("bob" not in v for _, labels in got for _, v in labels)
    base = (("model", "m"), ("sinks", "wav"))
    assert all(f.labels[:2] == base for f in figures(rec, {"wav:x": "wav"}))



def test_every_metric_has_both_names_and_seconds_for_times() -> None:
    for spec in METRICS.values():
        assert spec.prometheus.startswith("tts_stream_")
        if spec.type == "histogram":
            assert spec.unit == "s" and spec.prometheus.endswith("_seconds")
    assert METRICS["time_to_first_chunk"].otel == "gen_ai.client.operation.time_to_first_chunk"
    assert METRICS["duration"].otel == "gen_ai.client.operation.duration"


# --- OpenTelemetry ----------------------------------------------------------------------------


async def test_otel_metrics_and_spans_of_real_utterances(
    server: LocalServer, voice: Voice, tmp_path: Path
) -> None:
    reader = InMemoryMetricReader()
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    exporter = OtelExporter(meter_provider=MeterProvider(metric_readers=[reader]),
                            tracer_provider=tracer_provider, spans=True)  # fmt: skip
    server.faults.set(stamp_deltas=True, times=None)
    async with asyncio.timeout(TIMEOUT), engine_for(server, observers=[exporter]) as engine:
        await engine.prewarm(voice, 1)
        m1 = await engine.say(voice, TEXT, sinks=[ArraySink(max_blocks=10_000)])
        m2 = await engine.say(voice, TEXT, sinks=[WavSink(tmp_path / "a.wav")])
    points = otel_points(reader)
    ttfc = points["gen_ai.client.operation.time_to_first_chunk"]
    assert sum(p.count for p in ttfc) == 2
    assert sum(p.sum for p in ttfc) == pytest.approx(
        (m1.first_audio_ms + m2.first_audio_ms) / 1000.0  # type: ignore[operator]
    )
    assert {p.attributes["tts_stream.sinks"] for p in ttfc} == {"array", "wav"}
    assert {p.attributes["gen_ai.request.model"] for p in ttfc} == {MODEL}
    duration = points["gen_ai.client.operation.duration"]
    assert sum(p.count for p in duration) == 2
    acquire = points["tts_stream.connection.acquire.duration"]
    # The first utterance took the prewarmed spare; the second a refilled one or a fresh dial.
    reused = [p.attributes["connection_reused"] for p in acquire]
    assert "true" in reused and set(reused) <= {"true", "false"}
    lateness = points["tts_stream.sink.lateness"]
    assert "wav" in {p.attributes["tts_stream.sink.kind"] for p in lateness}
    assert sum(p.count for p in points["tts_stream.engine.added_latency"]) == 2  # stamped
    billed = sum(p.value for p in points["tts_stream.billed_characters"])
    assert billed == m1.billed_characters + m2.billed_characters > 0
    audio_s = sum(p.value for p in points["tts_stream.audio.duration"])
    assert audio_s == pytest.approx((m1.audio_ms + m2.audio_ms) / 1000.0)
    assert outcomes(points) == {"ok": 2}
    # Never the user part of the voice name, never the key.
    values = list(all_attribute_values(points))
    assert not any("secretname" in v or server.api_key in v for v in values)
    # One utterance span per utterance, with its phases as children, in order.
    finished = spans.get_finished_spans()
    roots = [s for s in finished if s.name == "tts_stream.utterance"]
    assert len(roots) == 2
    for root in roots:
        kids = {s.name: s for s in finished if s.parent is not None
                and s.parent.span_id == root.context.span_id}  # fmt: skip
        assert set(kids) == {"acquire", "first_chunk", "synthesis"}
        (start, end), phase_acquire, phase_first, phase_synthesis = (
            span_times(s) for s in (root, kids["acquire"], kids["first_chunk"], kids["synthesis"])
        )
        assert start <= phase_acquire[0] <= phase_acquire[1]
        assert phase_first[1] == phase_synthesis[0]
        assert phase_synthesis[1] <= end
        assert all("secretname" not in str(v) for v in (root.attributes or {}).values())


async def test_otel_counts_errors_retries_and_interrupts(server: LocalServer, voice: Voice) -> None:
    reader = InMemoryMetricReader()
    exporter = OtelExporter(meter_provider=MeterProvider(metric_readers=[reader]))
    async with asyncio.timeout(TIMEOUT), engine_for(server, pool_size=0,
                                                    observers=[exporter]) as engine:  # fmt: skip
        server.faults.set(drop_after_deltas=0, times=1)  # lost before audio: one retry
        await engine.say(voice, TEXT, sinks=[ArraySink(max_blocks=10_000)])
        server.faults.set(drop_after_deltas=3, times=1)  # lost after audio: an error
        with pytest.raises(ConnectionLost):
            await engine.say(voice, TEXT, sinks=[ArraySink(max_blocks=10_000)])
        async with engine.speak(voice, sinks=[ArraySink(max_blocks=10_000)]) as speech:
            await speech.push(TEXT)
            await speech.commit()
            await speech.interrupt()
    points = otel_points(reader)
    assert sum(p.value for p in points["tts_stream.utterance.retries"]) == 1
    assert sum(p.value for p in points["tts_stream.utterance.interrupts"]) == 1
    assert outcomes(points) == {"ok": 1, "error": 1, "interrupted": 1}
    errors = [p for p in points["gen_ai.client.operation.duration"]
              if p.attributes.get("error.type")]  # fmt: skip
    assert [p.attributes["error.type"] for p in errors] == ["ConnectionLost"]


# --- Prometheus -------------------------------------------------------------------------------


async def scrape(url: str) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
    return {fam.name: fam for fam in text_string_to_metric_families(text)}


def sample_value(fam: Any, suffix: str = "", **labels: str) -> float:
    total = 0.0
    for s in fam.samples:
        if s.name == fam.name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
    return total


async def test_prometheus_endpoint_serves_utterances_and_pool_gauges(
    server: LocalServer, voice: Voice
) -> None:
    async with asyncio.timeout(TIMEOUT), engine_for(server, pool_size=1) as engine:
        prom = PrometheusExporter(engine)
        endpoint = prom.start_http(0)
        try:
            assert endpoint.host == "127.0.0.1"
            await engine.prewarm(voice, 2)
            fams = await scrape(endpoint.url)
            assert sample_value(fams["tts_stream_pool_spares_ready"], model=MODEL) == 2
            assert sample_value(fams["tts_stream_pool_dials_in_flight"]) == 0
            assert sample_value(fams["tts_stream_engine_accepting"]) == 1
            m = await engine.say(voice, TEXT, sinks=[ArraySink(max_blocks=10_000)])
            await engine.say(voice, TEXT, sinks=[ArraySink(max_blocks=10_000)])
            fams = await scrape(endpoint.url)
        finally:
            prom.close()
    ttfc = fams["tts_stream_time_to_first_chunk_seconds"]
    assert sample_value(ttfc, "_count", model=MODEL, sinks="array") == 2
    assert sample_value(fams["tts_stream_utterances"], "_total", outcome="ok") == 2
    assert sample_value(fams["tts_stream_billed_characters"], "_total") == 2 * m.billed_characters
    assert sample_value(fams["tts_stream_audio_seconds"], "_total") == pytest.approx(
        2 * m.audio_ms / 1000.0)  # fmt: skip
    acq = fams["tts_stream_pool_acquires"]
    assert sample_value(acq, "_total", warm="true") == 2  # both from prewarmed spares
    assert sample_value(acq, "_total", warm="false") == 0
    reused = fams["tts_stream_connection_acquire_seconds"]
    assert sample_value(reused, "_count", connection_reused="true") == 2
    assert sample_value(fams["tts_stream_speeches_in_flight"]) == 0


async def test_server_metrics_endpoint(server: LocalServer, voice: Voice) -> None:
    from tts_stream.server.metrics import serve_metrics

    endpoint = serve_metrics(server, port=0)
    try:
        async with asyncio.timeout(TIMEOUT), engine_for(server, pool_size=0) as engine:
            await engine.say(voice, TEXT, sinks=[ArraySink(max_blocks=10_000)])
            server.faults.set(refuse_handshake=503, times=1)
            await engine.say(voice, TEXT, sinks=[ArraySink(max_blocks=10_000)])  # retried
            server.faults.set(first_audio_delay_s=2.0, times=1)  # synthesizing, no audio yet
            async with engine.speak(voice, sinks=[ArraySink(max_blocks=10_000)]) as speech:
                await speech.push(TEXT)
                await speech.commit()
                await until(lambda: server.synthesis_queue()[1] == 1, within=TIMEOUT,
                            what="a response synthesizing")  # fmt: skip
                fams = await scrape(endpoint.url)
                assert sample_value(fams["tts_stream_server_sessions_active"]) == 1
                assert sample_value(fams["tts_stream_server_synthesis_running"]) == 1
                await speech.interrupt()
            st = server.stats()
            fams = await scrape(endpoint.url)
    finally:
        endpoint.close()
    assert sample_value(fams["tts_stream_server_sessions_opened"], "_total") == st.sessions_opened
    assert sample_value(fams["tts_stream_server_handshakes_refused"], "_total") == 1
    assert sample_value(fams["tts_stream_server_responses"], "_total") == st.responses >= 2
    assert sample_value(fams["tts_stream_server_synthesis_queue"]) == 0
    assert "tts_stream_server_errors" in fams


# --- engine.stats() and shutdown -----------------------------------------------------------------


async def test_stats_and_shutdown_drain_the_speech_in_flight(
    server: LocalServer, voice: Voice
) -> None:
    server.faults.set(drop_after_deltas=2, times=1)
    async with asyncio.timeout(TIMEOUT), engine_for(server, pool_size=0) as engine:
        with pytest.raises(ConnectionLost):
            await engine.say(voice, TEXT, sinks=[ArraySink(max_blocks=10_000)])
        arr = ArraySink(max_blocks=10_000)
        speaking = asyncio.Event()

        async def talk() -> UtteranceMetrics:
            async with engine.speak(voice, sinks=[arr]) as speech:
                speaking.set()
                await speech.push(TEXT)
                await asyncio.sleep(0.05)  # still pushing when the shutdown begins
                await speech.push(" And one more sentence.")
            return speech.metrics

        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(talk())
            await speaking.wait()
            st = engine.stats()
            assert st.speeches_in_flight == 1 and st.accepting
            assert st.errors == 1 and st.recent_errors[0].error.startswith("ConnectionLost")
            final = await engine.shutdown(drain_timeout=TIMEOUT)
        assert task.result().error is None  # drained, not cut
        assert final.speeches_in_flight == 0 and not final.accepting
        assert final.utterances == 2
        with pytest.raises(ClosedError):
            engine.speak(voice, sinks=[ArraySink()])
        await engine.shutdown()  # idempotent


async def test_shutdown_interrupts_what_does_not_drain_in_time(
    server: LocalServer, voice: Voice
) -> None:
    server.faults.set(stall_after_deltas=1, times=1)
    async with asyncio.timeout(TIMEOUT), engine_for(server, pool_size=0) as engine:
        speech = engine.speak(voice, sinks=[ArraySink(max_blocks=10_000)])
        async with speech:
            await speech.push(TEXT)
            await speech.commit()
            final = await engine.shutdown(drain_timeout=0.2)
            assert speech.metrics.interrupted  # its owner still leaves the block normally
        assert not final.accepting and final.speeches_in_flight == 1
        assert engine.history and list(engine.history)[-1].interrupted
