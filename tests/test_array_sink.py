"""ArraySink: bounded, lossless, back-pressured; iteration ends at close."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from sinks import ArraySink
from tts_stream.audio import AudioFormat, Frame
from tts_stream.errors import ClosedError, Timeout

FMT = AudioFormat(24000)


def block(n: int, value: int) -> np.ndarray:
    return np.full(n, value, np.int16)


async def test_iterate_until_closed() -> None:
    sink = ArraySink()
    await sink.open(FMT)
    for i in range(5):
        await sink.write(Frame(block(100 + i, i)))
    await sink.drain()
    await sink.aclose()
    got = [b async for b in sink]
    assert [len(b) for b in got] == [100, 101, 102, 103, 104]
    assert [int(b[0]) for b in got] == [0, 1, 2, 3, 4]
    st = sink.stats()
    assert st.samples_written == st.samples_played == 510
    assert st.first_sample_at is not None


async def test_concurrent_consumer_and_read_all() -> None:
    sink = ArraySink(max_blocks=2)
    await sink.open(FMT)
    sent = [np.arange(i, i + 50, dtype=np.int16) for i in range(40)]

    async def produce() -> None:
        for s in sent:
            await sink.write(Frame(s))
        await sink.aclose()

    async with asyncio.timeout(10), asyncio.TaskGroup() as tg:
        tg.create_task(produce())
        result = await sink.read_all(within=10)
    np.testing.assert_array_equal(result, np.concatenate(sent))


async def test_back_pressure_and_close_wakes_writer() -> None:
    sink = ArraySink(max_blocks=2)
    await sink.open(FMT)
    await sink.write(Frame(block(10, 1)))
    await sink.write(Frame(block(10, 2)))
    async with asyncio.timeout(10), asyncio.TaskGroup() as tg:
        third = tg.create_task(sink.write(Frame(block(10, 3))))
        done, _ = await asyncio.wait({third}, timeout=0.05)
        assert not done, "write must wait while max_blocks are queued"
        assert (await asyncio.wait_for(sink.get(), 1)) is not None
        await asyncio.wait_for(third, timeout=5)  # room again: the write completes

        async def blocked_write() -> None:
            with pytest.raises(ClosedError, match="CLOSED"):
                await sink.write(Frame(block(10, 4)))

        fourth = tg.create_task(blocked_write())
        done, _ = await asyncio.wait({fourth}, timeout=0.05)
        assert not done
        await sink.aclose()
        await asyncio.wait_for(fourth, timeout=5)
    # what was queued before close is still delivered, in order
    assert [int(b[0]) async for b in sink] == [2, 3]
    st = sink.stats()  # the refused 4th frame counts as written and dropped
    assert (st.samples_written, st.samples_played, st.dropped_samples) == (40, 30, 10)


async def test_interrupt_drops_queued() -> None:
    sink = ArraySink()
    await sink.open(FMT)
    await sink.write(Frame(block(100, 1)))
    assert (await asyncio.wait_for(sink.get(), 1)) is not None
    await sink.write(Frame(block(200, 2)))
    await sink.write(Frame(block(300, 3)))
    assert await sink.interrupt() == 100
    await sink.write(Frame(block(50, 4)))
    await sink.aclose()
    rest = await sink.read_all(within=1)
    assert rest.tolist() == [4] * 50
    st = sink.stats()
    assert (st.samples_written, st.samples_played, st.dropped_samples) == (650, 150, 500)


async def test_timeouts() -> None:
    sink = ArraySink(max_blocks=1, write_timeout=0.05)
    await sink.open(FMT)
    await sink.write(Frame(block(1, 1)))
    with pytest.raises(Timeout):
        await sink.write(Frame(block(1, 2)))
    with pytest.raises(Timeout):
        await sink.read_all(within=0.05)  # not closed: read_all cannot finish
    await sink.aclose()


async def test_blocks_do_not_alias_writable_buffers() -> None:
    sink = ArraySink()
    await sink.open(FMT)
    buf = block(4, 7)
    await sink.write(Frame(buf))
    buf[:] = 0  # the producer reuses its buffer
    ro = np.frombuffer(b"\x01\x00\x02\x00", "<i2")
    await sink.write(Frame(ro))
    await sink.aclose()
    assert (await sink.read_all(within=1)).tolist() == [7, 7, 7, 7, 1, 2]
