"""The one bounded channel type: one producer, one consumer, plain asyncio futures.

It carries every hop of the audio data path that needs a queue: the connection's reader →
the speech's pump (every delta; bounded by a count of items), each fan-out lane (frames,
bounded by samples), :class:`sinks.ArraySink` (blocks, bounded by a count) and
:class:`sinks.RtpSink`'s packets (a count; the pacing clock receives, the writer waits
with :meth:`Channel.wait_room` and queues a frame's packets with
:meth:`Channel.send_all_nowait`). The bound is a *cost*: each item costs ``cost(item)``
(1 when no ``cost`` is given, so a count bound is the degenerate case), and ``send`` waits
while the queued cost plus the new item's would exceed ``capacity``. An item costlier than
the whole capacity is still taken into an empty channel (so a big delta never deadlocks the
stream); memory stays bounded by capacity plus one item (or one batch of
:meth:`Channel.send_all_nowait`).

Why not anyio's memory object streams, whose surface and exceptions these are
(``WouldBlock``, ``EndOfStream``, ``ClosedResourceError``, ``BrokenResourceError``,
``BusyResourceError``): on the delta hot path they cost 10–14 % of the loop (a backend
lookup and a checkpoint per call, an ``anyio.Event`` per blocking receive; bench/README.md,
hot spots B and F), and they count items, not samples. Not safe for several producers or
several consumers (a second waiter at the same end raises ``BusyResourceError``). The sound
card keeps its own lock-free ring: its consumer is an audio thread, not a task.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio

__all__ = ["Channel", "ChannelStats"]

T = TypeVar("T")


@dataclass(frozen=True)
class ChannelStats:
    """Queued cost and capacity (named after anyio's ``MemoryObjectStreamStatistics``)."""

    current_buffer_used: int
    max_buffer_size: int


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


class Channel(Generic[T]):
    """``send`` awaits while the item does not fit in ``capacity``; ``receive`` while empty.

    ``cost(item)`` must not change while the item is queued (it is asked again when the item
    leaves). ``low_water``: a sender blocked on a full channel is woken only once the queued
    cost is down to it (default: at every receive), so a producer of small items is not
    woken for each one.
    """

    def __init__(
        self, capacity: int, *, cost: Callable[[T], int] | None = None,
        low_water: int | None = None,
    ) -> None:  # fmt: skip
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._items: collections.deque[T] = collections.deque()
        self._capacity = capacity
        self._cost = cost
        self._low_water = capacity if low_water is None else max(0, min(low_water, capacity))
        self._used = 0
        #: Items queued. A plain attribute, so that hot paths (the fan-out's idle-lane test)
        #: read it without a call; read it, never assign it.
        self.queued = 0
        self._getter: asyncio.Future[None] | None = None
        self._putter: asyncio.Future[None] | None = None
        self._send_closed = False
        self._recv_closed = False

    # --- sending ------------------------------------------------------------------------------

    def send_nowait(self, item: T) -> None:
        """Queue ``item`` now or raise ``WouldBlock`` (full), ``ClosedResourceError`` (this end
        was closed) or ``BrokenResourceError`` (the receiver is gone)."""
        if self._send_closed:
            raise anyio.ClosedResourceError
        if self._recv_closed:
            raise anyio.BrokenResourceError
        cost_of = self._cost
        if cost_of is None:  # a count bound: the reader -> pump hop, once per delta
            if self.queued >= self._capacity:
                raise anyio.WouldBlock
        else:
            cost = cost_of(item)
            if self.queued and self._used + cost > self._capacity:
                raise anyio.WouldBlock
            self._used += cost
        self._items.append(item)
        self.queued += 1
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)

    def send_all_nowait(self, items: Sequence[T]) -> None:
        """Queue all of ``items`` now, or none and raise as :meth:`send_nowait` (``WouldBlock``
        unless they all fit; an empty cost-bounded channel takes them whatever they cost, a
        count-bounded one at most ``capacity`` items). One call per batch: the RTP sink
        queues a frame's packets with it."""
        self._check_sendable()
        cost_of = self._cost
        if cost_of is None:
            if self.queued + len(items) > self._capacity:
                raise anyio.WouldBlock
        else:
            cost = sum(map(cost_of, items))
            if self.queued and self._used + cost > self._capacity:
                raise anyio.WouldBlock
            self._used += cost
        self._items.extend(items)
        self.queued += len(items)
        _wake(self._getter)

    def on_room(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` (soon, from the loop) when a blocked sender would be woken: a
        receive brought the channel down to ``low_water``, or :meth:`clear`,
        :meth:`close_send` or :meth:`close`. For a producer that cannot wait (the
        connection's frame callback, which pauses reading the socket instead); it shares
        the sender's wake-up, so not together with a blocked :meth:`send`."""
        if self._putter is None or self._putter.done():
            self._putter = asyncio.get_running_loop().create_future()
        self._putter.add_done_callback(lambda _: callback())

    def _check_sendable(self) -> None:
        """Raise as :meth:`send_nowait` does for a closed channel (inline there: once per
        delta on the reader -> pump hop)."""
        if self._send_closed:
            raise anyio.ClosedResourceError
        if self._recv_closed:
            raise anyio.BrokenResourceError

    async def send(self, item: T) -> None:
        """Queue ``item``, awaiting room; no loop round-trip when there is room already."""
        while True:
            try:
                self.send_nowait(item)
                return
            except anyio.WouldBlock:
                await self._wait_putter()

    async def _wait_putter(self) -> None:
        if self._putter is not None and not self._putter.done():
            raise anyio.BusyResourceError("sending")
        self._putter = asyncio.get_running_loop().create_future()
        await self._putter

    async def wait_room(self) -> None:
        """Return once a sender would fit or be woken: at once while the queued cost is below
        the capacity or either end is closed, else when a receive brings the channel down to
        ``low_water``, or on :meth:`clear`, :meth:`close_send` or :meth:`close`.

        For a producer that must look at its own state before queueing (e.g. a barge-in
        that drops the rest of a frame), where :meth:`send` would queue the item as soon as
        it is woken. Several tasks may wait at once, and cancelling one waiter does not
        wake or cancel the others; do not mix it with a blocked :meth:`send` in another task.
        """
        if self.used < self._capacity or self._send_closed or self._recv_closed:
            return
        if self._putter is None or self._putter.done():
            self._putter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._putter)

    def send_evicting(self, item: T) -> list[T]:
        """Queue ``item`` now, dropping the oldest queued items until it fits (a lossy
        lane); returns the dropped items, oldest first. Raises as :meth:`send_nowait` for a
        closed channel."""
        self._check_sendable()
        items, cost_of, dropped = self._items, self._cost, []
        if cost_of is None:
            while len(items) >= self._capacity:
                dropped.append(items.popleft())
        else:
            cost, used = cost_of(item), self._used
            while items and used + cost > self._capacity:
                old = items.popleft()
                used -= cost_of(old)
                dropped.append(old)
            self._used = used + cost
        items.append(item)
        self.queued = len(items)
        _wake(self._getter)
        return dropped

    def close_send(self) -> None:
        """No more items: the receiver gets what is queued, then ``EndOfStream``."""
        self._send_closed = True
        _wake(self._getter)
        _wake(self._putter)

    # --- receiving ----------------------------------------------------------------------------

    def receive_nowait(self) -> T:
        """The next item, or ``WouldBlock`` (empty), ``EndOfStream`` (empty and the sender
        closed), ``ClosedResourceError`` (this end was closed)."""
        if self._recv_closed:
            raise anyio.ClosedResourceError
        if self.queued:  # inline, no helper call: once per delta on the reader -> pump hop
            item = self._items.popleft()
            self.queued -= 1
            cost_of = self._cost
            if cost_of is not None:
                self._used -= cost_of(item)
                if self._used > self._low_water:
                    return item
            elif self.queued > self._low_water:
                return item
            putter = self._putter
            if putter is not None and not putter.done():
                putter.set_result(None)
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
                if self._getter is not None and not self._getter.done():
                    raise anyio.BusyResourceError("receiving") from None
                self._getter = asyncio.get_running_loop().create_future()
                await self._getter

    def __aiter__(self) -> Channel[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def clear(self) -> list[T]:
        """Drop everything queued (barge-in) and return it; a waiting sender gets room."""
        items = list(self._items)
        self._items.clear()
        self._used = self.queued = 0
        _wake(self._putter)
        return items

    def close(self) -> None:
        """The receiver is gone: queued items are dropped, a waiting sender gets
        ``BrokenResourceError``, a waiting receiver ``ClosedResourceError``."""
        self._recv_closed = True
        self.clear()
        _wake(self._getter)

    # --- observation --------------------------------------------------------------------------

    def __len__(self) -> int:
        """Items queued."""
        return self.queued

    @property
    def used(self) -> int:
        """Cost queued (items for a channel without ``cost``)."""
        return self.queued if self._cost is None else self._used

    @property
    def capacity(self) -> int:
        return self._capacity

    def statistics(self) -> ChannelStats:
        return ChannelStats(self.used, self._capacity)
