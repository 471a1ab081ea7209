"""One pacing timer per event loop for every real-time session of the local server.

With ``pacing="realtime"`` each response sends delta *k* at ``t0 + audio_before_k / rate``.
Hundreds of sessions each sleeping with its own ``asyncio.sleep`` cost one loop timer per
delta (on uvloop a libuv timer handle created, armed, fired and closed per sleep) and, worse,
one sleep and wake-up of the whole process per due time. :class:`Pacer` keeps one heap of
``(due, future)`` entries and a single ``loop.call_at`` armed at the earliest; one wake-up
resumes every session due within :data:`EARLY` (10 ms), in due order, the way
``sinks/rtp_clock.py`` paces RTP (which keeps 1 ms: its packets are 20 ms apart). Each
session keeps its own absolute schedule: the pacer wakes it at the time it asked for (or up
to ``EARLY`` before), it never sums sleeps.

Times are ``time.monotonic()`` seconds (uvloop's ``loop.time`` has millisecond resolution);
they are converted to the loop's clock only to arm the timer. No task: the timer exists only
while some session waits. A waiter whose task is cancelled (the session closed, the response
was cancelled) has its future cancelled with it; its entry is dropped when it comes up (at
most one delta's time later) without waking anyone. Boundary: asyncio only; no protocol.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
import weakref
from dataclasses import dataclass

__all__ = ["EARLY", "Pacer", "PacerStats"]

EARLY = 0.010
"""Seconds ahead of its due time a session may be resumed when the timer is awake anyway.

Every wake-up of a sleeping process costs far more than the work it does (measured on the
2-vCPU VM of ``bench/``: ~45 µs of CPU per ``asyncio.sleep(0.001)`` round trip on uvloop,
against ~13 µs of Python per delta), so the pacer batches: at most about one wake-up per
10 ms, each sending every delta due within the next 10 ms. A delta then leaves up to 10 ms
(a tenth of a 100 ms delta) early, never late; a client only gets its buffer filled sooner.
In ``bench/server_pacing.py``'s in-process case (500 sessions, no sockets) 1 ms → 10 ms cut
the wake-ups from ~820 to ~95 per second and the CPU per delta from ~42-48 to ~31 µs."""


@dataclass(frozen=True)
class PacerStats:
    """Counters of one pacer (a snapshot)."""

    waiting: int  # sessions waiting right now
    wakeups: int  # timer callbacks
    resumed: int  # waiters resumed over all wake-ups


class Pacer:
    """The shared pacing timer of one event loop; get it with :meth:`for_loop`."""

    _pacers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Pacer] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = 0.0
        self._wakeups = self._resumed = 0

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop | None = None) -> Pacer:
        """The pacer of ``loop`` (the running loop by default), created on first use."""
        loop = loop or asyncio.get_running_loop()
        pacer = cls._pacers.get(loop)
        if pacer is None:
            pacer = cls._pacers[loop] = cls(loop)
        return pacer

    def wait(self, due: float) -> asyncio.Future[None] | None:
        """A future resolved at ``due`` (monotonic seconds) or up to :data:`EARLY` before;
        None when ``due`` is already that close (a session behind its schedule catches up
        at once, without a loop pass; the old per-session sleep did the same).

        The caller awaits the future (not a coroutine: one frame less per delta). If the
        caller is cancelled, so is the future; its entry is dropped when it comes up.
        """
        if due - time.monotonic() <= EARLY:
            return None
        fut: asyncio.Future[None] = self._loop.create_future()
        heapq.heappush(self._heap, (due, next(self._seq), fut))
        if self._handle is None or due < self._armed_for:
            self._arm(due)
        return fut

    async def sleep_until(self, due: float) -> None:
        """``await pacer.wait(due)`` for callers off the hot path."""
        fut = self.wait(due)
        if fut is not None:
            await fut

    def stats(self) -> PacerStats:
        return PacerStats(waiting=sum(not e[2].done() for e in self._heap),
                          wakeups=self._wakeups, resumed=self._resumed)  # fmt: skip

    # -- internals ---------------------------------------------------------------------------

    def _arm(self, due: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_for = due
        self._handle = self._loop.call_at(
            self._loop.time() + (due - time.monotonic()), self._fire
        )

    def _fire(self) -> None:
        self._handle = None
        self._wakeups += 1
        horizon = time.monotonic() + EARLY
        heap = self._heap
        while heap and heap[0][0] <= horizon:
            fut = heapq.heappop(heap)[2]
            if not fut.done():  # a cancelled waiter's entry just goes
                fut.set_result(None)
                self._resumed += 1
        while heap and heap[0][2].done():  # cancelled waiters at the top: no wake-up for them
            heapq.heappop(heap)
        if heap:
            self._arm(heap[0][0])
