"""The shared RTP clock: every RtpSink on a loop paced by one timer; symmetric RTP sockets."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time

import numpy as np
import pytest

from sinks import RtpSink
from sinks.rtp_clock import RtpClock
from tests.rtp_receiver import UdpReceiver, unwrap_sequence
from tts_stream.audio import AudioFormat, Frame


def tone(seconds: float, rate: int = 8000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)


async def test_all_sinks_of_a_loop_share_one_clock_and_keep_their_grids() -> None:
    n, seconds = 20, 0.6
    async with UdpReceiver() as rx:
        sinks = [RtpSink("127.0.0.1", rx.port, ssrc=i + 1) for i in range(n)]
        for s in sinks:
            await s.open(AudioFormat(8000))
        clock = RtpClock.for_loop()
        assert all(s._clock is clock for s in sinks)
        before = clock.stats()

        async def call(sink: RtpSink, delay: float) -> None:
            await asyncio.sleep(delay)  # each call at its own phase
            await sink.write(Frame(tone(seconds)))
            await sink.drain()

        rng = random.Random(3)
        async with asyncio.timeout(20), asyncio.TaskGroup() as tg:
            for s in sinks:
                tg.create_task(call(s, rng.uniform(0, 0.02)))
        stats = clock.stats()
        for s in sinks:
            await s.aclose()
        rx.flush()
    per = round(seconds * 50)
    assert len(rx.packets) == n * per
    assert stats.streams == 0  # everything drained: nothing left scheduled
    # one wake-up serves every stream that is due: fewer wake-ups than packets
    assert stats.wakeups - before.wakeups < n * per
    for ssrc in range(1, n + 1):
        mine = [(a.at, a.packet) for a in rx.arrivals if a.packet and a.packet.ssrc == ssrc]
        seq = unwrap_sequence([p.sequence_number for _, p in mine])
        assert seq == list(range(seq[0], seq[0] + per))
        ts = [p.timestamp for _, p in mine]
        assert all((b - a) % 2**32 == 160 for a, b in zip(ts, ts[1:], strict=False))
        # absolute grid: packet k leaves at start + k * 20 ms (generous bound: loaded CI)
        span = mine[-1][0] - mine[0][0]
        assert (per - 1) * 0.02 - 0.3 < span < (per - 1) * 0.02 + 0.5


async def test_a_stalled_loop_reanchors_on_the_same_phase(caplog: pytest.LogCaptureFixture) -> None:
    async with UdpReceiver() as rx:
        sink = RtpSink("127.0.0.1", rx.port, prebuffer_ms=0)
        await sink.open(AudioFormat(8000))
        await sink.write(Frame(tone(1.0)))
        await rx.wait_for_count(3)
        with caplog.at_level(logging.WARNING, logger="sinks.rtp"):
            time.sleep(0.7)  # noqa: ASYNC251 - the stimulus: the loop is blocked for 700 ms
            await sink.drain()
        await sink.aclose()
        rx.flush()
    assert "re-anchoring" in caplog.text
    assert len(rx.packets) == 50  # nothing lost, nothing bursted out twice
    assert sink.stats().samples_played == 8000


class _Broken:
    """A paced stream whose callback fails: the clock must keep the others going."""

    def __init__(self) -> None:
        self.error: Exception | None = None

    def on_clock(self, now: float, horizon: float) -> float | None:
        raise RuntimeError("boom")

    def on_clock_error(self, exc: Exception) -> None:
        self.error = exc


async def test_one_failing_stream_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = _Broken()
    async with UdpReceiver() as rx:
        sink = RtpSink("127.0.0.1", rx.port)
        await sink.open(AudioFormat(8000))
        clock = RtpClock.for_loop()
        with caplog.at_level(logging.CRITICAL, logger="sinks.rtp_clock"):
            clock.schedule(broken, time.monotonic())
            await sink.write(Frame(tone(0.2)))
            await sink.drain()
        await sink.aclose()
        rx.flush()
    assert isinstance(broken.error, RuntimeError)
    assert len(rx.packets) == 10


async def test_local_addr_sends_from_the_advertised_port() -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    local = probe.getsockname()
    probe.close()  # a free port to bind to
    try:
        sink = RtpSink("127.0.0.1", rx.getsockname()[1], local_addr=local)
        await sink.open(AudioFormat(8000))
        assert sink.local_address == local
        await sink.write(Frame(tone(0.04)))
        await sink.drain()
        await sink.aclose()
        _, src = await asyncio.to_thread(rx.recvfrom, 2048)
        assert src == local  # symmetric RTP: packets leave from the port we advertise
    finally:
        rx.close()


async def test_shared_transport_is_used_and_left_open() -> None:
    loop = asyncio.get_running_loop()
    got: list[tuple[bytes, tuple[str, int]]] = []

    class Media(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            got.append((data, addr))

    transport, _ = await loop.create_datagram_endpoint(Media, local_addr=("127.0.0.1", 0))
    try:
        async with UdpReceiver() as rx:
            sink = RtpSink("127.0.0.1", rx.port, transport=transport)
            await sink.open(AudioFormat(8000))
            assert sink.local_address == transport.get_extra_info("sockname")
            await sink.write(Frame(tone(0.1)))
            await sink.drain()
            await sink.aclose()
            rx.flush()
            assert len(rx.packets) == 5
            assert not transport.is_closing()  # the caller's socket stays the caller's
    finally:
        transport.close()
    with pytest.raises(ValueError, match="transport="):
        RtpSink("127.0.0.1", 9, transport=transport, rtcp=True)


async def test_talk_spurts_start_on_the_clock_phase_grid() -> None:
    """New streams start on a multiple of the phase grid: a handful of wake-ups per packet
    time however many streams there are, each stream on its own absolute grid from there."""
    n = 12
    async with UdpReceiver() as rx:
        sinks = [RtpSink("127.0.0.1", rx.port, ssrc=i + 1, prebuffer_ms=0) for i in range(n)]
        for s in sinks:
            await s.open(AudioFormat(8000))
        clock = RtpClock.for_loop()
        grid = clock.phase_grid
        assert grid > 0
        rng = random.Random(5)
        starts = []
        for s in sinks:
            await asyncio.sleep(rng.uniform(0, 0.02))
            t = time.monotonic()
            await s.write(Frame(tone(0.2)))
            starts.append((t, s._spurt_due, time.monotonic()))
        for s in sinks:
            await s.drain()
            await s.aclose()
        rx.flush()
    assert len(rx.packets) == n * 10
    for t, due, after in starts:
        assert due >= t  # never earlier than asked
        assert due <= after + grid + 1e-6  # at most one grid step after the write returned
        assert abs(due / grid - round(due / grid)) < 1e-6  # on the grid
    assert clock.snap(10.0) == 10.0 and abs(clock.snap(10.0001) - (10.0 + grid)) < 1e-9
