"""TtsStreamTTSService inside real Pipecat, against the local server on loopback.

Every test drives the service through Pipecat's own harness, ``pipecat.tests.utils.run_test``
(a real ``PipelineWorker`` with the service between a source and a sink), with a real
:class:`~tts_stream.Engine` talking to a :class:`~tts_stream.server.LocalServer`. Failures
come from the server's fault knobs. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import wave
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from loguru import logger
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData, TTSUsageMetricsData
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.tts_service import TextAggregationMode
from pipecat.tests.utils import SleepFrame, run_test

from sinks import ArraySink, WavSink
from tests.conftest import Enroll
from tts_stream import Engine, SampleRejected, Voice
from tts_stream.integrations.enroll import clone_voice, delete_voice
from tts_stream.integrations.pipecat import SinkOutput, TtsStreamTTSService
from tts_stream.messages import VC_MODELS
from tts_stream.server import LocalServer
from tts_stream.testing.samplegen import good_sample_wav, low_rate_wav

PARAMS = PipelineParams(enable_metrics=True, enable_usage_metrics=True)
TOKENS = ["Hello", " there", ",", " how", " are", " you", " today", "?", " I", " am", " fine", "."]


@pytest.fixture
def pipecat_errors() -> Iterator[list[str]]:
    """Everything Pipecat logs at ERROR level or above during the test."""
    records: list[str] = []
    hid = logger.add(lambda m: records.append(str(m)), level="ERROR")
    try:
        yield records
    finally:
        logger.remove(hid)


@pytest.fixture
async def engine(server: LocalServer) -> AsyncIterator[Engine]:
    async with Engine(base_url=server.base_url, api_key=server.api_key) as eng:
        yield eng


@pytest.fixture
async def cloned(engine: Engine, voice: str) -> Voice:
    return await engine.voices.find(voice)


def turn(*texts: str) -> list[Frame]:
    """One LLM reply: start, a text frame per text, end."""
    return [LLMFullResponseStartFrame(), *map(LLMTextFrame, texts), LLMFullResponseEndFrame()]


def contexts(frames: Sequence[Frame]) -> list[str]:
    """Context ids of the TTSStartedFrames, in order."""
    ids = []
    for f in frames:
        if isinstance(f, TTSStartedFrame):
            assert f.context_id is not None  # the service names every turn
            ids.append(f.context_id)
    return ids


def audio_of(frames: Sequence[Frame], context_id: str) -> list[TTSAudioRawFrame]:
    return [f for f in frames if isinstance(f, TTSAudioRawFrame) and f.context_id == context_id]


def ttfbs(frames: Sequence[Frame]) -> list[float]:
    return [
        d.value
        for f in frames
        if isinstance(f, MetricsFrame)
        for d in f.data
        if isinstance(d, TTFBMetricsData) and d.value > 0
    ]


def assert_turn_order(frames: Sequence[Frame], context_id: str) -> None:
    """TTSStartedFrame, then the turn's audio, then TTSStoppedFrame, once each."""
    kinds = [
        type(f)
        for f in frames
        if isinstance(f, TTSStartedFrame | TTSAudioRawFrame | TTSStoppedFrame)
        and f.context_id == context_id
    ]
    assert kinds[0] is TTSStartedFrame and kinds[-1] is TTSStoppedFrame, kinds
    assert kinds.count(TTSStartedFrame) == 1 and kinds.count(TTSStoppedFrame) == 1
    assert TTSAudioRawFrame in kinds


def errors(up: Sequence[Frame]) -> list[ErrorFrame]:
    return [f for f in up if isinstance(f, ErrorFrame)]


async def test_sentence_turns_frames_duration_and_ttfb_every_turn(
    engine: Engine, cloned: Voice, pipecat_errors: list[str]
) -> None:
    tts = TtsStreamTTSService(voice=cloned, engine=engine)
    frames = [
        *turn("Hello there. ", "How are you today?"),
        SleepFrame(0.3),
        *turn("Second turn. ", "Still fine?"),
        SleepFrame(0.3),
        *turn("Third and last."),
    ]
    down, up = await run_test(tts, frames_to_send=frames, pipeline_params=PARAMS)

    assert not errors(up) and not pipecat_errors
    ids = contexts(down)
    assert len(ids) == 3
    records = list(engine.history)
    assert len(records) == 3  # one tts-stream speech per Pipecat turn
    for context_id, record in zip(ids, records, strict=True):
        assert_turn_order(down, context_id)
        frames_ = audio_of(down, context_id)
        samples = sum(len(f.audio) // 2 for f in frames_)
        assert all(f.sample_rate == 24000 and f.num_channels == 1 for f in frames_)
        assert samples == round(record.audio_ms * 24000 / 1000)  # every sample, once
        assert record.was_warm  # prewarmed at start, refilled after each turn
    assert [r.responses for r in records] == [2, 2, 1]  # each sentence committed at once
    assert len(ttfbs(down)) == 3  # TTFB measured on every turn, not only the first
    usage = [d for f in down if isinstance(f, MetricsFrame) for d in f.data]
    assert any(isinstance(d, TTSUsageMetricsData) for d in usage)
    assert tts._settings.model == VC_MODELS[0] and tts._settings.voice == cloned.name


async def test_token_mode_is_one_speech_per_turn(
    engine: Engine, cloned: Voice, pipecat_errors: list[str]
) -> None:
    tts = TtsStreamTTSService(
        voice=cloned, engine=engine, text_aggregation_mode=TextAggregationMode.TOKEN
    )
    frames = [*turn(*TOKENS), SleepFrame(0.3), *turn(*TOKENS)]
    down, up = await run_test(tts, frames_to_send=frames, pipeline_params=PARAMS)

    assert not errors(up) and not pipecat_errors
    records = list(engine.history)
    assert len(records) == 2 and len(contexts(down)) == 2
    for context_id, record in zip(contexts(down), records, strict=True):
        assert_turn_order(down, context_id)
        assert record.text_chars == len("".join(TOKENS))  # every token went into one speech
    assert len(ttfbs(down)) == 2


async def test_tts_speak_frame_and_an_owned_engine_found_by_voice_name(
    server: LocalServer, voice: str, pipecat_errors: list[str]
) -> None:
    # No engine and no model: the service opens its own engine and looks the voice up.
    tts = TtsStreamTTSService(voice=voice, base_url=server.base_url, api_key=server.api_key)
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame("Spoken from a frame.")])

    assert not errors(up) and not pipecat_errors
    (context_id,) = contexts(down)
    assert_turn_order(down, context_id)
    assert tts._settings.model == VC_MODELS[0]
    stats = server.stats()
    assert stats.sessions_active == 0  # the owned engine was closed with the pipeline


async def test_an_8khz_pipeline_makes_the_server_synthesize_at_8khz(
    engine: Engine, cloned: Voice
) -> None:
    tts = TtsStreamTTSService(voice=cloned, engine=engine)
    params = PipelineParams(audio_out_sample_rate=8000)
    down, up = await run_test(tts, frames_to_send=turn("Telephone voice."), pipeline_params=params)

    assert not errors(up)
    (context_id,) = contexts(down)
    frames_ = audio_of(down, context_id)
    assert frames_ and all(f.sample_rate == 8000 for f in frames_)
    (record,) = engine.history
    assert record.sample_rate == 8000  # asked of the server, not resampled here
    assert sum(len(f.audio) // 2 for f in frames_) == round(record.audio_ms * 8)


async def test_an_unsupported_pipeline_rate_is_resampled(engine: Engine, cloned: Voice) -> None:
    tts = TtsStreamTTSService(voice=cloned, engine=engine)
    params = PipelineParams(audio_out_sample_rate=44100)
    down, up = await run_test(tts, frames_to_send=turn("CD quality."), pipeline_params=params)

    assert not errors(up)
    (context_id,) = contexts(down)
    frames_ = audio_of(down, context_id)
    (record,) = engine.history
    assert record.sample_rate == 24000
    samples = sum(len(f.audio) // 2 for f in frames_)
    assert all(f.sample_rate == 44100 for f in frames_)
    assert abs(samples - record.audio_ms * 44.1) < 0.05 * samples


async def test_barge_in_stops_the_turn_and_the_next_turn_is_warm(enroll: Enroll) -> None:
    async with (
        LocalServer(backend="tone", pacing="realtime") as srv,
        Engine(base_url=srv.base_url, api_key=srv.api_key) as engine,
    ):
        cloned = await engine.voices.find(await enroll(srv))
        tts = TtsStreamTTSService(voice=cloned, engine=engine)
        long_text = "This is a long answer that the user will cut short. " * 6
        frames = [
            *turn(long_text),
            SleepFrame(0.6),
            InterruptionFrame(),
            SleepFrame(0.3),
            *turn("Yes?"),
        ]
        down, up = await run_test(tts, frames_to_send=frames, pipeline_params=PARAMS)

    assert not errors(up)
    first, second = contexts(down)
    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    assert audio_of(down[:cut], first)  # it was speaking
    assert not audio_of(down[cut:], first)  # and nothing of it came after the barge-in
    assert not any(isinstance(f, TTSStoppedFrame) and f.context_id == first for f in down[cut:])
    assert_turn_order(down[cut:], second)
    (answer,) = [r for r in engine.history if not r.interrupted]
    assert len(engine.history) == 2
    assert answer.was_warm  # the next turn started on a warm session
    report = tts.last_interrupt_report
    assert report is not None
    delivered = sum(len(f.audio) // 2 for f in audio_of(down, first))
    assert report.played_ms["pipecat"] == pytest.approx(delivered / 24, abs=1.0)
    assert len(ttfbs(down)) == 2


async def test_unknown_voice_name_is_an_error_frame(
    server: LocalServer, engine: Engine
) -> None:
    tts = TtsStreamTTSService(voice="qwen-tts-vc-nobody-voice-1", engine=engine)
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame("Hello?")])

    assert any("not found" in e.error for e in errors(up))
    assert not [f for f in down if isinstance(f, TTSAudioRawFrame)]


async def test_unknown_voice_with_a_model_is_an_error_frame(
    server: LocalServer, engine: Engine
) -> None:
    tts = TtsStreamTTSService(
        voice="qwen-tts-vc-nobody-voice-1", model=VC_MODELS[0], engine=engine
    )
    down, up = await run_test(tts, frames_to_send=turn("Hello?"))

    assert any("is not supported" in e.error for e in errors(up))
    assert not [f for f in down if isinstance(f, TTSAudioRawFrame)]


async def test_server_error_is_an_error_frame_and_the_next_turn_works(
    server: LocalServer, engine: Engine, cloned: Voice
) -> None:
    tts = TtsStreamTTSService(voice=cloned, engine=engine)
    await engine.prewarm(cloned, 1)  # the service's spare: the fault hits the turn's session
    server.faults.set(
        error_event_at="delta:2", error_code="InternalError", error_close_code=1011, times=1
    )
    frames = [*turn("This turn fails after some audio."), SleepFrame(0.3), *turn("This works.")]
    down, up = await run_test(tts, frames_to_send=frames, pipeline_params=PARAMS)

    (error,) = errors(up)
    assert "tts-stream" in error.error
    first, second = contexts(down)
    assert_turn_order(down, first)  # the audio received before the error, then the stop
    assert_turn_order(down, second)


class Gate(FrameProcessor):
    """A downstream step that holds audio until opened: a paused pipeline.

    ``direct``: it runs inside the caller's push (so the service's own push waits), else it
    has its own queue like most Pipecat processors (so the service never feels it).
    """

    def __init__(self, *, direct: bool) -> None:
        super().__init__(enable_direct_mode=direct)
        self.open = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            async with asyncio.timeout(20):
                await self.open.wait()
        await self.push_frame(frame, direction)


@pytest.mark.parametrize("direct", [True, False], ids=["pushes-back", "queues"])
async def test_a_paused_pipeline_keeps_memory_bounded(
    server: LocalServer, engine: Engine, cloned: Voice, direct: bool
) -> None:
    tts = TtsStreamTTSService(voice=cloned, engine=engine)
    gate = Gate(direct=direct)
    # A TTSSpeakFrame goes to the service as one text (a 1 MB LLMTextFrame would spend
    # minutes in Pipecat's own sentence sequencer before reaching the service).
    megabyte = "All work and no play makes a long answer. " * (1_000_000 // 43)
    seen: dict[str, Any] = {}

    class Probe(FrameProcessor):
        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, InterruptionFrame):
                seen["samples_sent"] = server.stats().audio_samples_sent
                gate.open.set()
            await self.push_frame(frame, direction)

    frames = [TTSSpeakFrame(megabyte), SleepFrame(1.5), InterruptionFrame(), SleepFrame(0.2)]
    down, up = await run_test(
        Pipeline([tts, gate, Probe()]), frames_to_send=frames, pipeline_params=PARAMS
    )

    assert not errors(up)
    (record,) = engine.history
    assert record.interrupted
    # Paused for 1.5 s with a megabyte of text: the speech took in one text budget
    # (max_pending_chars) and read a few seconds of audio (the fan-out's lane, the hand-off's
    # bound, the paced lead), not the hours of audio the text holds. What the server made
    # beyond that for the budget waits in the socket buffers, unread.
    assert record.text_chars <= 2000 + 500
    assert 0 < record.audio_ms < 10_000, record.audio_ms
    assert seen["samples_sent"] / 24000 < 0.01 * len(megabyte)  # seconds, vs 1 MB of text
    report = tts.last_interrupt_report
    assert report is not None
    held = 0.0 if direct else (1.5 + 2.0) * 1000  # pushed on, queued behind the gate
    assert report.played_ms["pipecat"] <= held + 100


async def test_clone_voice_checks_locally_then_feeds_the_service(server: LocalServer) -> None:
    url, key = server.base_url, server.api_key
    before = server.stats().http_requests
    with pytest.raises(SampleRejected) as info:
        await clone_voice(low_rate_wav(), preferred_name="bad", base_url=url, api_key=key)
    assert "24" in str(info.value)  # names the rule it broke (the sample rate)
    assert server.stats().http_requests == before  # nothing was sent

    voice = await clone_voice(good_sample_wav(), preferred_name="bot", base_url=url, api_key=key)
    assert voice.target_model == VC_MODELS[0]
    tts = TtsStreamTTSService(voice=voice, base_url=url, api_key=key)
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame("Cloned for Pipecat.")])
    assert not errors(up) and audio_of(down, contexts(down)[0])
    assert await delete_voice(voice, base_url=url, api_key=key) is True
    assert await delete_voice(voice, base_url=url, api_key=key) is False


async def test_sink_output_writes_and_interrupts_tts_stream_sinks(
    enroll: Enroll, tmp_path: Path
) -> None:
    async with (
        LocalServer(backend="tone", pacing="realtime") as srv,
        Engine(base_url=srv.base_url, api_key=srv.api_key) as engine,
    ):
        cloned = await engine.voices.find(await enroll(srv))
        tts = TtsStreamTTSService(voice=cloned, engine=engine)
        wav, array = WavSink(tmp_path / "bot.wav"), ArraySink(max_blocks=10_000)
        out = SinkOutput([wav, array])
        frames = [*turn("A long answer that is cut short by the caller. " * 4),
                  SleepFrame(0.6), InterruptionFrame(), SleepFrame(0.2)]  # fmt: skip
        down, up = await run_test(Pipeline([tts, out]), frames_to_send=frames)

    assert not errors(up)
    first = contexts(down)[0]
    passed = sum(len(f.audio) // 2 for f in audio_of(down, first))
    stats = wav.stats()
    assert stats.samples_written == passed > 0  # every frame that went through, no more
    with wave.open(str(tmp_path / "bot.wav"), "rb") as w:
        assert w.getnframes() == passed
    assert array.stats().samples_written == passed


def test_the_frameworks_benchmark_runs(tmp_path: Path) -> None:
    """``bench/frameworks.py`` end to end in a tiny configuration (so it never rots).

    It makes pipecat-dashscope's own venv on first use (``bench/.venv-pipecat-dashscope``),
    so the first run installs from the package index.
    """
    out = tmp_path / "frameworks.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.frameworks", "--n", "1", "--warmup", "0",
         "--bargein", "1", "--out", str(out)],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
        timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0]["kind"] == "env" and records[-1]["kind"] == "summary"
    summary = records[-1]
    for side in ("tts-stream", "pipecat-dashscope"):
        assert summary[side]["ttfb_ms"]["count"] == 1
        assert summary[side]["bargein_last_audio_ms"]["count"] == 1
    assert isinstance(summary["ttfb_ratio_p50"], float)  # the figure itself is for bench/
    assert "TTFB ratio" in out.with_suffix(".md").read_text()
