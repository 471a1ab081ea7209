"""Fan-out: one stream of frames to many sinks, each behind its own bounded queue.

Role: the speech writes each decoded :class:`~tts_stream.audio.Frame` once; every sink gets it
through its own queue, drained by its own task (all tasks in a TaskGroup owned by
:class:`Fanout`'s async context manager). Per sink a :class:`Policy`:

* ``LOSSLESS`` (default): when the queue is full, :meth:`Fanout.write` waits. That wait is
  the back-pressure that travels up to the WebSocket reader and, through TCP, to the server.
* ``DROP_OLDEST``: when the queue is full the oldest queued frame is dropped and counted; for
  monitoring sinks that must never stall the others.

A frame for an idle lossless lane (nothing queued, no write in progress) whose sink has the
optional non-blocking ``write_nowait`` goes straight into the sink from :meth:`Fanout.write`:
no queue, no wake-up of the lane's task. ``write_nowait`` either delivers exactly as ``write``
would or does nothing and returns False, so this never waits in the caller and never
reorders; when it refuses, the frame takes the queue as usual.

Each queue is a :class:`~tts_stream.channel.Channel` of frames bounded in *samples*
(milliseconds of audio), so memory is bounded by configuration, never by the length of an
utterance. Boundary: knows the :class:`~tts_stream.audio.Sink` protocol only (its optional
members through :mod:`tts_stream.audio`'s accessors); never imports ``sinks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import anyio

from ._resource import StackResource
from .audio import AudioFormat, Frame, Sink, SinkStats, is_open, nowait_writer, open_format
from .channel import Channel
from .errors import ClosedError, Timeout, UsageError

__all__ = ["Fanout", "LaneStats", "Policy"]

log = logging.getLogger(__name__)


class Policy(enum.Enum):
    """What a sink's queue does when it is full."""

    LOSSLESS = "lossless"  # the writer waits (back-pressure)
    DROP_OLDEST = "drop_oldest"  # the oldest queued frame is dropped and counted


@dataclass(frozen=True)
class LaneStats:
    """A snapshot of one sink's queue."""

    name: str
    policy: Policy
    capacity_samples: int
    queued_samples: int
    peak_queued_samples: int
    frames_in: int
    samples_in: int
    samples_out: int
    dropped_frames: int
    dropped_samples: int
    failed: str | None


class _Lane:
    """One sink's bounded queue (a :class:`~tts_stream.channel.Channel` of frames costing
    their samples) plus its counters; the fan-out writes, the lane's task reads."""

    def __init__(self, sink: Sink, name: str, policy: Policy, capacity: int) -> None:
        self.sink, self.name, self.policy = sink, name, policy
        self.queue: Channel[Frame] = Channel(capacity, cost=len)
        self.peak = 0
        self.frames_in = self.samples_in = self.samples_out = 0
        self.dropped_frames = self.dropped_samples = 0
        self.ended = False
        self.failed: str | None = None
        self.busy = False  # a write into the sink is in progress
        # The sink's optional non-blocking write (NonBlockingSink), lossless lanes only.
        self.write_nowait = nowait_writer(sink) if policy is Policy.LOSSLESS else None
        self._idle = asyncio.Event()
        self._idle.set()

    def _drop(self, frame: Frame) -> None:
        self.dropped_frames += 1
        self.dropped_samples += len(frame)

    def idle(self) -> bool:
        """Nothing queued and no write in progress: a frame may go to the sink directly."""
        return not self.queue.queued and not self.busy and self.failed is None and not self.ended

    async def put(self, frame: Frame) -> None:
        if self.policy is not Policy.LOSSLESS or self.failed is not None or self.ended:
            self.put_nowait(frame)  # dropped or evicting: never waits
            return
        try:
            await self.queue.send(frame)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._drop(frame)  # the sink failed, or the fan-out closed, meanwhile
            return
        self._taken(frame)

    def fits(self, n: int) -> bool:
        """A frame of ``n`` samples would be taken without waiting (lossless lanes: room in
        the queue; a failed or ended lane drops it, a drop-oldest lane evicts)."""
        if self.policy is not Policy.LOSSLESS or self.failed is not None or self.ended:
            return True
        queue = self.queue
        return not queue.queued or queue.used + n <= queue.capacity

    def put_nowait(self, frame: Frame) -> None:
        """:meth:`put` for a frame that :meth:`fits` (checked by the caller): never waits."""
        if self.failed is not None or self.ended:
            self._drop(frame)
            return
        if self.policy is Policy.DROP_OLDEST:
            for old in self.queue.send_evicting(frame):
                self._drop(old)
        else:
            self.queue.send_nowait(frame)
        self._taken(frame)

    def _taken(self, frame: Frame) -> None:
        self.frames_in += 1
        self.samples_in += len(frame)
        self.peak = max(self.peak, self.queue.used)
        self._idle.clear()

    async def get(self) -> Frame | None:
        """Next frame, or ``None`` once the lane ended (or failed) and is empty."""
        queue = self.queue
        try:
            if queue.queued:
                return queue.receive_nowait()
            self._idle.set()
            return await queue.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return None

    def clear(self) -> int:
        """Drop everything queued (barge-in); returns the samples dropped."""
        return sum(len(f) for f in self.queue.clear())

    def fail(self, exc: Exception) -> None:
        """The sink raised: it gets nothing more; what was queued for it is dropped."""
        self.failed = repr(exc)
        self.write_nowait = None  # a failed or ended lane never writes directly
        self.dropped_samples += self.clear()
        self.queue.close()  # the lane's task ends, a waiting writer is let go

    def end(self) -> None:
        self.ended = True
        self.write_nowait = None
        self.queue.close_send()

    async def wait_idle(self) -> None:
        while self.queue.queued or self.busy:
            self._idle.clear()
            await self._idle.wait()

    def mark_idle(self) -> None:
        if not self.queue.queued:
            self._idle.set()

    def stats(self) -> LaneStats:
        return LaneStats(
            name=self.name,
            policy=self.policy,
            capacity_samples=self.queue.capacity,
            queued_samples=self.queue.used,
            peak_queued_samples=self.peak,
            frames_in=self.frames_in,
            samples_in=self.samples_in,
            samples_out=self.samples_out,
            dropped_frames=self.dropped_frames,
            dropped_samples=self.dropped_samples,
            failed=self.failed,
        )


class Fanout(StackResource):
    """Frames to sinks: ``async with Fanout(sinks, fmt) as fan: await fan.write(frame)``.

    On enter, sinks that are not open yet are opened with ``fmt`` (and closed again on exit);
    sinks the caller opened stay open. ``policies`` maps a sink *name* to a :class:`Policy`;
    ``max_buffered_ms`` bounds each lossless queue, ``lossy_buffered_ms`` each drop-oldest
    queue. Leaving the block without :meth:`drain` drops what is still queued.
    """

    def __init__(
        self,
        sinks: Sequence[Sink],
        fmt: AudioFormat,
        *,
        policies: Mapping[str, Policy] | None = None,
        max_buffered_ms: float = 2000.0,
        lossy_buffered_ms: float = 1000.0,
        timeout: float = 10.0,
        progress: asyncio.Event | None = None,
    ) -> None:
        if not sinks:
            raise UsageError("at least one sink is required")
        self.fmt = fmt
        self._timeout = timeout
        # Set after every frame a sink took: the speech's back-pressure waits on it.
        self.progress = progress if progress is not None else asyncio.Event()
        policies = dict(policies or {})
        self._lanes: list[_Lane] = []
        seen: dict[str, int] = {}
        for sink in sinks:
            base = str(getattr(sink, "name", type(sink).__name__))
            seen[base] = seen.get(base, 0) + 1
            name = base if seen[base] == 1 else f"{base}#{seen[base]}"
            policy = policies.pop(name, Policy.LOSSLESS)
            ms = max_buffered_ms if policy is Policy.LOSSLESS else lossy_buffered_ms
            self._lanes.append(_Lane(sink, name, policy, max(1, fmt.samples(ms))))
        if policies:
            raise UsageError(f"policies name unknown sinks: {', '.join(sorted(policies))}")
        self._opened: list[Sink] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._writing = False  # a write() is suspended: write_nowait must not overtake it

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(lane.name for lane in self._lanes)

    @property
    def sinks(self) -> tuple[Sink, ...]:
        return tuple(lane.sink for lane in self._lanes)

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Fanout:
        if self._stack is not None:
            raise ClosedError("a Fanout is single-use")
        stack = self._stack = contextlib.AsyncExitStack()
        try:
            stack.push_async_callback(self._close_opened)
            for lane in self._lanes:
                if not is_open(lane.sink):
                    await self._bounded(lane.sink.open(self.fmt), f"{lane.name}.open()")
                    self._opened.append(lane.sink)
                elif (fmt := open_format(lane.sink) or self.fmt) != self.fmt:
                    raise UsageError(
                        f"sink {lane.name!r} was opened for {fmt}, the speech is {self.fmt}"
                    )
            stack.callback(self._forget_tasks)  # runs after the task group has ended
            tg = await stack.enter_async_context(asyncio.TaskGroup())
            stack.push_async_callback(self._stop_workers)
            self._tasks = [
                tg.create_task(self._worker(lane), name=f"tts-stream-sink-{lane.name}")
                for lane in self._lanes
            ]
        except BaseException:
            await stack.aclose()
            raise
        return self

    async def _stop_workers(self) -> None:
        for lane in self._lanes:
            lane.clear()
            lane.end()
        for task in self._tasks:
            if not task.done():
                task.cancel()

    def _forget_tasks(self) -> None:
        """Drop the ended lane tasks: a cancelled one's traceback holds its frame, which holds
        this fan-out, a cycle only a full collection would free (issue 11, the collector)."""
        self._tasks = []

    async def _close_opened(self) -> None:
        for sink in self._opened:
            try:
                await self._bounded(sink.aclose(), f"{sink.name}.aclose()")
            except Exception:
                log.exception("closing sink %s failed", getattr(sink, "name", sink))

    async def _bounded(self, aw: Awaitable[object], what: str) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await aw
        except TimeoutError as exc:
            raise Timeout(what, self._timeout) from exc

    # --- data path ----------------------------------------------------------------------------

    async def _worker(self, lane: _Lane) -> None:
        while True:
            frame = await lane.get()
            if frame is None:
                lane.mark_idle()
                return
            lane.busy = True
            try:
                await lane.sink.write(frame)
                lane.samples_out += len(frame)
            except Exception as exc:  # one broken sink never takes the others down
                self._fail(lane, exc)
            finally:
                lane.busy = False
                lane.mark_idle()
                self.progress.set()

    def _fail(self, lane: _Lane, exc: Exception) -> None:
        lane.fail(exc)
        log.warning("sink %s failed, it gets no more audio: %r", lane.name, exc)

    def _write_direct(
        self, lane: _Lane, nowait: Callable[[Frame], bool], frame: Frame, n: int
    ) -> bool:
        """Hand ``frame`` to an idle lane's sink without waiting; False: queue it instead.

        The counters end up exactly as after ``put`` + the worker's write (the frame never
        sat in the queue, so ``queued``/``peak`` are untouched); a failure is isolated as in
        the worker.
        """
        try:
            if not nowait(frame):
                return False
        except Exception as exc:  # as in _worker: recorded, never raised to the writer
            lane.frames_in += 1
            lane.samples_in += n
            self._fail(lane, exc)
            self.progress.set()
            return True
        lane.frames_in += 1
        lane.samples_in += n
        lane.samples_out += n
        self.progress.set()
        return True

    async def write(self, frame: Frame) -> None:
        """Queue ``frame`` for every sink; waits while a lossless queue is full."""
        if self._closed or self._stack is None:
            raise ClosedError("fan-out is closed")
        # Never an awaited sink.write from here: a sink's write may suspend, and must then
        # hold neither this writer (its queue still has room) nor the other sinks; a write
        # started here cannot be handed over to the lane's task either (asyncio.timeout & co.
        # bind the task that entered them). Only the optional write_nowait, which never
        # waits, and only on an idle lane, so the sink still sees the frames in order.
        self._writing = True
        n = len(frame.samples)
        try:
            for lane in self._lanes:
                nowait = lane.write_nowait
                if (
                    nowait is not None
                    and lane.idle()
                    and self._write_direct(lane, nowait, frame, n)
                ):
                    continue
                await lane.put(frame)
        finally:
            self._writing = False

    def write_nowait(self, frame: Frame) -> bool:
        """Queue ``frame`` for every sink without waiting, or do nothing and return False.

        All or nothing: it goes ahead only when every lane takes the frame at once (an idle
        lane's ``write_nowait``, room in a lossless queue, a drop-oldest queue) and no
        :meth:`write` is suspended (the frame would overtake its predecessor); otherwise the
        caller falls back to ``await write(frame)``. The connection's frame callback
        delivers through it, with no task in between (speech.py).
        """
        if self._writing or self._closed or self._stack is None:
            return False
        n = len(frame.samples)
        lanes = self._lanes
        for lane in lanes:
            if lane.queue.queued and not lane.fits(n):  # an empty queue has room
                return False
        for lane in lanes:
            # lane.idle() inlined (the hot path): a failed or ended lane has no write_nowait
            nowait = lane.write_nowait
            if (
                nowait is not None
                and not lane.queue.queued
                and not lane.busy
                and self._write_direct(lane, nowait, frame, n)
            ):
                continue
            lane.put_nowait(frame)
        return True

    def backlog_samples(self) -> int:
        """Samples queued for the slowest lossless sink (what back-pressure acts upon)."""
        lossless = [lane.queue.used for lane in self._lanes if lane.policy is Policy.LOSSLESS]
        return max(lossless, default=0)

    async def drain(self) -> None:
        """Wait until every sink has every queued frame and has drained it (bounded)."""
        if self._stack is None or self._closed:
            return
        try:
            async with asyncio.timeout(self._timeout):
                for lane in self._lanes:
                    await lane.wait_idle()
                async with asyncio.TaskGroup() as tg:
                    for lane in self._lanes:
                        if lane.failed is None:
                            tg.create_task(lane.sink.drain())
        except TimeoutError as exc:
            raise Timeout("sinks to drain", self._timeout) from exc

    async def interrupt(self) -> dict[str, int]:
        """Barge-in: drop every queue and interrupt every sink at once.

        Returns, per sink name, the samples that actually left the sink (``Sink.interrupt``).
        """
        for lane in self._lanes:
            lane.clear()
        results: dict[str, int] = {}

        async def one(lane: _Lane) -> None:
            try:
                results[lane.name] = int(await lane.sink.interrupt())
            except Exception as exc:
                log.warning("interrupting sink %s failed: %r", lane.name, exc)
                results[lane.name] = lane.sink.stats().samples_played

        try:
            async with asyncio.timeout(self._timeout), asyncio.TaskGroup() as tg:
                for lane in self._lanes:
                    tg.create_task(one(lane))
        except TimeoutError as exc:
            raise Timeout("sinks to interrupt", self._timeout) from exc
        return {lane.name: results.get(lane.name, 0) for lane in self._lanes}

    # --- observation --------------------------------------------------------------------------

    def stats(self) -> tuple[LaneStats, ...]:
        """One :class:`LaneStats` per sink (queue sizes, peaks, drops)."""
        return tuple(lane.stats() for lane in self._lanes)

    def sink_stats(self) -> dict[str, SinkStats]:
        """The sinks' own counters, keyed by lane name."""
        return {lane.name: lane.sink.stats() for lane in self._lanes}
