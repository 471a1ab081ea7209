"""One pacing scheduler per event loop for every :class:`~sinks.RtpSink` on it.

Media servers keep hundreds of channels on their 20 ms grid by driving all of them from one
timer, not one timer (or task) per channel. :class:`RtpClock` is that timer for asyncio: a
timing wheel of 1 ms slots (a dict from slot number to the entries of the streams due in it,
each with its due time) and a single loop timer armed at the earliest due time. One wake-up
sends every packet due within :data:`EARLY` of now, for every stream, slot by slot (within a
slot in the order the streams were scheduled); each stream keeps its own phase and its
absolute ``start + n * ptime`` grid (the clock only asks a stream for its next due time, it
never adds sleeps). A stream is anything with the two methods of :class:`Paced`.

Why a wheel and not a heap of due times: scheduling is O(1) per packet (one list append and
two attribute writes on the stream's entry: no tuple per packet, no sift through hundreds of
entries, no lookup in a dict of all streams); a cancelled or replaced entry is marked dead
and skipped when its slot comes up (a slot is dropped once run, so nothing accumulates). The
slots are keyed by absolute slot number (``int(due / SLOT)``), so a due time any distance
ahead (a prebuffer wait, a long packet time) needs no overflow list; a small heap orders only
the slot numbers in use (about one per millisecond of the longest packet time, not one per
stream).

No task is involved: the clock is a chain of ``loop.call_at`` handles that exists only while
some stream is scheduled, so there is nothing to own or to cancel at shutdown beyond the
streams themselves (each cancels its own entry when it closes). Times are
``time.monotonic()`` seconds; the timer is armed at the due time itself on the loop's clock
(the same clock for asyncio and uvloop; uvloop's ``loop.time`` has millisecond resolution and
is cached per iteration, so it is not used to decide what is due, nor as "now" when arming).
Boundary: asyncio only; imports nothing from the engine.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
import weakref
from dataclasses import dataclass
from typing import Protocol

__all__ = ["EARLY", "PHASE_GRID", "SLOT", "ClockStats", "Paced", "RtpClock"]

log = logging.getLogger(__name__)

EARLY = 0.001
"""Seconds ahead of its due time a packet may leave when the clock is awake anyway: batches
wake-ups (at most one per millisecond) at the cost of sending up to this much early."""

SLOT = 0.001
"""Width of one slot of the timing wheel, in seconds (= :data:`EARLY`: a wake-up runs whole
slots, and of the slot its horizon falls in, the streams due by then)."""
_PER_SECOND = round(1 / SLOT)

PHASE_GRID = 0.005
"""Seconds between the phases a new talk spurt may start on (:meth:`RtpClock.snap`): with
20 ms packets every stream falls on one of 4 phases, so the clock wakes at most 4 times per
packet time however many streams there are (each wake-up costs ~35 µs outside the streams'
callbacks, and the callbacks of one wake-up run on warm code). A spurt starts at most this
much later than it could have (never earlier); it keeps its own ``start + n * ptime`` grid."""


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


class _Entry:
    """One stream's place on the wheel: the slot it is in (None once it is dead: cancelled,
    replaced or run for the last time) and its due time. A slot lists entries, not streams,
    so the tick checks and moves a stream through this small object alone."""

    __slots__ = ("due", "slot", "stream")

    def __init__(self, stream: Paced) -> None:
        self.stream = stream
        self.slot: int | None = None
        self.due = 0.0


class RtpClock:
    """The shared pacing timer of one event loop; get it with :meth:`for_loop`."""

    _clocks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RtpClock] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._slots: dict[int, list[_Entry]] = {}  # slot number -> entries (dead ones too)
        self._numbers: list[int] = []  # heap of the keys of _slots (each once)
        self._entry: dict[Paced, _Entry] = {}  # stream -> its live entry
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = 0.0
        self._wakeups = self._callbacks = self._late = 0
        self._max_late = 0.0
        # the loop's clock minus time.monotonic(): 0 for asyncio and uvloop (both read
        # CLOCK_MONOTONIC; uvloop's loop.time() is that in ms, cached per iteration). Arming
        # at loop.time() + (due - monotonic) instead would fire early by the cache's age,
        # i.e. by however long the current iteration has run (milliseconds on a busy loop).
        offset = loop.time() - time.monotonic()
        self._offset = 0.0 if abs(offset) < 0.05 else offset

    phase_grid = PHASE_GRID  # a class attribute: the benchmark varies it

    def snap(self, t: float) -> float:
        """The first phase at or after ``t`` (monotonic seconds) a talk spurt may start on:
        a multiple of :attr:`phase_grid` (0 disables snapping)."""
        grid = self.phase_grid
        if grid <= 0:
            return t
        return math.ceil(t / grid - 1e-9) * grid

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
        old = self._entry.get(stream)
        if old is not None:
            old.slot = None  # left in its slot, skipped when that comes up
        entry = self._entry[stream] = _Entry(stream)
        self._put(entry, due)
        if self._handle is None or due < self._armed_for:
            self._arm(due)

    def cancel(self, stream: Paced) -> None:
        """Forget ``stream``."""
        entry = self._entry.pop(stream, None)
        if entry is not None:
            entry.slot = None
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

    def _put(self, entry: _Entry, due: float) -> None:
        number = int(due * _PER_SECOND)
        slot = self._slots.get(number)
        if slot is None:
            self._slots[number] = slot = []
            heapq.heappush(self._numbers, number)
        slot.append(entry)
        entry.slot, entry.due = number, due

    def _arm(self, due: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_for = due
        self._handle = self._loop.call_at(due + self._offset, self._fire)

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
                later = [e for e in slot if e.slot == number and e.due > horizon]
                if later:
                    slots[number] = later
                    heapq.heappush(numbers, number)
                self._run(number, slot, now, horizon)  # skips those not due yet
                break  # new entries land in this slot or later, all beyond the horizon
            self._run(number, slot, now, horizon)
        self._rearm()

    def _rearm(self) -> None:
        """Arm the timer at the earliest live due time (dropping slots with none)."""
        slots, numbers = self._slots, self._numbers
        while numbers:
            number = numbers[0]
            dues = [e.due for e in slots[number] if e.slot == number]
            if dues:
                self._arm(min(dues))
                return
            del slots[heapq.heappop(numbers)]

    def _run(self, number: int, slot: list[_Entry], now: float, horizon: float) -> None:
        """Call the due streams of one slot; put each back at its next due time."""
        slots, calls = self._slots, 0
        floor = horizon + 1e-6
        for entry in slot:
            if entry.slot != number or entry.due > horizon:
                continue  # dead (cancelled, replaced), moved, or not due yet
            calls += 1
            stream = entry.stream
            try:
                nxt = stream.on_clock(now, horizon)
            except Exception as exc:  # one broken stream must not stop the others
                log.exception("RTP clock: stream %r failed", stream)
                self._drop(entry)
                stream.on_clock_error(exc)
                continue
            if nxt is None:
                self._drop(entry)
            elif entry.slot == number:  # still this entry (the callback did not reschedule)
                if nxt < floor:
                    nxt = floor
                # _put, inline: once per packet
                n = int(nxt * _PER_SECOND)
                later = slots.get(n)
                if later is None:
                    slots[n] = later = []
                    heapq.heappush(self._numbers, n)
                later.append(entry)
                entry.slot, entry.due = n, nxt
        self._callbacks += calls

    def _drop(self, entry: _Entry) -> None:
        if entry.slot is not None and self._entry.get(entry.stream) is entry:
            del self._entry[entry.stream]
        entry.slot = None
