"""The one-producer, one-consumer channel of the delta hot path."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from tts_stream.channel import Channel, ChannelStats


async def test_items_arrive_in_order_and_end_after_close_send() -> None:
    ch = Channel[int](4)
    for i in range(3):
        ch.send_nowait(i)
    ch.close_send()
    assert [i async for i in ch] == [0, 1, 2]
    with pytest.raises(anyio.EndOfStream):
        ch.receive_nowait()


async def test_send_waits_for_room() -> None:
    ch = Channel[int](2)
    ch.send_nowait(1)
    ch.send_nowait(2)
    with pytest.raises(anyio.WouldBlock):
        ch.send_nowait(3)
    assert ch.statistics() == ChannelStats(current_buffer_used=2, max_buffer_size=2)
    sender = asyncio.create_task(ch.send(3))
    await asyncio.sleep(0)
    assert not sender.done()  # blocked: the channel is full
    assert await ch.receive() == 1
    await asyncio.wait_for(sender, 5)
    assert [ch.receive_nowait(), ch.receive_nowait()] == [2, 3]


async def test_receive_waits_for_an_item() -> None:
    ch = Channel[str](1)
    receiver = asyncio.create_task(ch.receive())
    await asyncio.sleep(0)
    assert not receiver.done()
    await ch.send("x")
    assert await asyncio.wait_for(receiver, 5) == "x"


async def test_closing_the_receiver_releases_a_blocked_sender() -> None:
    ch = Channel[int](1)
    ch.send_nowait(1)
    sender = asyncio.create_task(ch.send(2))
    await asyncio.sleep(0)
    ch.close()
    with pytest.raises(anyio.BrokenResourceError):
        await asyncio.wait_for(sender, 5)
    with pytest.raises(anyio.ClosedResourceError):
        ch.receive_nowait()


async def test_send_after_close_send_is_refused() -> None:
    ch = Channel[int](1)
    ch.close_send()
    with pytest.raises(anyio.ClosedResourceError):
        await ch.send(1)
    with pytest.raises(ValueError):
        Channel[int](0)


# --- the cost bound (fan-out lanes: samples; ArraySink and the reader -> pump hop: a count) ---


async def test_a_cost_bound_counts_cost_not_items() -> None:
    ch = Channel[bytes](10, cost=len)
    ch.send_nowait(b"abcd")
    ch.send_nowait(b"efgh")
    assert (len(ch), ch.used, ch.capacity) == (2, 8, 10)
    with pytest.raises(anyio.WouldBlock):
        ch.send_nowait(b"ijk")  # 8 + 3 > 10
    ch.send_nowait(b"ij")  # 8 + 2 fits exactly
    assert ch.statistics() == ChannelStats(current_buffer_used=10, max_buffer_size=10)
    sender = asyncio.create_task(ch.send(b"klm"))
    await asyncio.sleep(0)
    assert not sender.done()
    assert ch.receive_nowait() == b"abcd"  # 6 + 3 fits now
    await asyncio.wait_for(sender, 5)
    assert [ch.receive_nowait() for _ in range(3)] == [b"efgh", b"ij", b"klm"]
    assert ch.used == 0 and not ch


async def test_an_item_costlier_than_the_capacity_passes_alone() -> None:
    ch = Channel[bytes](4, cost=len)
    ch.send_nowait(b"123456")  # an empty channel takes it: a big delta never deadlocks
    assert ch.used == 6
    with pytest.raises(anyio.WouldBlock):
        ch.send_nowait(b"1")  # nothing more until it left
    assert ch.receive_nowait() == b"123456"
    ch.send_nowait(b"1")


async def test_send_evicting_drops_the_oldest_until_the_item_fits() -> None:
    ch = Channel[bytes](6, cost=len)
    assert ch.send_evicting(b"aa") == []
    assert ch.send_evicting(b"bb") == []
    assert ch.send_evicting(b"ccc") == [b"aa"]  # 4 + 3 > 6: the oldest goes
    assert ch.send_evicting(b"dddddd") == [b"bb", b"ccc"]
    assert (len(ch), ch.used) == (1, 6)
    receiver = asyncio.create_task(ch.receive())
    assert await asyncio.wait_for(receiver, 5) == b"dddddd"
    counted = Channel[int](2)
    counted.send_evicting(1)
    counted.send_evicting(2)
    assert counted.send_evicting(3) == [1] and [counted.receive_nowait() for _ in "ab"] == [2, 3]


async def test_clear_returns_what_was_queued_and_releases_the_sender() -> None:
    ch = Channel[bytes](4, cost=len)
    ch.send_nowait(b"1234")
    sender = asyncio.create_task(ch.send(b"56"))
    await asyncio.sleep(0)
    assert ch.clear() == [b"1234"]  # barge-in
    await asyncio.wait_for(sender, 5)
    assert ch.receive_nowait() == b"56" and ch.used == 0


async def test_low_water_wakes_a_blocked_sender_only_when_the_queue_is_down_to_it() -> None:
    ch = Channel[int](4, low_water=1)
    for i in range(4):
        ch.send_nowait(i)
    sender = asyncio.create_task(ch.send(4))
    await asyncio.sleep(0)
    ch.receive_nowait()  # 3 queued: room, but above the low-water mark
    for _ in range(3):
        await asyncio.sleep(0)
    assert not sender.done()
    ch.receive_nowait()
    ch.receive_nowait()  # 1 queued: woken
    await asyncio.wait_for(sender, 5)
    assert [ch.receive_nowait(), ch.receive_nowait()] == [3, 4]


async def test_one_receiver_and_one_sender_at_a_time() -> None:
    ch = Channel[int](1)
    first = asyncio.create_task(ch.receive())
    await asyncio.sleep(0)
    with pytest.raises(anyio.BusyResourceError):
        await ch.receive()
    ch.send_nowait(1)
    assert await asyncio.wait_for(first, 5) == 1
    ch.send_nowait(2)
    blocked = asyncio.create_task(ch.send(3))
    await asyncio.sleep(0)
    with pytest.raises(anyio.BusyResourceError):
        await ch.send(4)
    assert ch.receive_nowait() == 2
    await asyncio.wait_for(blocked, 5)


async def test_closing_either_end_releases_the_other_ends_waiter() -> None:
    ch = Channel[int](1)
    receiver = asyncio.create_task(ch.receive())
    await asyncio.sleep(0)
    ch.close()  # the receiving end itself is closed: its waiter is told so
    with pytest.raises(anyio.ClosedResourceError):
        await asyncio.wait_for(receiver, 5)
    ch2 = Channel[int](1)
    ch2.send_nowait(1)
    sender = asyncio.create_task(ch2.send(2))
    await asyncio.sleep(0)
    ch2.close_send()  # the fan-out shutting down while its writer waits on a full lane
    with pytest.raises(anyio.ClosedResourceError):
        await asyncio.wait_for(sender, 5)
    assert [i async for i in ch2] == [1]


async def test_wait_room_wakes_at_low_water_on_clear_and_on_close_without_queueing() -> None:
    ch = Channel[int](4, low_water=1)
    await asyncio.wait_for(ch.wait_room(), 5)  # room: returns at once
    for i in range(4):
        ch.send_nowait(i)
    first, second = (asyncio.create_task(ch.wait_room()) for _ in "ab")
    await asyncio.sleep(0)
    ch.receive_nowait()  # 3 queued: above the low-water mark
    for _ in range(3):
        await asyncio.sleep(0)
    assert not first.done() and not second.done()
    second.cancel()  # one waiter giving up does not wake the other
    await asyncio.sleep(0)
    assert not first.done()
    ch.receive_nowait()
    ch.receive_nowait()  # 1 queued: woken, and nothing was queued for it
    await asyncio.wait_for(first, 5)
    assert ch.queued == 1
    for i in range(3):
        ch.send_nowait(i)
    cleared = asyncio.create_task(ch.wait_room())
    await asyncio.sleep(0)
    assert not cleared.done()
    ch.clear()  # barge-in
    await asyncio.wait_for(cleared, 5)
    for i in range(4):
        ch.send_nowait(i)
    closed = asyncio.create_task(ch.wait_room())
    await asyncio.sleep(0)
    ch.close()
    await asyncio.wait_for(closed, 5)
    await asyncio.wait_for(ch.wait_room(), 5)  # closed: at once, the next send raises
    with pytest.raises(anyio.BrokenResourceError):
        ch.send_nowait(9)


async def test_send_all_nowait_queues_all_or_nothing() -> None:
    ch = Channel[int](3)
    received = asyncio.create_task(ch.receive())
    await asyncio.sleep(0)
    ch.send_all_nowait([1, 2, 3])  # wakes the waiting receiver
    assert await asyncio.wait_for(received, 5) == 1
    with pytest.raises(anyio.WouldBlock):
        ch.send_all_nowait([4, 5])  # only one fits: nothing is queued
    assert ch.queued == 2
    ch.send_all_nowait([4])
    assert [ch.receive_nowait() for _ in range(3)] == [2, 3, 4]
    by_size = Channel[bytes](4, cost=len)
    by_size.send_all_nowait([b"123456"])  # an empty channel takes a batch whatever it costs
    with pytest.raises(anyio.WouldBlock):
        by_size.send_all_nowait([b"7"])
    assert by_size.used == 6
    by_size.close()
    with pytest.raises(anyio.BrokenResourceError):
        by_size.send_all_nowait([b"8"])
