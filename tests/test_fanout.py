"""Fan-out with real sinks (ArraySink, WavSink): ordering, bounded queues, per-sink policy,
interrupt, and who opens/closes the sinks."""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import numpy as np
import pytest

from sinks import ArraySink, RtpSink, SinkState, WavSink
from tests.sink_conformance import PlainSink
from tts_stream.audio import (
    AudioFormat,
    Frame,
    is_open,
    nowait_writer,
    open_format,
    preferred_sample_rate,
)
from tts_stream.errors import ClosedError, UsageError
from tts_stream.fanout import Fanout, Policy

TIMEOUT = 10.0
FMT = AudioFormat(24000)


def frames(n: int, size: int = 2400) -> list[Frame]:
    return [
        Frame(np.full(size, i, dtype=np.int16), offset=i * size, response_id="r") for i in range(n)
    ]


async def test_every_sink_gets_every_frame_in_order(tmp_path: Path) -> None:
    arr = ArraySink(max_blocks=1000)
    wav = WavSink(tmp_path / "x.wav")
    fs = frames(10)
    async with asyncio.timeout(TIMEOUT):
        async with Fanout([arr, wav], FMT) as fan:
            assert fan.names == ("array", f"wav:{tmp_path / 'x.wav'}")
            for f in fs:
                await fan.write(f)
            await fan.drain()
        got = await arr.read_all(within=TIMEOUT)
    expected = np.concatenate([f.samples for f in fs])
    assert np.array_equal(got, expected)
    with wave.open(str(tmp_path / "x.wav"), "rb") as w:
        assert np.array_equal(np.frombuffer(w.readframes(w.getnframes()), "<i2"), expected)
    assert arr.state is SinkState.CLOSED and wav.state is SinkState.CLOSED  # opened here


async def test_lossless_queue_is_bounded_and_loses_nothing() -> None:
    arr = ArraySink(max_blocks=1)
    fs = frames(30)
    async with asyncio.timeout(TIMEOUT):
        async with Fanout([arr], FMT, max_buffered_ms=300) as fan:
            async with asyncio.TaskGroup() as tg:

                async def writer() -> None:
                    for f in fs:
                        await fan.write(f)

                w = tg.create_task(writer())
                got = [await arr.get() for _ in fs]
                await w
            (lane,) = fan.stats()
    assert lane.capacity_samples == FMT.samples(300)
    assert 0 < lane.peak_queued_samples <= lane.capacity_samples
    assert lane.dropped_frames == 0 and lane.samples_out == 30 * 2400
    assert [int(b[0]) for b in got if b is not None] == list(range(30))


async def test_slow_lossy_sink_never_stalls_the_others() -> None:
    main = ArraySink(max_blocks=1000, name="main")
    monitor = ArraySink(max_blocks=1, name="monitor")  # nobody ever reads it
    async with asyncio.timeout(TIMEOUT):
        async with Fanout(
            [main, monitor], FMT, policies={"monitor": Policy.DROP_OLDEST},
            max_buffered_ms=200, lossy_buffered_ms=200,
        ) as fan:  # fmt: skip
            for f in frames(50):
                await fan.write(f)  # never blocks on the monitor
            stats = {s.name: s for s in fan.stats()}
            got = [await main.get() for _ in range(50)]
    assert [int(b[0]) for b in got if b is not None] == list(range(50))
    mon = stats["monitor"]
    assert mon.policy is Policy.DROP_OLDEST and mon.dropped_frames > 0
    assert mon.peak_queued_samples <= mon.capacity_samples
    assert stats["main"].dropped_frames == 0


async def test_interrupt_clears_queues_and_reports_played() -> None:
    arr = ArraySink(max_blocks=2)
    async with asyncio.timeout(TIMEOUT), Fanout([arr], FMT) as fan:
        for f in frames(5):
            await fan.write(f)
        first = await arr.get()
        assert first is not None
        played = await fan.interrupt()
        assert played == {"array": 2400}
        assert fan.stats()[0].queued_samples == 0 and arr.queued_blocks == 0
        await fan.write(frames(1)[0])  # still usable after a barge-in
        assert (await arr.get()) is not None


async def test_caller_opened_sinks_stay_open(tmp_path: Path) -> None:
    arr = ArraySink(max_blocks=10)
    await arr.open(FMT)
    async with asyncio.timeout(TIMEOUT):
        async with Fanout([arr], FMT) as fan:
            await fan.write(frames(1)[0])
            await fan.drain()
        assert arr.state is SinkState.OPEN
        await arr.aclose()
    with pytest.raises(ClosedError):
        await fan.write(frames(1)[0])


async def test_caller_opened_sink_must_match_the_format() -> None:
    arr = ArraySink()
    await arr.open(AudioFormat(8000))
    with pytest.raises(UsageError, match="8000"):
        async with Fanout([arr], FMT):
            pass
    assert arr.state is SinkState.OPEN  # not ours to close
    await arr.aclose()


async def test_names_and_policies_are_validated() -> None:
    with pytest.raises(UsageError):
        Fanout([], FMT)
    with pytest.raises(UsageError, match="nope"):
        Fanout([ArraySink()], FMT, policies={"nope": Policy.DROP_OLDEST})
    fan = Fanout([ArraySink(), ArraySink()], FMT)
    assert fan.names == ("array", "array#2")


# --- semantics a "write from the caller when the lane is idle" shortcut must keep ----------------
# A sink's write may suspend (back-pressure). While its lane's queue has room, that must hold
# neither the writer nor the other sinks: the frame waits in the queue, not in the caller.


async def test_blocked_lossless_sink_does_not_hold_the_writer_while_its_queue_has_room() -> None:
    arr = ArraySink(max_blocks=1)  # full after one block; nobody reads until all writes returned
    fs = frames(7)
    async with asyncio.timeout(TIMEOUT):
        async with Fanout([arr], FMT, max_buffered_ms=500) as fan:  # 5 frames of 2400
            # frame 0 in the sink, frame 1 in the lane task's blocked write, 2..6 queued
            for f in fs:
                await fan.write(f)
            (lane,) = fan.stats()
            assert lane.queued_samples == 5 * 2400 == lane.capacity_samples
            got = [await arr.get() for _ in fs]
            await fan.drain()
            (lane,) = fan.stats()
    assert [int(b[0]) for b in got if b is not None] == list(range(7))
    assert lane.samples_out == 7 * 2400 and lane.dropped_frames == 0 and lane.failed is None


async def test_blocked_lossless_sink_does_not_stall_the_other_sinks() -> None:
    fast = ArraySink(max_blocks=1000, name="fast")
    slow = ArraySink(max_blocks=1, name="slow")  # blocks from its second frame on
    fs = frames(7)
    async with asyncio.timeout(TIMEOUT):
        async with Fanout([slow, fast], FMT, max_buffered_ms=500) as fan:
            for f in fs:
                await fan.write(f)
            # the fast sink gets everything while the slow one is still stuck at frame 1
            got_fast = [await fast.get() for _ in fs]
            assert slow.stats().samples_written == 2 * 2400
            got_slow = [await slow.get() for _ in fs]
            await fan.drain()
    assert [int(b[0]) for b in got_fast if b is not None] == list(range(7))
    assert [int(b[0]) for b in got_slow if b is not None] == list(range(7))


async def test_a_failing_sink_is_isolated_and_the_writer_never_sees_its_error() -> None:
    main = ArraySink(max_blocks=1000, name="main")
    broken = ArraySink(max_blocks=1000, name="broken")
    await broken.open(FMT)  # caller-opened, so we can break it under the fan-out
    fs = frames(5)
    async with asyncio.timeout(TIMEOUT):
        async with Fanout([broken, main], FMT) as fan:
            await fan.write(fs[0])
            await fan.drain()
            await broken.aclose()  # its next write raises ClosedError
            for f in fs[1:]:
                await fan.write(f)  # never raises
            await fan.drain()  # nor does draining
            stats = {s.name: s for s in fan.stats()}
            got = [await main.get() for _ in fs]
    assert [int(b[0]) for b in got if b is not None] == list(range(5))
    assert stats["broken"].failed is not None and "ClosedError" in stats["broken"].failed
    assert stats["broken"].samples_out == 2400
    assert stats["main"].failed is None and stats["main"].samples_out == 5 * 2400


# --- the optional Sink.write_nowait: idle lossless lanes skip their queue ----------------------


async def test_idle_lane_delivers_through_write_nowait_at_once(tmp_path: Path) -> None:
    wav = WavSink(tmp_path / "d.wav")  # write_nowait always takes the frame
    fs = frames(4)
    async with asyncio.timeout(TIMEOUT), Fanout([wav], FMT) as fan:
        for i, f in enumerate(fs, 1):
            fan.progress.clear()
            await fan.write(f)
            # delivered inside write(): no queue, no lane task involved
            assert fan.progress.is_set()
            (lane,) = fan.stats()
            assert (lane.frames_in, lane.samples_in, lane.samples_out) == (i, i * 2400, i * 2400)
            assert lane.queued_samples == 0 and lane.peak_queued_samples == 0
            assert wav.stats().samples_played == i * 2400
        await fan.drain()
    with wave.open(str(tmp_path / "d.wav"), "rb") as w:
        got = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    assert np.array_equal(got, np.concatenate([f.samples for f in fs]))


async def test_write_nowait_never_bypasses_a_queued_frame() -> None:
    arr = ArraySink(max_blocks=1)
    fs = frames(3)
    async with asyncio.timeout(TIMEOUT), Fanout([arr], FMT) as fan:
        await fan.write(fs[0])  # taken by write_nowait: the sink is now full
        await fan.write(fs[1])  # refused (full): queued in the lane
        assert fan.stats()[0].queued_samples == 2400
        first = await arr.get()  # room in the sink again, but frame 1 still waits in the lane
        await fan.write(fs[2])  # so frame 2 must queue behind it
        (lane,) = fan.stats()
        assert lane.queued_samples == 2 * 2400 and lane.samples_out == 2400
        rest = [await arr.get() for _ in fs[1:]]
        await fan.drain()
        (lane,) = fan.stats()
    assert [int(b[0]) for b in [first, *rest] if b is not None] == [0, 1, 2]
    assert lane.samples_in == lane.samples_out == 3 * 2400 and lane.dropped_frames == 0


async def test_drop_oldest_lanes_keep_their_queue() -> None:
    mon = ArraySink(max_blocks=1000, name="monitor")
    async with asyncio.timeout(TIMEOUT):
        async with Fanout([mon], FMT, policies={"monitor": Policy.DROP_OLDEST}) as fan:
            await fan.write(frames(1)[0])
            assert fan.stats()[0].queued_samples == 2400  # not written from the caller
            await fan.drain()
            assert fan.stats()[0].samples_out == 2400


async def test_a_sink_failing_in_write_nowait_is_isolated(tmp_path: Path) -> None:
    main = ArraySink(max_blocks=1000, name="main")
    broken = WavSink(tmp_path / "b.wav", name="broken")
    await broken.open(FMT)
    fs = frames(3)
    async with asyncio.timeout(TIMEOUT):
        async with Fanout([broken, main], FMT) as fan:
            await fan.write(fs[0])
            await broken.aclose()  # write_nowait now raises ClosedError
            for f in fs[1:]:
                await fan.write(f)  # never raises
            await fan.drain()
            stats = {s.name: s for s in fan.stats()}
            got = [await main.get() for _ in fs]
    assert [int(b[0]) for b in got if b is not None] == [0, 1, 2]
    b = stats["broken"]
    assert b.failed is not None and "ClosedError" in b.failed
    # as the lane task counts it: the failing frame went in, the one after it was dropped
    assert (b.frames_in, b.samples_out, b.dropped_frames) == (2, 2400, 1)
    assert stats["main"].failed is None and stats["main"].samples_out == 3 * 2400


class _CountingArraySink(ArraySink):
    """Overrides write(): the inherited write_nowait must not bypass the override."""

    def __init__(self) -> None:
        super().__init__(max_blocks=1000, name="counting")
        self.writes = 0

    async def write(self, frame: Frame) -> None:
        self.writes += 1
        await super().write(frame)


async def test_an_overridden_write_is_never_bypassed() -> None:
    sink = _CountingArraySink()
    async with asyncio.timeout(TIMEOUT), Fanout([sink], FMT) as fan:
        assert sink.write_nowait(frames(1)[0]) is False  # refused: nothing happened
        assert sink.stats().samples_written == 0
        for f in frames(3):
            await fan.write(f)
        await fan.drain()
        assert sink.writes == 3 and fan.stats()[0].samples_out == 3 * 2400


class _SlowWavSink(WavSink):
    """Overrides _write() only: WavSink's _try_write no longer matches it."""

    async def _write(self, samples: np.ndarray) -> None:
        await asyncio.sleep(0)
        await super()._write(samples)


async def test_an_overridden_write_hook_is_never_bypassed(tmp_path: Path) -> None:
    sink = _SlowWavSink(tmp_path / "s.wav")
    async with asyncio.timeout(TIMEOUT), Fanout([sink], FMT) as fan:
        assert sink.write_nowait(frames(1)[0]) is False
        await fan.write(frames(1)[0])
        assert fan.stats()[0].queued_samples == 2400  # went through the lane's task
        await fan.drain()
        assert sink.stats().samples_played == 2400


# --- the Sink protocol's optional members: plain objects need none of them --------------------


async def test_a_sink_with_only_the_required_members_goes_through_its_lane(
    tmp_path: Path,
) -> None:
    plain = PlainSink(tmp_path / "p.pcm")
    assert nowait_writer(plain) is None and not is_open(plain)
    assert open_format(plain) is None and preferred_sample_rate(plain) is None
    fs = frames(6)
    async with asyncio.timeout(TIMEOUT):
        async with Fanout([plain], FMT) as fan:
            for f in fs:
                await fan.write(f)
            await fan.drain()
            (lane,) = fan.stats()
        assert (plain.opens, plain.closes) == (1, 1)  # not open: the fan-out opened and closed it
    assert lane.samples_out == 6 * 2400 and lane.failed is None
    assert np.array_equal(plain.read_back(), np.concatenate([f.samples for f in fs]))


class _OwnedPlainSink(PlainSink):
    """A plain sink that says it is open (``is_open``) but has no ``format``."""

    @property
    def is_open(self) -> bool:
        return self.opens > self.closes


async def test_a_plain_sink_its_owner_opened_stays_open(tmp_path: Path) -> None:
    sink = _OwnedPlainSink(tmp_path / "o.pcm")
    await sink.open(FMT)
    assert is_open(sink) and open_format(sink) is None  # no format: nothing to compare
    async with asyncio.timeout(TIMEOUT):
        async with Fanout([sink], FMT) as fan:
            await fan.write(frames(1)[0])
            await fan.drain()
        assert (sink.opens, sink.closes) == (1, 0)
        await sink.aclose()


async def test_base_sinks_state_every_optional_member(tmp_path: Path) -> None:
    wav = WavSink(tmp_path / "m.wav")
    assert nowait_writer(wav) is not None and preferred_sample_rate(wav) is None
    assert not is_open(wav) and open_format(wav) is None
    await wav.open(FMT)
    assert is_open(wav) and open_format(wav) == FMT
    await wav.aclose()
    assert not is_open(wav)
    assert preferred_sample_rate(RtpSink("127.0.0.1", 9)) == 8000  # the telephony rate


async def test_a_writer_waiting_on_a_failed_sinks_full_lane_is_released() -> None:
    broken = ArraySink(max_blocks=1, name="broken")
    await broken.open(FMT)  # caller-opened, so we can break it under the fan-out
    f0, f1, f2, f3 = frames(4)
    async with asyncio.timeout(TIMEOUT):
        async with Fanout([broken], FMT, max_buffered_ms=100) as fan:  # one frame per lane
            await fan.write(f0)  # straight into the sink (write_nowait): it is full now
            await fan.write(f1)  # queued; the lane's task takes it and blocks in the sink
            for _ in range(5):
                await asyncio.sleep(0)  # loop passes, no time: the lane's task runs
            assert fan.stats()[0].queued_samples == 0 and broken.queued_blocks == 1
            await fan.write(f2)  # queued: the lane is full
            writer = asyncio.create_task(fan.write(f3))
            for _ in range(5):
                await asyncio.sleep(0)
            assert not writer.done()  # back-pressure
            await broken.aclose()  # the blocked sink.write raises ClosedError
            await writer  # released, never raises
            (lane,) = fan.stats()
    assert lane.failed is not None and "ClosedError" in lane.failed
    assert (lane.frames_in, lane.samples_out) == (3, 2400)
    # f2 was dropped from the queue, f3 never got in: nothing disappears uncounted
    assert (lane.dropped_frames, lane.dropped_samples) == (1, 2 * 2400)
