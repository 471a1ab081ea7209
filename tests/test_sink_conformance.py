"""The sink conformance suite (tests/sink_conformance.py) against WavSink, ArraySink, RtpSink
and a third-party-style sink with only the protocol's required members.

Each factory wires one sink to its real receiver: the WAV file read back with the stdlib
``wave`` module, the ArraySink's own iterator, a UDP socket on 127.0.0.1 for RTP. Adding a
sink is one more factory in FACTORIES (or a separate module reusing CHECKS, as the sound-card
suite does).
"""

from __future__ import annotations

import subprocess
import sys
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from sinks import ArraySink, RtpSink, WavSink
from tests.rtp_receiver import UdpReceiver, decode_payloads
from tests.sink_conformance import CHECKS, PlainSink, SinkFactory, SinkUnderTest, check_id
from tts_stream.audio import PCM16, AudioFormat, Sink


@asynccontextmanager
async def wav_case(tmp_path: Path) -> AsyncIterator[SinkUnderTest]:
    path = tmp_path / "conformance.wav"

    async def read_back() -> PCM16:
        with wave.open(str(path), "rb") as w:
            return np.frombuffer(w.readframes(w.getnframes()), "<i2")

    yield SinkUnderTest(WavSink(path), AudioFormat(24000), read_back, delivered_rate=24000)


@asynccontextmanager
async def array_case(tmp_path: Path) -> AsyncIterator[SinkUnderTest]:
    sink = ArraySink(max_blocks=32)

    async def consume() -> None:
        async for _ in sink:
            pass

    async def read_back() -> PCM16:
        return await sink.read_all(within=10)

    yield SinkUnderTest(
        sink, AudioFormat(24000), read_back, delivered_rate=24000, concurrent_read=True,
        consume=consume,
    )


@asynccontextmanager
async def plain_case(tmp_path: Path) -> AsyncIterator[SinkUnderTest]:
    """A sink with only the required members of the protocol (no BaseSink)."""
    sink = PlainSink(tmp_path / "plain.pcm")

    async def read_back() -> PCM16:
        return sink.read_back()

    yield SinkUnderTest(sink, AudioFormat(24000), read_back, delivered_rate=24000)


def rtp_case(codec: str, rate: int) -> SinkFactory:
    @asynccontextmanager
    async def case(tmp_path: Path) -> AsyncIterator[SinkUnderTest]:
        async with UdpReceiver() as rx:
            sink = RtpSink("127.0.0.1", rx.port, codec=codec)

            async def read_back() -> PCM16:
                rx.flush()
                return decode_payloads(rx.packets, codec)

            exact = codec == "l16"  # L16 at the stream rate: no resampling, no quantisation
            yield SinkUnderTest(
                sink, AudioFormat(rate), read_back, delivered_rate=rate if exact else 8000,
                exact=exact, realtime=True, slack=2 * 160,
            )

    case.__name__ = f"rtp_{codec}_{rate}"
    return case


FACTORIES: list[SinkFactory] = [
    wav_case,
    array_case,
    plain_case,
    rtp_case("l16", 8000),
    rtp_case("pcmu", 24000),
    rtp_case("pcma", 16000),
]


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__.removesuffix("_case"))
@pytest.mark.parametrize("check", CHECKS, ids=check_id)
async def test_conformance(
    check: Callable[[SinkFactory, Path], Awaitable[None]], factory: SinkFactory, tmp_path: Path
) -> None:
    await check(factory, tmp_path)


def test_package_exports_and_lazy_imports() -> None:
    """``import sinks`` needs no PortAudio: optional sinks load on first use of their name."""
    code = (
        "import sys, sinks\n"
        "lazy = {'sinks.soundcard', 'sinks.rtp', 'sounddevice', 'pyaudio'}\n"
        "assert not lazy & set(sys.modules), lazy & set(sys.modules)\n"
        "assert sinks.RtpSink.__module__ == 'sinks.rtp' and 'sinks.rtp' in sys.modules\n"
        "assert 'sinks.soundcard' not in sys.modules\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    import sinks

    assert sorted(sinks.__all__) == [
        "ArraySink", "BaseSink", "RtpSink", "SinkState", "SoundCardSink", "WavSink"
    ]
    for name in set(sinks.__all__) - {"SoundCardSink"}:  # that one is the sound-card suite's
        assert getattr(sinks, name).__name__ == name
    with pytest.raises(AttributeError):
        _ = sinks.NoSuchSink
    for sink in (WavSink("unused.wav"), ArraySink(), RtpSink("127.0.0.1", 9)):
        assert isinstance(sink, Sink)  # the runtime-checkable protocol (nothing opened)
