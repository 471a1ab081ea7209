"""One pacing scheduler per event loop for every :class:`~sinks.RtpSink` on it.

Media servers keep hundreds of channels on their 20 ms grid by driving all of them from one
timer, not one timer (or task) per channel. :class:`RtpClock` is that timer for asyncio: a heap
of ``(due, stream)`` entries and a single loop timer armed at the earliest due time. One
wake-up sends every packet due within :data:`EARLY` of now, for every stream, in due order;
each stream keeps its own phase and its absolute ``start + n * ptime`` grid (the clock only
asks a stream for its next due time, it never adds sleeps). A stream is anything with the two
methods of :class:`Paced`.

No task is involved: the clock is a chain of ``loop.call_at`` handles that exists only while
some stream is scheduled, so there is nothing to own or to cancel at shutdown beyond the
streams themselves (each cancels its own entry when it closes). Times are
``time.monotonic()`` seconds, converted to the loop's clock when arming (uvloop's ``loop.time``
has millisecond resolution and is cached per iteration, so it is not used to decide what is
due). Boundary: asyncio only; imports nothing from the engine.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Protocol

__all__ = ["EARLY", "ClockStats", "Paced", "RtpClock"]

log = logging.getLogger(__name__)

EARLY = 0.001
"""Seconds ahead of its due time a packet may leave when the clock is awake anyway: batches
wake-ups (at most one per millisecond) at the cost of sending up to this much early."""


class Paced(Protocol):
    """What the clock drives."""

    def on_clock(self, now: float, horizon: float) -> float | None:
        """Send what is due up to ``horizon``; return the next due time, or None to stop."""

    def on_clock_error(self, exc: Exception) -> None:
        """``on_clock`` raised: the stream is unscheduled; it should fail its writers."""


@dataclass(frozen=True)
class ClockStats:
    """Counters of one clock (a snapshot)."""

    streams: int  # scheduled right now
    wakeups: int
    callbacks: int  # stream calls over all wake-ups
    late_wakeups: int  # wake-ups more than 2 ms after the earliest due time
    max_wakeup_lateness_ms: float


class RtpClock:
    """The shared pacing timer of one event loop; get it with :meth:`for_loop`."""

    _clocks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RtpClock] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, Paced]] = []
        self._entry: dict[Paced, int] = {}  # stream -> its live entry's sequence number
        self._seq = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = 0.0
        self._wakeups = self._callbacks = self._late = 0
        self._max_late = 0.0

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop | None = None) -> RtpClock:
        """The clock of ``loop`` (the running loop by default), created on first use."""
        loop = loop or asyncio.get_running_loop()
        clock = cls._clocks.get(loop)
        if clock is None:
            clock = cls._clocks[loop] = cls(loop)
        return clock

    def schedule(self, stream: Paced, due: float) -> None:
        """Call ``stream.on_clock`` at ``due`` (monotonic seconds); replaces an earlier entry."""
        seq = next(self._seq)
        self._entry[stream] = seq
        heapq.heappush(self._heap, (due, seq, stream))
        if len(self._heap) > 4 * len(self._entry) + 64:
            self._compact()
        if self._handle is None or due < self._armed_for:
            self._arm(due)

    def cancel(self, stream: Paced) -> None:
        """Forget ``stream`` (its heap entry is skipped when it comes up)."""
        self._entry.pop(stream, None)
        if not self._entry and self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._heap.clear()

    def stats(self) -> ClockStats:
        return ClockStats(
            streams=len(self._entry), wakeups=self._wakeups, callbacks=self._callbacks,
            late_wakeups=self._late, max_wakeup_lateness_ms=round(self._max_late * 1e3, 3),
        )

    # -- internals ---------------------------------------------------------------------------

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if self._entry.get(e[2]) == e[1]]
        heapq.heapify(self._heap)

    def _arm(self, due: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_for = due
        self._handle = self._loop.call_at(
            self._loop.time() + (due - time.monotonic()), self._fire
        )

    def _fire(self) -> None:
        self._handle = None
        now = time.monotonic()
        horizon = now + EARLY
        heap, entry = self._heap, self._entry
        late = now - self._armed_for
        if late > 0.002:
            self._late += 1
        self._max_late = max(self._max_late, late)
        self._wakeups += 1
        while heap and heap[0][0] <= horizon:
            _due, seq, stream = heapq.heappop(heap)
            if entry.get(stream) != seq:
                continue  # replaced or cancelled
            del entry[stream]
            self._callbacks += 1
            try:
                nxt = stream.on_clock(now, horizon)
            except Exception as exc:  # one broken stream must not stop the others
                log.exception("RTP clock: stream %r failed", stream)
                stream.on_clock_error(exc)
                continue
            if nxt is not None and stream not in entry:
                seq = next(self._seq)
                entry[stream] = seq
                heapq.heappush(heap, (max(nxt, horizon + 1e-6), seq, stream))
        while heap and entry.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)  # drop stale entries at the top before arming
        if heap:
            self._arm(heap[0][0])
