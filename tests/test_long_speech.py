"""Long speech over loopback: keepalive under back-pressure, inactivity-bounded waits, and
errors that name why a connection died (issue 9, defects 1 and 2).

A *real-time sink* is an :class:`~sinks.RtpSink` sending G.711 to a UDP receiver on
127.0.0.1: it consumes audio at playback speed (a 20 ms packet grid), so a burst server is
held back by TCP flow control for as long as the speech lasts. A *real-time server* is a
``LocalServer(pacing="realtime")``. Short tests use a short keepalive (``ping_interval``)
and inactivity limit so that the old behaviour fails within seconds; one test runs more
than three minutes of audio with the default settings, both ways at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import wave
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sinks import ArraySink, RtpSink, WavSink
from tests.conftest import Enroll
from tests.rtp_receiver import UdpReceiver
from tts_stream import ConnectionLost, Engine, SpeechOptions, Timeout, Voice
from tts_stream.config import Endpoint
from tts_stream.connection import Connection
from tts_stream.messages import VC_MODELS
from tts_stream.server import LocalServer

MODEL = VC_MODELS[0]
MS_PER_CHAR = 60  # the tone backend: ~60 ms of audio per character at speech_rate 1


def text_for(seconds: float) -> str:
    """Sentences of the tone backend's text that make about ``seconds`` of audio."""
    sentence = "This sentence is spoken by a cloned voice for a long time. "
    n = int(seconds * 1000 / MS_PER_CHAR / len(sentence)) + 1
    return sentence * n


@contextlib.asynccontextmanager
async def rtp_leg() -> AsyncIterator[tuple[RtpSink, UdpReceiver]]:
    async with UdpReceiver(parse=False) as rx:
        yield RtpSink("127.0.0.1", rx.port, codec="pcmu"), rx


async def enrolled(srv: LocalServer, enroll: Enroll) -> Voice:
    return Voice(await enroll(srv), MODEL)


async def test_keepalive_survives_back_pressure_from_a_real_time_sink(
    server: LocalServer, enroll: Enroll
) -> None:
    """A burst server into a real-time sink: the reader is held for the whole speech; a
    keepalive that needs the pong read meanwhile killed it after ping_interval+ping_timeout."""
    voice = await enrolled(server, enroll)
    seconds = 20.0  # at 48 kHz: more than the channel, the queues and the socket buffers hold
    async with (
        asyncio.timeout(seconds * 3 + 30),
        rtp_leg() as (rtp, rx),
        Engine(base_url=server.base_url, api_key=server.api_key, pool_size=0,
               ping_interval=0.3, ping_timeout=0.3) as engine,
    ):  # fmt: skip
        t0 = time.monotonic()
        m = await engine.say(voice, text_for(seconds), sinks=[rtp], sample_rate=48000)
        took = time.monotonic() - t0
    assert m.error is None
    assert m.audio_ms >= seconds * 1000
    assert took >= seconds * 0.9  # it really was consumed at playback speed
    assert rtp.stats().samples_played / 48000 >= seconds * 0.99
    assert len(rx.arrivals) >= seconds * 1000 / 20 * 0.99  # 20 ms packets


@pytest.mark.parametrize(
    "opts", [SpeechOptions(idle_timeout=1.0), SpeechOptions(drain_timeout=1.0)]
)
async def test_inactivity_not_length_bounds_the_finish(enroll: Enroll, opts: SpeechOptions) -> None:
    """A real-time server into a fast sink: audio keeps arriving for longer than the
    inactivity limit; the finish must wait as long as it progresses. ``drain_timeout`` (the
    old name) keeps working, with the inactivity meaning."""
    seconds = 4.0
    async with LocalServer(port=0, backend="tone", pacing="realtime") as srv:
        voice = await enrolled(srv, enroll)
        arr = ArraySink(max_blocks=100_000)
        async with (
            asyncio.timeout(seconds * 3 + 30),
            Engine(base_url=srv.base_url, api_key=srv.api_key, pool_size=0, speech=opts) as e,
        ):
            m = await e.say(voice, text_for(seconds), sinks=[arr])
            got = await arr.read_all(within=10)
    assert m.error is None and m.audio_ms >= seconds * 1000
    assert got.size >= seconds * 24000


async def test_a_stall_times_out_after_the_inactivity_limit(
    server: LocalServer, enroll: Enroll
) -> None:
    voice = await enrolled(server, enroll)
    server.faults.set(stall_after_deltas=3)
    opts = SpeechOptions(idle_timeout=0.5)
    arr = ArraySink(max_blocks=10_000)
    async with (
        asyncio.timeout(30),
        Engine(base_url=server.base_url, api_key=server.api_key, pool_size=0, speech=opts) as e,
    ):
        t0 = time.monotonic()
        with pytest.raises(Timeout, match=r"0\.5 s without progress") as info:
            await e.say(voice, "A sentence that stalls after three deltas.", sinks=[arr])
        took = time.monotonic() - t0
    assert "session.finished" in str(info.value)
    assert took < 10  # generous: the limit is 0.5 s of silence


@pytest.mark.parametrize(
    ("knobs", "expect"),
    [
        ({"close_after_deltas": 4, "close_code": 1011, "close_reason": "overloaded"},
         r"closed by the server with code 1011 \('overloaded'\)"),
        ({"drop_after_deltas": 4}, r"dropped by the server without a close frame \(1006\)"),
    ],
)  # fmt: skip
async def test_a_lost_connection_names_the_cause(
    server: LocalServer, enroll: Enroll, knobs: dict[str, Any], expect: str
) -> None:
    voice = await enrolled(server, enroll)
    server.faults.set(**knobs)
    async with (
        asyncio.timeout(30),
        Engine(base_url=server.base_url, api_key=server.api_key, pool_size=0) as e,
    ):
        with pytest.raises(ConnectionLost, match=expect) as info:
            await e.say(voice, text_for(3), sinks=[ArraySink(max_blocks=10_000)])
    assert info.value.audio_received


class _Freezer:
    """A TCP relay on 127.0.0.1 in front of the server that can go silent both ways
    (``freeze()``): a network partition, the peer alive for TCP but delivering nothing."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._frozen = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> _Freezer:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._server.wait_closed()

    def freeze(self) -> None:
        self._frozen.set()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers += [writer, up_w]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    if self._frozen.is_set():
                        await asyncio.sleep(3600)  # swallow: cancelled on close
                    dst.write(data)
                    await dst.drain()

        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.timeout(120), asyncio.TaskGroup() as tg:
                tg.create_task(pipe(reader, up_w))
                tg.create_task(pipe(up_r, writer))


async def test_a_silent_peer_is_named_by_the_keepalive(server: LocalServer, enroll: Enroll) -> None:
    voice = await enrolled(server, enroll)
    server.faults.set(first_audio_delay_s=60)  # the session is silent after session.updated
    async with _Freezer(server.port) as relay:
        async with (
            asyncio.timeout(30),
            Engine(base_url=f"http://127.0.0.1:{relay.port}", api_key=server.api_key,
                   pool_size=0, ping_interval=0.3, ping_timeout=0.3) as e,
        ):  # fmt: skip
            # No retry: the relay swallows a fresh connection as well.
            speech = e.speak(voice, sinks=[ArraySink(max_blocks=100)],
                             options=SpeechOptions(retries=0))  # fmt: skip
            t0 = time.monotonic()
            with pytest.raises(ConnectionLost, match=r"keepalive timeout") as info:
                async with speech:
                    await speech.push("Nobody will answer this.")
                    relay.freeze()
            took = time.monotonic() - t0
    assert "no pong within 0.3 s" in str(info.value)
    assert took < 15


async def test_three_minutes_into_a_real_time_sink_and_from_a_real_time_server(
    enroll: Enroll, tmp_path: object
) -> None:
    """The issue's figure, default settings: >= 3 minutes of audio, both at once."""
    seconds = 185.0
    text = text_for(seconds)
    async with (
        LocalServer(port=0, backend="tone") as burst,
        LocalServer(port=0, backend="tone", pacing="realtime") as paced,
        rtp_leg() as (rtp, rx),
    ):
        v_burst, v_paced = await enrolled(burst, enroll), await enrolled(paced, enroll)
        wav_path = f"{tmp_path}/paced.wav"
        async with (
            asyncio.timeout(seconds * 2 + 60),
            Engine(base_url=burst.base_url, api_key=burst.api_key, pool_size=0) as e1,
            Engine(base_url=paced.base_url, api_key=paced.api_key, pool_size=0) as e2,
        ):
            m1, m2 = await asyncio.gather(
                e1.say(v_burst, text, sinks=[rtp], sample_rate=24000),
                e2.say(v_paced, text, sinks=[WavSink(wav_path)]),
            )
    for m in (m1, m2):
        assert m.error is None
        assert m.audio_ms >= seconds * 1000
    assert rtp.stats().samples_played / 24000 >= seconds * 0.99
    assert len(rx.arrivals) >= seconds * 1000 / 20 * 0.99
    with wave.open(wav_path) as w:
        assert w.getnframes() / w.getframerate() >= seconds


async def test_an_idle_healthy_connection_is_pinged_and_stays_open(
    server: LocalServer, enroll: Enroll
) -> None:
    """The keepalive runs while the socket is quiet: pings go out and their pongs come back
    (the connection measures the round trip of each pong), and nothing is closed."""
    voice = await enroll(server)
    ep = Endpoint.resolve(base_url=server.base_url, api_key=server.api_key)
    async with (
        asyncio.timeout(30),
        Connection(ep, model=MODEL, session={"voice": voice}, ping_interval=0.1,
                   ping_timeout=0.5) as conn,
    ):  # fmt: skip
        assert conn.latency == 0.0
        await asyncio.sleep(1.0)  # idle on purpose: the condition under test
        assert conn.latency > 0.0  # a pong was received (its round trip is measured)
        assert conn.is_usable and conn.close_cause() == "still open"
