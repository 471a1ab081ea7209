"""A bounded one-producer, one-consumer channel on plain asyncio futures.

It carries every audio delta from a connection's reader task to its consumer, so it is on
the hot path: anyio's memory object streams cost 10–14 % of the loop there (backend lookup
and a checkpoint per call; bench/README.md, hot spot F). The surface and the exceptions are
anyio's (``WouldBlock``, ``EndOfStream``, ``ClosedResourceError``, ``BrokenResourceError``)
so callers read the same either way. Not safe for several producers or consumers.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio

__all__ = ["Channel", "ChannelStats"]

T = TypeVar("T")


@dataclass(frozen=True)
class ChannelStats:
    current_buffer_used: int
    max_buffer_size: int


class Channel(Generic[T]):
    """``send`` awaits while ``size`` items are queued; ``receive`` awaits while none are."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self._items: collections.deque[T] = collections.deque()
        self._size = size
        self._getter: asyncio.Future[None] | None = None
        self._putter: asyncio.Future[None] | None = None
        self._send_closed = False
        self._recv_closed = False

    @staticmethod
    def _wake(fut: asyncio.Future[None] | None) -> None:
        if fut is not None and not fut.done():
            fut.set_result(None)

    def send_nowait(self, item: T) -> None:
        if self._send_closed:
            raise anyio.ClosedResourceError
        if self._recv_closed:
            raise anyio.BrokenResourceError
        if len(self._items) >= self._size:
            raise anyio.WouldBlock
        self._items.append(item)
        self._wake(self._getter)

    async def send(self, item: T) -> None:
        """Queue ``item``, awaiting room; no loop round-trip when there is room already."""
        while True:
            try:
                self.send_nowait(item)
                return
            except anyio.WouldBlock:
                self._putter = asyncio.get_running_loop().create_future()
                await self._putter

    def receive_nowait(self) -> T:
        if self._recv_closed:
            raise anyio.ClosedResourceError
        if self._items:
            item = self._items.popleft()
            self._wake(self._putter)
            return item
        if self._send_closed:
            raise anyio.EndOfStream
        raise anyio.WouldBlock

    async def receive(self) -> T:
        """The next item, awaiting one; ``EndOfStream`` once the sender closed and all is read."""
        while True:
            try:
                return self.receive_nowait()
            except anyio.WouldBlock:
                self._getter = asyncio.get_running_loop().create_future()
                await self._getter

    def __aiter__(self) -> Channel[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def statistics(self) -> ChannelStats:
        return ChannelStats(len(self._items), self._size)

    def close_send(self) -> None:
        """No more items: the receiver gets what is queued, then ``EndOfStream``."""
        self._send_closed = True
        self._wake(self._getter)

    def close(self) -> None:
        """The receiver is gone: queued items are dropped, a waiting sender is released."""
        self._recv_closed = True
        self._items.clear()
        self._wake(self._putter)
