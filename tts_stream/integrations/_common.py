"""What both framework adapters share: the hand-off sink, the owned engine, speak options.

* :class:`HandoffSink` is the sink whose output is the framework's own queue (Pipecat's audio
  context, LiveKit's audio emitter). ``write`` hands each frame over and then waits while
  more than ``max_outstanding_ms`` of audio handed over has not been *taken* by the
  framework (the adapter calls :meth:`HandoffSink.taken` when the framework moves a frame
  on). The framework's queues are unbounded, so this bound is what keeps the speech's
  back-pressure intact inside a framework: a paused pipeline stops the fan-out, the fan-out
  stops reading the socket, ``speech.push`` waits. Where the framework never pushes back
  (Pipecat's downstream queues do not: a paused transport just queues), ``max_lead_ms``
  also paces the hand-over to real time plus that lead, on an absolute schedule, so what
  piles up downstream grows no faster than it would play. ``samples_played`` counts what
  the framework took, so ``InterruptReport.played_ms`` is "delivered to the framework".
* :class:`EngineHost` runs an :class:`~tts_stream.Engine` the adapter opened itself in a task
  of its own: the engine's pool owns a TaskGroup, which must be entered and left by one task,
  and frameworks start and stop services from different tasks.
* :func:`split_speak_options` separates ``engine.speak`` options from ``session.update``
  keys, so the adapters prewarm exactly the session they will speak on.

Boundary: public API of :mod:`tts_stream` and :class:`sinks._base.BaseSink` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from sinks._base import BaseSink, SinkState
from tts_stream import ClosedError, Engine, Frame, Timeout, UsageError, Voice
from tts_stream.audio import PCM16, deadline

__all__ = ["SPEAK_ONLY", "EngineHost", "HandoffSink", "resolve_voice", "split_speak_options"]

log = logging.getLogger(__name__)

# engine.speak() keywords that are not session.update keys (prewarm does not take them).
SPEAK_ONLY = frozenset({"first_commit", "policies", "options", "sinks", "sample_rate"})


def split_speak_options(options: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(speak_kwargs, prewarm_kwargs)`` from a ``speak_options`` dict.

    ``sinks`` and ``sample_rate`` are chosen by the adapter (the framework's queue, the
    pipeline's rate), so they are refused here with a clear message.
    """
    speak = dict(options or {})
    for key in ("sinks", "sample_rate"):
        if key in speak:
            raise UsageError(
                f"speak_options must not set {key!r}: the adapter sets it from the framework"
            )
    prewarm = {k: v for k, v in speak.items() if k not in SPEAK_ONLY}
    return speak, prewarm


async def resolve_voice(engine: Engine, voice: Voice | str, model: str | None) -> Voice | str:
    """A voice name with no ``model`` is looked up for its ``target_model``."""
    if isinstance(voice, str) and model is None:
        return await engine.voices.find(voice)
    return voice


class HandoffSink(BaseSink):
    """A sink that hands frames to a framework and bounds what the framework has not taken.

    ``deliver(frame)`` gives a frame to the framework and returns whether the framework
    accepted it (False: it was discarded, e.g. its context is gone; counted as dropped).
    The adapter calls :meth:`taken` with the samples the framework moved on. ``write``
    waits (at most ``write_timeout`` seconds, then :class:`~tts_stream.Timeout`) while
    ``max_outstanding_ms`` or more are handed over and not taken, and, with
    ``max_lead_ms``, until the frame is due: the first write starts a clock and no sample is
    handed over more than ``max_lead_ms`` before its time on it. ``drain`` waits until
    everything was taken (with ``drain=False`` it returns at once: for a framework that
    holds a partial frame until its input ends); ``interrupt`` forgets what is outstanding
    (the framework drops its own queue on an interruption).
    """

    def __init__(
        self,
        deliver: Callable[[Frame], Awaitable[bool]],
        *,
        max_outstanding_ms: float = 1000.0,
        max_lead_ms: float | None = None,
        drain: bool = True,
        write_timeout: float = 60.0,
        name: str = "framework",
    ) -> None:
        super().__init__(name=name)
        self._drain_waits = drain
        self._deliver = deliver
        self._max_ms = max_outstanding_ms
        self._lead_s = None if max_lead_ms is None else max_lead_ms / 1000.0
        self._clock_start: float | None = None
        self._handed = 0
        self._write_timeout = write_timeout
        self._outstanding = 0
        self._changed = asyncio.Event()

    @property
    def outstanding_samples(self) -> int:
        """Samples handed to the framework and not taken yet."""
        return self._outstanding

    def taken(self, samples: int) -> None:
        """The framework moved ``samples`` of the handed-over audio on."""
        if self._state is not SinkState.OPEN or samples <= 0:
            return
        n = min(samples, self._outstanding)
        self._outstanding -= n
        self._samples_played += n
        self._mark_first_sample()
        self._changed.set()

    async def _wait(self, ready: Callable[[], bool], what: str) -> None:
        try:
            async with asyncio.timeout(self._write_timeout):
                while not ready():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise Timeout(what, self._write_timeout) from None

    async def _write(self, samples: PCM16) -> None:
        cap = self.format.samples(self._max_ms)
        await self._wait(lambda: self._outstanding < cap, f"{self.name} to take audio")
        if self._lead_s is not None:
            now = time.monotonic()
            start = self._clock_start = self._clock_start or now
            due = deadline(start, self._handed, self.format.sample_rate) - self._lead_s
            if due > now:
                await asyncio.sleep(due - now)
        n = int(samples.size) // self.format.channels
        self._handed += n
        self._outstanding += n
        if not await self._deliver(Frame(samples)):
            self._outstanding -= n
            self._dropped_samples += n

    async def _drain(self) -> None:
        if not self._drain_waits:
            return  # the framework's queue is the output (it may hold a partial frame back)
        await self._wait(lambda: self._outstanding == 0, f"{self.name} to take the last audio")

    async def _interrupt(self) -> int:
        self._dropped_samples += self._outstanding
        self._outstanding = 0
        self._changed.set()
        return self._samples_played

    async def _release(self) -> None:
        self._changed.set()


class EngineHost:
    """Runs an adapter-owned :class:`~tts_stream.Engine` inside one task, start to stop.

    ``spawn`` starts a coroutine as a task owned by the framework (Pipecat's task manager)
    or by asyncio. :meth:`start` returns the engine once it is open (bounded by
    ``open_timeout``); :meth:`aclose` asks the task to leave the engine's block and waits
    for it (bounded by ``close_timeout``).
    """

    def __init__(
        self,
        make: Callable[[], Engine],
        *,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]] | None = None,
        open_timeout: float = 30.0,
        close_timeout: float = 30.0,
    ) -> None:
        self._make = make
        self._spawn = spawn or (lambda coro: asyncio.get_running_loop().create_task(coro))
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self._task: asyncio.Task[None] | None = None
        self._engine: Engine | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._closed = False

    async def _run(self) -> None:
        try:
            async with self._make() as engine:
                self._engine = engine
                self._ready.set()
                await self._stop.wait()  # the service's lifetime; aclose() sets it
        except Exception as exc:
            self._error = exc
        finally:
            self._engine = None
            self._ready.set()

    async def start(self) -> Engine:
        if self._closed:
            raise ClosedError("the adapter's engine was closed")
        if self._task is None:
            self._task = self._spawn(self._run())
        try:
            async with asyncio.timeout(self._open_timeout):
                await self._ready.wait()
        except TimeoutError:
            raise Timeout("the engine to open", self._open_timeout) from None
        if self._engine is None:
            if self._error is not None:
                raise self._error
            raise ClosedError("the adapter's engine was closed")
        return self._engine

    async def aclose(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        try:
            async with asyncio.timeout(self._close_timeout):
                await asyncio.shield(task)
        except TimeoutError:
            log.warning("engine did not close within %.0f s: cancelled", self._close_timeout)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
