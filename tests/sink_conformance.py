"""The sink conformance suite: checks every Sink must pass, reusable by any sink's tests.

A sink joins the suite with one *factory*: an async context manager taking ``tmp_path`` and
yielding a :class:`SinkUnderTest` (the unopened sink, its format, and a way to read back what
it delivered to its real receiver). Each ``check_*`` coroutine takes ``(factory, tmp_path)``;
:data:`CHECKS` lists them all, so a test module runs the suite with::

    @pytest.mark.parametrize("check", CHECKS, ids=check_id)
    async def test_conformance(check, tmp_path):
        await check(my_factory, tmp_path)
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

from tts_stream.audio import PCM16, AudioFormat, Frame, Sink, SinkStats, nowait_writer
from tts_stream.errors import ClosedError, UsageError

__all__ = [
    "CHECKS",
    "PlainSink",
    "SinkFactory",
    "SinkUnderTest",
    "assert_stats_consistent",
    "check_close_twice_and_write_after_close",
    "check_id",
    "check_interrupt",
    "check_memory_bounded",
    "check_misuse_before_open",
    "check_roundtrip",
    "check_write_nowait",
    "frames_of",
    "make_signal",
]


@dataclass
class SinkUnderTest:
    """One sink wired to a real receiver.

    ``read_back()`` returns everything the receiver got, as int16 at ``delivered_rate``; it is
    called after ``aclose()``, or, if ``concurrent_read`` (a queue that needs a reader to make
    progress), started right after ``open()`` and awaited after ``aclose()``.
    ``exact``: the delivered audio equals what was written, sample for sample (possibly
    followed by fewer than ``slack`` zero samples of padding per talk spurt); otherwise only
    lengths (within ``slack`` per spurt, at the delivered rate) and levels are compared.
    ``realtime``: the sink plays at real-time pace, so checks keep the audio short.
    ``consume``: for ``concurrent_read`` sinks, a coroutine function that reads and discards
    until the sink is closed (used where keeping the audio would cost memory).
    """

    sink: Sink
    fmt: AudioFormat
    read_back: Callable[[], Coroutine[Any, Any, PCM16]]
    delivered_rate: int
    exact: bool = True
    realtime: bool = False
    slack: int = 0
    concurrent_read: bool = False
    consume: Callable[[], Coroutine[Any, Any, None]] | None = None


SinkFactory = Callable[[Path], AbstractAsyncContextManager[SinkUnderTest]]

TIMEOUT = 30.0  # generous bound on every check


class PlainSink:
    """A third-party-style sink: only the required members of the Sink protocol, no
    ``sinks.BaseSink``, none of the optional ones (``write_nowait``, ``is_open``/``format``,
    ``preferred_sample_rate``). It appends raw PCM16 to the file at ``path``
    (:meth:`read_back` reads it), and suspends once in every ``write``."""

    def __init__(self, path: Path, name: str = "plain") -> None:
        self.name, self.path = name, path
        self.opens = self.closes = 0
        self._state = "NEW"
        self._file: IO[bytes] | None = None
        self._first: float | None = None
        self._written = 0

    async def open(self, fmt: AudioFormat) -> None:
        if self._state != "NEW":
            raise UsageError(f"open() on sink {self.name!r} in state {self._state}")
        self._file = open(self.path, "wb")  # noqa: ASYNC230 - a page-cache write, as WavSink
        self._state = "OPEN"
        self.opens += 1

    async def write(self, frame: Frame) -> None:
        if self._state != "OPEN" or self._file is None:
            cls = ClosedError if self._state == "CLOSED" else UsageError
            raise cls(f"write() on sink {self.name!r} in state {self._state}")
        if len(frame):
            await asyncio.sleep(0)  # a sink whose write suspends
            self._file.write(frame.samples.astype("<i2").tobytes())
            self._written += len(frame)
            if self._first is None:
                self._first = time.monotonic()

    async def drain(self) -> None:
        if self._state == "OPEN" and self._file is not None:
            self._file.flush()

    async def interrupt(self) -> int:
        return self._written  # nothing queued: everything written has left

    async def aclose(self) -> None:
        if self._state == "CLOSED":
            return
        self._state = "CLOSED"
        self.closes += 1
        if self._file is not None:
            self._file.close()

    def stats(self) -> SinkStats:
        return SinkStats(self.name, self._written, self._written, 0, 0, self._first)

    def read_back(self) -> PCM16:
        if not self.path.exists():
            return np.zeros(0, np.int16)
        return np.frombuffer(self.path.read_bytes(), "<i2")


def make_signal(seconds: float, rate: int, *, seed: int = 1) -> PCM16:
    """A deterministic, speech-like test signal: a gliding tone plus noise, around -12 dBFS."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    freq = 300 + 200 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(freq) / rate
    noise = np.random.default_rng(seed).normal(0, 0.02, n)
    return np.clip((0.25 * np.sin(phase) + noise) * 32767, -32768, 32767).astype(np.int16)



def frames_of(
    samples: PCM16, sizes: tuple[int, ...] = (1, 0, 479, 2400, 4801, 960)
) -> AsyncIterator[Frame]:
    """Cut ``samples`` into frames of irregular sizes (cycling through ``sizes``)."""

    async def gen() -> AsyncIterator[Frame]:
        pos, i = 0, 0
        while pos < len(samples):
            n = sizes[i % len(sizes)]
            yield Frame(samples[pos : pos + n].copy(), offset=pos)
            pos += n
            i += 1

    return gen()


class Reader:
    """Reads back a sink's output, concurrently if the sink needs it (see SinkUnderTest)."""

    def __init__(self, sut: SinkUnderTest, tg: asyncio.TaskGroup) -> None:
        self.sut = sut
        self.task = tg.create_task(sut.read_back()) if sut.concurrent_read else None

    async def result(self) -> PCM16:
        if self.task is not None:
            return await self.task
        return await self.sut.read_back()


def assert_stats_consistent(sut: SinkUnderTest, *, written: int, settled: bool) -> SinkStats:
    """Counters are non-negative and add up; ``settled``: nothing is in flight any more."""
    st = sut.sink.stats()
    assert isinstance(st, SinkStats)
    assert st.name == sut.sink.name
    assert st.samples_written == written
    assert min(st.samples_played, st.dropped_samples, st.underruns) >= 0
    assert st.samples_played + st.dropped_samples <= written
    if settled:
        assert st.samples_played + st.dropped_samples == written, st
    return st


def _assert_delivered(sut: SinkUnderTest, delivered: PCM16, expected: PCM16, spurts: int) -> None:
    """Compare the read-back audio with what should have come out (see SinkUnderTest)."""
    if sut.exact:
        assert len(delivered) >= len(expected), (len(delivered), len(expected))
        np.testing.assert_array_equal(delivered[: len(expected)], expected)
        tail = delivered[len(expected) :]
        assert len(tail) <= sut.slack * spurts and not tail.any(), len(tail)
        return
    want = len(expected) * sut.delivered_rate / sut.fmt.sample_rate
    assert abs(len(delivered) - want) <= sut.slack * spurts + 1, (len(delivered), want)
    if len(expected) > sut.fmt.sample_rate // 10:
        rms_in = float(np.sqrt(np.mean(expected.astype(np.float64) ** 2)))
        rms_out = float(np.sqrt(np.mean(delivered.astype(np.float64) ** 2)))
        assert 0.7 * rms_in < rms_out < 1.3 * rms_in, (rms_in, rms_out)


async def check_roundtrip(factory: SinkFactory, tmp_path: Path) -> None:
    """open → write (irregular frames, incl. empty and 1-sample) → drain → aclose → read back."""
    async with asyncio.timeout(TIMEOUT), factory(tmp_path) as sut:
        seconds = 0.6 if sut.realtime else 3.0
        audio = make_signal(seconds, sut.fmt.sample_rate)
        t_open = time.monotonic()
        await sut.sink.open(sut.fmt)
        async with asyncio.TaskGroup() as tg:
            reader = Reader(sut, tg)
            async for frame in frames_of(audio):
                await sut.sink.write(frame)
            assert_stats_consistent(sut, written=len(audio), settled=False)
            await sut.sink.drain()
            await sut.sink.aclose()
            t_end = time.monotonic()
            delivered = await reader.result()
        _assert_delivered(sut, delivered, audio, spurts=1)
        st = assert_stats_consistent(sut, written=len(audio), settled=True)
        assert st.samples_played == len(audio) and st.dropped_samples == 0
        assert st.first_sample_at is not None and t_open <= st.first_sample_at <= t_end


async def check_close_twice_and_write_after_close(factory: SinkFactory, tmp_path: Path) -> None:
    """aclose is idempotent; write after close raises ClosedError naming the state."""
    async with asyncio.timeout(TIMEOUT), factory(tmp_path) as sut:
        audio = make_signal(0.1, sut.fmt.sample_rate)
        await sut.sink.open(sut.fmt)
        async with asyncio.TaskGroup() as tg:
            reader = Reader(sut, tg)
            await sut.sink.drain()  # nothing written: returns at once
            await sut.sink.write(Frame(audio))
            await sut.sink.aclose()
            await sut.sink.aclose()
            with pytest.raises(ClosedError, match="CLOSED"):
                await sut.sink.write(Frame(audio))
            await sut.sink.drain()  # no-op once closed
            played = await sut.sink.interrupt()
            await sut.sink.aclose()
            delivered = await reader.result()
        _assert_delivered(sut, delivered, audio, spurts=1)
        st = assert_stats_consistent(sut, written=len(audio), settled=True)
        assert played <= st.samples_played == len(audio)


async def check_misuse_before_open(factory: SinkFactory, tmp_path: Path) -> None:
    """write before open and open twice are usage errors; closing an unopened sink is fine."""
    async with asyncio.timeout(TIMEOUT), factory(tmp_path) as sut:
        with pytest.raises(UsageError, match="NEW"):
            await sut.sink.write(Frame(make_signal(0.01, sut.fmt.sample_rate)))
        assert sut.sink.stats().samples_written == 0
        await sut.sink.open(sut.fmt)
        async with asyncio.TaskGroup() as tg:
            reader = Reader(sut, tg)
            with pytest.raises(UsageError, match="OPEN"):
                await sut.sink.open(sut.fmt)
            await sut.sink.aclose()
            assert len(await reader.result()) == 0
        assert_stats_consistent(sut, written=0, settled=True)


async def check_interrupt(factory: SinkFactory, tmp_path: Path) -> None:
    """interrupt drops what is queued, reports what left; the sink keeps working afterwards."""
    async with asyncio.timeout(TIMEOUT), factory(tmp_path) as sut:
        rate = sut.fmt.sample_rate
        first = make_signal(0.8 if sut.realtime else 2.0, rate, seed=2)
        after = make_signal(0.3, rate, seed=3)
        await sut.sink.open(sut.fmt)
        async with asyncio.TaskGroup() as tg:
            reader = Reader(sut, tg)
            async for frame in frames_of(first):
                await sut.sink.write(frame)
            played = await sut.sink.interrupt()
            assert 0 <= played <= len(first)
            st = assert_stats_consistent(sut, written=len(first), settled=True)
            assert st.samples_played == played
            if sut.realtime:
                assert st.dropped_samples > 0  # 0.8 s cannot have been played already
            async for frame in frames_of(after):
                await sut.sink.write(frame)
            await sut.sink.aclose()
            delivered = await reader.result()
        _assert_delivered(sut, delivered, np.concatenate([first[:played], after]), spurts=2)
        st = assert_stats_consistent(sut, written=len(first) + len(after), settled=True)
        assert st.samples_played == played + len(after)


async def check_memory_bounded(factory: SinkFactory, tmp_path: Path) -> None:
    """60 s of audio through the sink does not grow memory beyond a bound (tracemalloc).

    Sinks that play in real time would need 60 s to play it, so for them the same 60 s go
    through the write path with an ``interrupt()`` every half second of audio: the queue,
    resampler and encoder see every sample, and nothing may accumulate.
    """
    async with asyncio.timeout(TIMEOUT * 2), factory(tmp_path) as sut:
        rate = sut.fmt.sample_rate
        chunk = make_signal(0.1, rate)  # 100 ms frames, as the service sends them
        n_frames = 600
        budget = 1_500_000  # bytes; keeping the 60 s would take 60 * 2 * rate (2.9 MB at 24k)
        await sut.sink.open(sut.fmt)

        async def produce() -> None:
            for i in range(n_frames):
                if i == 50:  # warm-up done (lazy imports, buffers, caches): take the baseline
                    tracemalloc.reset_peak()
                    base[0] = tracemalloc.get_traced_memory()[0]
                await sut.sink.write(Frame(chunk.copy()))
                if sut.realtime and i % 5 == 4:
                    await sut.sink.interrupt()
            await sut.sink.drain()
            peak[0] = tracemalloc.get_traced_memory()[1]
            await sut.sink.aclose()

        base, peak = [0], [0]
        tracemalloc.start()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(produce())
                if sut.consume is not None:
                    tg.create_task(sut.consume())
        finally:
            tracemalloc.stop()
        assert peak[0] - base[0] < budget, f"grew by {peak[0] - base[0]} bytes"
        assert_stats_consistent(sut, written=n_frames * len(chunk), settled=True)


async def check_write_nowait(factory: SinkFactory, tmp_path: Path) -> None:
    """The optional ``write_nowait`` (see the Sink protocol), when the sink has it.

    Frames given to ``write_nowait`` (True) come out exactly as through ``write``, in order
    with the awaited writes around them; a refusal (False) changes nothing (the counters show
    only what was taken). Decided: misuse is not a refusal, ``write_nowait`` raises like
    ``write`` (UsageError before open, ClosedError naming the state after close).
    """
    async with asyncio.timeout(TIMEOUT), factory(tmp_path) as sut:
        nowait = nowait_writer(sut.sink)
        if nowait is None:
            return  # optional (NonBlockingSink): nothing to check
        audio = make_signal(0.6 if sut.realtime else 2.0, sut.fmt.sample_rate, seed=4)
        with pytest.raises(UsageError, match="NEW"):
            nowait(Frame(audio[:10]))
        assert sut.sink.stats().samples_written == 0
        await sut.sink.open(sut.fmt)
        async with asyncio.TaskGroup() as tg:
            reader = Reader(sut, tg)
            written = 0
            i = 0
            async for frame in frames_of(audio):
                # alternate: odd frames awaited, even ones tried without waiting first
                taken = i % 2 == 0 and nowait(frame)
                assert taken in (True, False)
                if not taken:
                    assert sut.sink.stats().samples_written == written  # refusal: no trace
                    await sut.sink.write(frame)
                written += len(frame)
                assert_stats_consistent(sut, written=written, settled=False)
                i += 1
            await sut.sink.drain()
            await sut.sink.aclose()
            with pytest.raises(ClosedError, match="CLOSED"):
                nowait(Frame(audio[:10]))
            delivered = await reader.result()
        _assert_delivered(sut, delivered, audio, spurts=1)
        st = assert_stats_consistent(sut, written=len(audio), settled=True)
        assert st.samples_played == len(audio) and st.dropped_samples == 0
        assert st.first_sample_at is not None


CHECKS: list[Callable[[SinkFactory, Path], Awaitable[None]]] = [
    check_roundtrip,
    check_write_nowait,
    check_close_twice_and_write_after_close,
    check_misuse_before_open,
    check_interrupt,
    check_memory_bounded,
]


def check_id(check: object) -> str:
    """pytest id for a check: its name without the ``check_`` prefix."""
    return getattr(check, "__name__", str(check)).removeprefix("check_")
