"""tts_stream.integrations.livekit.TTS driven through LiveKit Agents' own stream classes.

``stream()`` and ``synthesize()`` run LiveKit's real ``SynthesizeStream`` / ``ChunkedStream``
machinery (its retry loop, ``AudioEmitter``, metrics monitor and error events) against a real
:class:`~tts_stream.Engine` and the local server on loopback; faults come from the server's
knobs. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from livekit.agents import (
    APIConnectionError,
    APIConnectOptions,
    APIStatusError,
    APITimeoutError,
)
from livekit.agents.metrics import TTSMetrics
from livekit.agents.tts import SynthesizedAudio, TTSError

from tts_stream import ClosedError, Engine, SpeechOptions, Voice
from tts_stream.integrations.livekit import TTS
from tts_stream.messages import VC_MODELS
from tts_stream.server import LocalServer

TOKENS = ["Hello", " from", " a", " cloned", " voice", ",", " token", " by", " token", "."]
TEXT = "".join(TOKENS)
NO_RETRY = APIConnectOptions(max_retry=0, retry_interval=0.0, timeout=5.0)
RETRY = APIConnectOptions(max_retry=2, retry_interval=0.0, timeout=5.0)


@pytest.fixture
async def engine(server: LocalServer) -> AsyncIterator[Engine]:
    async with Engine(base_url=server.base_url, api_key=server.api_key) as eng:
        yield eng


@pytest.fixture
async def cold(server: LocalServer) -> AsyncIterator[Engine]:
    """An engine without warm spares: every session is a new handshake, in order, so the
    fault knobs (which count handshakes) hit exactly the sessions the test means."""
    async with Engine(base_url=server.base_url, api_key=server.api_key, pool_size=0) as eng:
        yield eng


@pytest.fixture
async def cloned(engine: Engine, voice: str) -> Voice:
    return await engine.voices.find(voice)


class Events:
    """What the TTS emitted: metrics and errors."""

    def __init__(self, t: TTS) -> None:
        self.metrics: list[TTSMetrics] = []
        self.errors: list[TTSError] = []
        self._changed = asyncio.Event()
        t.on("metrics_collected", lambda m: self._add(self.metrics, m))
        t.on("error", lambda e: self._add(self.errors, e))

    def _add(self, into: list[Any], item: Any) -> None:
        into.append(item)
        self._changed.set()

    async def wait(self, ready: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not ready():
                self._changed.clear()
                await self._changed.wait()


async def speak_stream(
    t: TTS, tokens: list[str], conn: APIConnectOptions = NO_RETRY
) -> list[SynthesizedAudio]:
    async with t.stream(conn_options=conn) as stream:
        for token in tokens:
            stream.push_text(token)
        stream.end_input()
        return [ev async for ev in stream]


def samples(events: list[SynthesizedAudio]) -> int:
    return sum(ev.frame.samples_per_channel for ev in events)


async def test_stream_speaks_tokens_as_one_segment_with_metrics(
    engine: Engine, cloned: Voice
) -> None:
    t = TTS(voice=cloned, engine=engine)
    seen = Events(t)
    await engine.prewarm(cloned, 1)
    events = await speak_stream(t, TOKENS)

    (record,) = engine.history  # one speech for the stream
    assert record.text_chars == len(TEXT)
    assert samples(events) == round(record.audio_ms * 24)  # every sample, once
    assert all(ev.frame.sample_rate == 24000 for ev in events)
    assert len({ev.segment_id for ev in events}) == 1 and events[-1].is_final
    await seen.wait(lambda: bool(seen.metrics))
    (m,) = seen.metrics
    assert m.streamed and m.characters_count == len(TEXT)
    assert 0 < m.ttfb < 5 and m.audio_duration == pytest.approx(record.audio_ms / 1000)
    assert m.connection_reused is True  # the prewarmed spare
    assert record.acquire_ms is not None
    assert m.acquire_time == pytest.approx(record.acquire_ms / 1000)
    assert not seen.errors


async def test_synthesize_is_chunked_with_metrics(engine: Engine, cloned: Voice) -> None:
    t = TTS(voice=cloned, engine=engine, sample_rate=16000)
    seen = Events(t)
    async with t.synthesize(TEXT, conn_options=NO_RETRY) as chunked:
        events = [ev async for ev in chunked]

    (record,) = engine.history
    assert record.sample_rate == 16000
    assert abs(samples(events) - round(record.audio_ms * 16)) <= 160  # LiveKit's 10 ms framing
    await seen.wait(lambda: bool(seen.metrics))
    (m,) = seen.metrics
    assert not m.streamed and m.ttfb > 0 and m.characters_count == len(TEXT)


async def test_a_drop_after_audio_raises_once_and_is_not_retried(
    server: LocalServer, cold: Engine, cloned: Voice
) -> None:
    t = TTS(voice=cloned, engine=cold)
    seen = Events(t)
    long = ["This answer is long enough to lose the connection in the middle of it. "] * 3
    server.faults.set(drop_after_deltas=3, times=1)
    before = server.stats().sessions_opened
    heard: list[SynthesizedAudio] = []
    with pytest.raises(APIConnectionError) as info:
        async with t.stream(conn_options=RETRY) as stream:  # LiveKit may retry: it must not
            for token in long:
                stream.push_text(token)
            stream.end_input()
            async for ev in stream:
                heard.append(ev)

    assert info.value.retryable is False
    assert not isinstance(info.value, APITimeoutError)
    assert 0 < samples(heard) <= 3 * 2400  # the three deltas received, never spoken again
    assert server.stats().sessions_opened - before == 1
    (error,) = seen.errors  # raised once, not recoverable
    assert error.recoverable is False


@pytest.mark.parametrize("drops", [1, 3], ids=["engine-retries", "livekit-retries"])
async def test_a_drop_before_audio_is_retried_and_heard_once(
    server: LocalServer, cold: Engine, cloned: Voice, drops: int
) -> None:
    t = TTS(voice=cloned, engine=cold)
    seen = Events(t)
    server.faults.set(drop_after_deltas=0, times=drops)  # the engine retries twice itself
    events = await speak_stream(t, TOKENS, RETRY)
    clean = samples(await speak_stream(t, TOKENS))

    assert samples(events) == clean  # heard once, not twice
    assert len({ev.request_id for ev in events}) == 1  # from one attempt
    # Three drops outlast the engine's own two retries: LiveKit retries once more.
    assert [e.recoverable for e in seen.errors] == ([] if drops == 1 else [True])


async def test_a_timeout_is_an_api_timeout_error(
    server: LocalServer, cold: Engine, cloned: Voice
) -> None:
    options = SpeechOptions(drain_timeout=0.5)
    t = TTS(voice=cloned, engine=cold, speak_options={"options": options})
    server.faults.set(stall_after_deltas=0, times=1)
    with pytest.raises(APITimeoutError) as info:
        await speak_stream(t, TOKENS)
    assert info.value.retryable is True  # nothing was heard yet


async def test_a_server_error_is_an_api_status_error(
    server: LocalServer, cold: Engine, cloned: Voice
) -> None:
    t = TTS(voice=cloned, engine=cold)
    seen = Events(t)
    server.faults.set(
        error_event_at="append", error_code="InternalError", error_close_code=1011, times=1
    )
    with pytest.raises(APIStatusError) as info:
        await speak_stream(t, TOKENS, RETRY)
    err = info.value
    assert err.body == {"code": "InternalError"}
    assert isinstance(err.status_code, int)
    assert [e.recoverable for e in seen.errors] == [False]  # not retryable: raised once


async def test_a_consumer_that_stops_reading_pushes_back(
    server: LocalServer, engine: Engine, cloned: Voice
) -> None:
    t = TTS(voice=cloned, engine=engine)
    megabyte = "All work and no play makes a long answer. " * (1_000_000 // 43)
    stream = t.stream(conn_options=NO_RETRY)
    stream.push_text(megabyte)
    stream.end_input()
    first = await anext(stream)  # the audio started...
    await asyncio.sleep(1.0)  # ...and nobody reads it now
    sink = stream._sink
    assert sink is not None
    assert first.frame.samples_per_channel > 0
    assert sink.outstanding_samples <= 24000 + 4800  # the hand-off bound (+ one delta)
    await stream.aclose()

    (record,) = engine.history
    assert record.text_chars <= 2000 + 500  # push waited: the megabyte never went in whole
    assert record.audio_ms < 10_000


async def test_own_engine_voice_lookup_and_prewarm(server: LocalServer, voice: str) -> None:
    t = TTS(voice=voice, base_url=server.base_url, api_key=server.api_key)
    seen = Events(t)
    t.prewarm()  # LiveKit's call is synchronous: it starts a task of the TTS's own
    (task,) = [x for x in asyncio.all_tasks() if x.get_name() == "tts-stream-prewarm"]
    async with asyncio.timeout(10):
        await task
    events = await speak_stream(t, TOKENS)
    assert samples(events) > 0
    await seen.wait(lambda: bool(seen.metrics))
    assert seen.metrics[0].connection_reused is True
    assert t.model == VC_MODELS[0]
    await t.aclose()  # closes the engine it opened
    with pytest.raises(ClosedError):
        await t.ready()
