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
