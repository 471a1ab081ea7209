"""Metrics: the recorder with explicit timestamps (pure), summaries, JSON lines, and the
numbers an utterance really produces against the LocalServer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from sinks import ArraySink, WavSink
from tests.conftest import Enroll
from tts_stream import Engine, Voice
from tts_stream.audio import SinkStats
from tts_stream.messages import VC_MODELS
from tts_stream.metrics import (
    AcquireInfo,
    History,
    Recorder,
    UtteranceMetrics,
    percentile,
    read_jsonl,
    summarize,
    summarize_records,
    to_jsonl,
    write_jsonl,
)
from tts_stream.protocol import ClientSession, Tally
from tts_stream.server import LocalServer

SILENCE = np.zeros(2400, np.int16)
VOICED = np.concatenate([np.zeros(1200, np.int16), np.full(1200, 5000, np.int16)])


def test_recorder_decomposes_latency_from_one_clock() -> None:
    rec = Recorder(model="m", voice="v", mode="server_commit", sample_rate=24000, started_at=9.0)
    rec.acquired(AcquireInfo(acquire_ms=3.0, was_warm=True, spare_age_s=1.5))
    rec.text_sent(10.000, 5)
    rec.text_sent(10.050, 7)
    rec.response_created(10.100)
    rec.delta(10.200, SILENCE, server_sent_at=10.199)
    rec.delta(10.210, VOICED, server_sent_at=10.208)
    rec.delta(10.260, SILENCE)
    rec.response_done(12)
    sinks = {"a": SinkStats("a", underruns=2, first_sample_at=10.230, dropped_samples=7)}
    m = rec.snapshot(sinks)
    assert (m.acquire_ms, m.was_warm, m.spare_age_s) == (3.0, True, 1.5)
    assert m.text_chars == 12 and m.billed_characters == 12 and m.responses == 1
    assert m.response_created_ms == pytest.approx(100.0)
    assert m.first_audio_ms == pytest.approx(200.0) == m.ttfb_ms
    assert m.first_voiced_ms == pytest.approx(210.0)
    assert m.leading_silence_ms == pytest.approx((2400 + 1200) / 24.0)
    assert m.sink_first_sample_ms == {"a": pytest.approx(230.0)}
    assert m.deltas == 3 and m.audio_ms == pytest.approx(300.0)
    assert m.max_gap_ms == pytest.approx(50.0)
    assert m.p95_gap_ms is not None and 10.0 <= m.p95_gap_ms <= 50.1
    assert m.synthesis_ms == pytest.approx(260.0)
    assert m.rtf == pytest.approx(260.0 / 300.0)
    assert m.underruns == 2 and m.dropped_samples == 7
    assert m.server_lag_ms_max == pytest.approx(2.0)
    assert m.started_at == 9.0


def test_gaps_are_measured_within_a_response_only() -> None:
    rec = Recorder(sample_rate=24000)
    rec.text_sent(0.0, 1)
    rec.response_created(0.1)
    rec.delta(0.2, SILENCE)
    rec.response_done(1)
    rec.response_created(5.0)  # a pause between responses is the text's, not the engine's
    rec.delta(5.1, SILENCE)
    rec.delta(5.12, SILENCE)
    m = rec.snapshot()
    assert m.max_gap_ms == pytest.approx(20.0)


def test_retry_forgets_the_failed_session_but_keeps_the_first_text_time() -> None:
    rec = Recorder(sample_rate=24000)
    rec.text_sent(1.0, 4)
    rec.delta(1.5, SILENCE)
    rec.forget_audio()
    rec.text_sent(2.0, 4)  # the replay
    rec.delta(2.2, VOICED)
    m = rec.snapshot()
    assert m.retries == 1 and m.deltas == 1 and m.text_chars == 4
    assert m.first_audio_ms == pytest.approx(1200.0)  # honest: from the user's first text


def test_empty_record() -> None:
    m = Recorder().snapshot()
    assert m.first_audio_ms is None and m.rtf is None and m.max_gap_ms is None


def test_percentiles_and_summaries() -> None:
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0], 100) == 2.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    s = summarize([None, *map(float, range(1, 101))])
    assert s.count == 100 and s.p50 == pytest.approx(50.5) and s.max == 100.0
    assert s.p95 == pytest.approx(95.05) and s.p99 == pytest.approx(99.01)
    assert summarize([None]).count == 0
    recs = [UtteranceMetrics(first_audio_ms=float(i), acquire_ms=None) for i in range(10)]
    out = summarize_records(recs, ["first_audio_ms", "acquire_ms"])
    assert out["first_audio_ms"].p50 == pytest.approx(4.5) and out["acquire_ms"].count == 0


def test_jsonl_round_trip_and_bounded_history(tmp_path: Path) -> None:
    recs = [UtteranceMetrics(voice="v", first_audio_ms=1.5, sink_first_sample_ms={"a": 2.0})] * 3
    text = to_jsonl(recs)
    assert text.count("\n") == 3
    path = tmp_path / "m.jsonl"
    write_jsonl(path, recs)
    write_jsonl(path, recs[:1])
    back = read_jsonl(path)
    assert len(back) == 4 and back[0] == recs[0]
    h = History(maxlen=2)
    for r in recs:
        h.add(r)
    assert len(h) == 2 and h.summary()["first_audio_ms"].count == 2


async def test_real_utterance_metrics_with_server_stamps(
    server: LocalServer, enroll: Enroll, tmp_path: Path
) -> None:
    voice = Voice(await enroll(server), VC_MODELS[0])
    server.faults.set(stamp_deltas=True)
    async with (
        asyncio.timeout(20.0),
        Engine(base_url=server.base_url, api_key=server.api_key, pool_size=0) as e,
    ):
        wav = WavSink(tmp_path / "m.wav")
        m = await e.say(voice, "Measured sentence.", sinks=[ArraySink(max_blocks=10_000), wav])
    assert m.server_lag_ms_p50 is not None and m.server_lag_ms_max is not None
    assert 0 <= m.server_lag_ms_p50 <= m.server_lag_ms_max + 0.1
    # the WAV sink stamps its first write; the array sink only when a consumer takes a block
    assert m.sink_first_sample_ms.keys() == {wav.name}
    assert m.first_audio_ms is not None
    assert m.sink_first_sample_ms[wav.name] >= m.first_audio_ms
    assert m.first_audio_ms is not None and m.first_voiced_ms is not None
    assert m.first_voiced_ms >= m.first_audio_ms
    assert m.billed_characters == len("Measured sentence.")
    assert m.rtf is not None and m.rtf < 1.0  # burst pacing: faster than real time
    assert UtteranceMetrics.from_dict(m.to_dict()) == m


async def test_realtime_pacing_shows_in_gaps_and_rtf(enroll: Enroll) -> None:
    async with (
        asyncio.timeout(20.0),
        LocalServer(port=0, backend="tone", pacing="realtime") as srv,
        Engine(base_url=srv.base_url, api_key=srv.api_key, pool_size=0) as e,
    ):
        voice = Voice(await enroll(srv), VC_MODELS[0])
        m = await e.say(voice, "Paced speech here.", sinks=[ArraySink(max_blocks=10_000)])
    assert m.audio_ms > 900
    assert m.rtf is not None and 0.5 < m.rtf < 3.0  # about real time (generous bounds)
    assert m.p95_gap_ms is not None and 40.0 < m.p95_gap_ms < 1000.0  # ~100 ms deltas


def test_the_recorder_and_the_session_count_with_one_tally() -> None:
    """Responses, deltas and billed characters are counted by ``protocol.Tally`` for a
    session and for an utterance alike; a retry forgets the audio, not the billing."""
    rec = Recorder()
    session = ClientSession(config={})
    assert type(rec.tally) is type(session.tally) is Tally
    rec.response_done(12)
    rec.delta(1.0, np.zeros(240, np.int16))
    rec.forget_audio()  # a retry on a fresh session
    rec.response_done(None)  # a legacy response.done without usage.characters
    rec.delta(2.0, np.zeros(240, np.int16))
    assert (rec.responses, rec.billed, rec.deltas) == (2, 12, 1)
    m = rec.snapshot()
    assert (m.responses, m.billed_characters, m.deltas) == (2, 12, 1)


def test_batched_histograms_equal_binning_each_delta_at_once() -> None:
    # The recorder bins gaps and lags per batch (every 1024 deltas and at a snapshot); the
    # histograms must be exactly those of binning each delta as it comes, across response
    # boundaries, a retry's forget_audio and several batches.
    rng = np.random.default_rng(7)
    rec = Recorder(sample_rate=24000)
    gaps: dict[int, int] = {}
    lags: dict[int, int] = {}
    max_gap, max_lag, last = 0.0, -1e9, None
    now = 100.0
    rec.text_sent(now, 1)
    for i in range(5000):
        if i % 700 == 0:
            rec.response_created(now)
            last = None
        if i == 2500:
            rec.forget_audio()
            last = None
        now += float(rng.exponential(0.02))
        sent = now - float(rng.uniform(-0.002, 0.03))
        rec.delta(now, SILENCE, server_sent_at=sent)
        if last is not None:
            gap = (now - last) * 1000.0
            max_gap = max(max_gap, gap)
            gaps[int(gap / 0.1)] = gaps.get(int(gap / 0.1), 0) + 1
        last = now
        lag = (now - sent) * 1000.0
        lags[int(max(lag, 0.0) / 0.1)] = lags.get(int(max(lag, 0.0) / 0.1), 0) + 1
        max_lag = max(max_lag, lag)
        if i % 999 == 0:
            m = rec.snapshot()  # a snapshot folds mid-stream too
        if i % 700 == 699:
            rec.response_done(1)
            last = None
    m = rec.snapshot()
    assert dict(rec._gaps) == gaps and sum(gaps.values()) > 4000
    assert dict(rec._lags) == lags and sum(lags.values()) == 5000
    assert m.max_gap_ms == max_gap
    assert m.server_lag_ms_max == max_lag
