"""One pacing scheduler per event loop for every :class:`~sinks.RtpSink` on it.

Media servers keep hundreds of channels on their 20 ms grid by driving all of them from one
timer, not one timer (or task) per channel. :class:`RtpClock` is that timer for asyncio: a
timing wheel of 1 ms slots (a dict from slot number to the streams due in it, with their due
times) and a single loop timer armed at the earliest due time. One wake-up sends every packet
due within :data:`EARLY` of now, for every stream, slot by slot (within a slot in the order the
streams were scheduled); each stream keeps its own phase and its absolute ``start + n * ptime``
grid (the clock only asks a stream for its next due time, it never adds sleeps). A stream is
anything with the two methods of :class:`Paced`.

Why a wheel and not a heap of due times: scheduling is O(1) per packet (one dict insertion, no
tuple per entry, no sift through hundreds of entries), and a cancelled stream is removed from
its slot at once (no stale entries to skip or compact). The slots are keyed by absolute slot
number (``int(due / SLOT)``), so a due time any distance ahead (a prebuffer wait, a long
packet time) needs no overflow list; a small heap orders only the slot numbers in use (about
one per millisecond of the longest packet time, not one per stream).

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
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Protocol

__all__ = ["EARLY", "SLOT", "ClockStats", "Paced", "RtpClock"]

log = logging.getLogger(__name__)

EARLY = 0.001
"""Seconds ahead of its due time a packet may leave when the clock is awake anyway: batches
wake-ups (at most one per millisecond) at the cost of sending up to this much early."""

SLOT = 0.001
"""Width of one slot of the timing wheel, in seconds (= :data:`EARLY`: a wake-up runs whole
slots, and of the slot its horizon falls in, the streams due by then)."""
_PER_SECOND = round(1 / SLOT)


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
        self._slots: dict[int, dict[Paced, float]] = {}  # slot number -> {stream: due}
        self._numbers: list[int] = []  # heap of the keys of _slots (each once)
        self._entry: dict[Paced, int] = {}  # stream -> the slot it is in
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
        self._remove(stream)
        self._add(stream, due)
        if self._handle is None or due < self._armed_for:
            self._arm(due)

    def cancel(self, stream: Paced) -> None:
        """Forget ``stream``."""
        self._remove(stream)
        if not self._entry and self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._slots.clear()
            self._numbers.clear()

    def stats(self) -> ClockStats:
        return ClockStats(
            streams=len(self._entry), wakeups=self._wakeups, callbacks=self._callbacks,
            late_wakeups=self._late, max_wakeup_lateness_ms=round(self._max_late * 1e3, 3),
        )

    # -- internals ---------------------------------------------------------------------------

    def _add(self, stream: Paced, due: float) -> None:
        number = int(due * _PER_SECOND)
        slot = self._slots.get(number)
        if slot is None:
            self._slots[number] = slot = {}
            heapq.heappush(self._numbers, number)
        slot[stream] = due
        self._entry[stream] = number

    def _remove(self, stream: Paced) -> None:
        number = self._entry.pop(stream, None)
        if number is not None:
            # an emptied slot is dropped when it comes up; a slot being run is out of _slots
            slot = self._slots.get(number)
            if slot is not None:
                slot.pop(stream, None)

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
        late = now - self._armed_for
        if late > 0.002:
            self._late += 1
        self._max_late = max(self._max_late, late)
        self._wakeups += 1
        last = int(horizon * _PER_SECOND)  # the slot the horizon falls in: due only in part
        slots, numbers = self._slots, self._numbers
        while numbers and numbers[0] <= last:
            number = heapq.heappop(numbers)
            slot = slots.pop(number)
            if number == last:
                later = {s: due for s, due in slot.items() if due > horizon}
                if later:
                    slots[number] = later
                    heapq.heappush(numbers, number)
                self._run(number, [s for s in slot if s not in later], now, horizon)
                break  # new entries land in this slot or later, all beyond the horizon
            self._run(number, list(slot), now, horizon)
        while numbers and not slots[numbers[0]]:
            del slots[heapq.heappop(numbers)]  # emptied by cancellations
        if numbers:
            self._arm(min(slots[numbers[0]].values()))

    def _run(self, number: int, streams: list[Paced], now: float, horizon: float) -> None:
        """Call the streams of one slot; put each back at its next due time."""
        entry, slots = self._entry, self._slots
        floor = horizon + 1e-6
        self._callbacks += len(streams)
        for stream in streams:
            if entry.get(stream) != number:
                continue  # cancelled or moved by an earlier callback of this wake-up
            del entry[stream]
            try:
                nxt = stream.on_clock(now, horizon)
            except Exception as exc:  # one broken stream must not stop the others
                log.exception("RTP clock: stream %r failed", stream)
                stream.on_clock_error(exc)
                continue
            if nxt is not None and stream not in entry:
                if nxt < floor:
                    nxt = floor
                # _add, inline: once per packet
                n = int(nxt * _PER_SECOND)
                slot = slots.get(n)
                if slot is None:
                    slots[n] = slot = {}
                    heapq.heappush(self._numbers, n)
                slot[stream] = nxt
                entry[stream] = n
