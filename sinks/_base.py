"""Shared lifecycle and counters for the sinks in this package.

:class:`BaseSink` implements the state machine of :class:`tts_stream.audio.Sink` once
(``NEW → OPEN → CLOSED``), the :class:`~tts_stream.errors.ClosedError` on use after close, the
idempotent ``aclose`` that always releases, and the counters behind ``stats()``. A concrete sink
fills in five small hooks (``_open``, ``_write``, ``_drain``, ``_interrupt``, ``_release``),
plus optionally ``_try_write`` (the synchronous half behind the optional ``write_nowait``).
It has every optional member of the protocol (``write_nowait``, ``is_open`` with ``format``,
``preferred_sample_rate``), with defaults a subclass may override.
:class:`OwnedTasks` is the small structure that owns a sink's background tasks: started in
``open``, cancelled and awaited in ``aclose``, first failure kept and re-raised to the caller.
Boundary: imports ``tts_stream.audio`` and ``tts_stream.errors`` only.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, ClassVar

from tts_stream.audio import PCM16, AudioFormat, Frame, SinkStats
from tts_stream.errors import ClosedError, Timeout, UsageError

__all__ = ["BaseSink", "OwnedTasks", "SinkState"]

log = logging.getLogger(__name__)


class SinkState(enum.Enum):
    """Lifecycle of a sink; illegal calls raise with the state's name."""

    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


def _defined_in(cls: type, attr: str) -> type:
    return next(c for c in cls.__mro__ if attr in c.__dict__)


class BaseSink:
    """Lifecycle, counters and ``stats()`` shared by every sink.

    Subclasses override the hooks; the public methods here check the state, keep the
    counters and translate misuse into :class:`~tts_stream.errors.UsageError` /
    :class:`~tts_stream.errors.ClosedError`. Writes are expected from one task at a time (the
    fan-out gives each sink its own queue and task).
    """

    name: str
    #: The optional ``preferred_sample_rate`` of the Sink protocol (RatePreferringSink):
    #: None, any rate. A sink that plays best at one rate (RTP's 8 kHz) overrides it.
    preferred_sample_rate: int | None = None
    # Whether write_nowait may deliver through _try_write (see __init_subclass__).
    _nowait_exact: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Decide once per class whether ``_try_write`` does what ``write`` does.

        Not if the class (or a base below BaseSink) overrode ``write`` (to stamp, count,
        transform...) or overrode ``_write`` below the class that wrote ``_try_write``: only
        the override knows what delivering a frame means, so there is no exact non-blocking
        path and ``write_nowait`` always refuses.
        """
        super().__init_subclass__(**kwargs)
        cls._nowait_exact = _defined_in(cls, "write") is BaseSink and issubclass(
            _defined_in(cls, "_try_write"), _defined_in(cls, "_write")
        )

    def __init__(self, *, name: str) -> None:
        self.name = name
        self._state = SinkState.NEW
        self._fmt: AudioFormat | None = None
        self._samples_written = 0
        self._samples_played = 0
        self._dropped_samples = 0
        self._underruns = 0
        self._first_sample_at: float | None = None

    # -- public API (the Sink protocol) --------------------------------------------------

    @property
    def state(self) -> SinkState:
        return self._state

    @property
    def is_open(self) -> bool:
        """The optional ``is_open`` of the Sink protocol (ReusableSink): opened, not closed."""
        return self._state is SinkState.OPEN

    @property
    def format(self) -> AudioFormat:
        """The format given to :meth:`open` (raises before that)."""
        if self._fmt is None:
            raise UsageError(f"sink {self.name!r} has no format in state {self._state.name}")
        return self._fmt

    async def open(self, fmt: AudioFormat) -> None:
        """Prepare the sink for audio in ``fmt``; allowed once, in state ``NEW``."""
        if self._state is not SinkState.NEW:
            raise self._state_error("open")
        self._fmt = fmt
        try:
            await self._open(fmt)
        except BaseException:
            # A half-opened sink must not leak what it grabbed before failing.
            self._state = SinkState.CLOSED
            await self._release()
            raise
        self._state = SinkState.OPEN

    async def write(self, frame: Frame) -> None:
        """Queue or deliver ``frame``; may await (back-pressure)."""
        if self._state is not SinkState.OPEN:
            raise self._state_error("write")
        samples = frame.samples
        if samples.size == 0:
            return
        n = int(samples.size) // self.format.channels
        # Counted when handed over, so written == played + dropped (+ in flight) holds even
        # when _write fails or is cancelled half-way; _write_failed accounts for the loss.
        self._samples_written += n
        try:
            await self._write(samples)
        except BaseException:
            self._write_failed(n)
            raise

    def write_nowait(self, frame: Frame) -> bool:
        """Deliver ``frame`` exactly as :meth:`write` would, without waiting, or do nothing.

        Returns True if the frame was taken (same counters, ``first_sample_at`` and failure
        semantics as :meth:`write`), False if taking it would have to wait (nothing changed:
        call :meth:`write` instead). Misuse raises exactly as :meth:`write` does (UsageError
        before open, ClosedError after close), never False. Sinks that do not implement the
        ``_try_write`` hook, and subclasses that override :meth:`write` (or ``_write`` without
        ``_try_write``), always return False.
        """
        if self._state is not SinkState.OPEN:
            raise self._state_error("write")
        if not self._nowait_exact:
            return False
        samples = frame.samples
        if samples.size == 0:
            return True  # write() returns at once for an empty frame
        n = int(samples.size) // self.format.channels
        # Same accounting as write(); nothing can observe the counters in between (no await).
        self._samples_written += n
        try:
            taken = self._try_write(samples)
        except BaseException:
            self._write_failed(n)
            raise
        if not taken:
            self._samples_written -= n  # refused: as if never called
        return taken

    async def drain(self) -> None:
        """Return once everything written has left the sink (no-op unless open)."""
        if self._state is SinkState.OPEN:
            await self._drain()

    async def interrupt(self) -> int:
        """Stop at once, drop what is queued; return the samples that left the sink so far."""
        if self._state is not SinkState.OPEN:
            return self._samples_played
        return await self._interrupt()

    async def aclose(self) -> None:
        """Drain, then release everything; idempotent, and releases even if draining fails."""
        if self._state is SinkState.CLOSED:
            return
        was_open = self._state is SinkState.OPEN
        self._state = SinkState.CLOSED
        try:
            if was_open:
                await self._drain()
        finally:
            await self._release()

    def stats(self) -> SinkStats:
        """A snapshot of the counters (samples per channel, at the format's rate)."""
        return SinkStats(
            name=self.name,
            samples_written=self._samples_written,
            samples_played=self._samples_played,
            dropped_samples=self._dropped_samples,
            underruns=self._underruns,
            first_sample_at=self._first_sample_at,
        )

    async def __aenter__(self) -> BaseSink:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self._state.name}>"

    # -- helpers for subclasses ----------------------------------------------------------

    def _mark_first_sample(self) -> None:
        """Record the monotonic time the first sample crossed the I/O boundary."""
        if self._first_sample_at is None:
            self._first_sample_at = time.monotonic()

    def _state_error(self, what: str) -> UsageError:
        if self._state is SinkState.CLOSED:
            return ClosedError(f"{what}() on sink {self.name!r} in state {self._state.name}")
        return UsageError(f"{what}() on sink {self.name!r} in state {self._state.name}")

    # -- hooks ---------------------------------------------------------------------------

    async def _open(self, fmt: AudioFormat) -> None:
        """Grab resources; called once from :meth:`open`."""

    async def _write(self, samples: PCM16) -> None:
        """Deliver or queue ``samples`` (non-empty, interleaved if multichannel)."""
        raise NotImplementedError

    def _try_write(self, samples: PCM16) -> bool:
        """Do exactly what ``_write`` would if it can finish without awaiting, and return True;
        otherwise change nothing and return False (the default: no non-blocking path)."""
        return False

    def _write_failed(self, samples: int) -> None:
        """``_write`` raised (or was cancelled): by default none of its samples got out."""
        self._dropped_samples += samples

    async def _drain(self) -> None:
        """Wait until everything written has left the sink."""

    async def _interrupt(self) -> int:
        """Drop what is queued; return ``self._samples_played`` after accounting."""
        return self._samples_played

    async def _release(self) -> None:
        """Release every resource; must be safe to call after a failed or partial open."""


class OwnedTasks:
    """Background tasks owned by one object (a TaskGroup that lives across method calls).

    ``asyncio.TaskGroup`` must be entered and exited in one task, and cancels that task when a
    child fails; a sink opened by one task and closed by another needs the ownership without
    the host task. Here: tasks are started explicitly, the first failure is kept and re-raised
    by :meth:`check` (called from the sink's public methods), and :meth:`aclose` cancels and
    awaits every task, bounded by a timeout.
    """

    def __init__(self, owner: str, *, stop_timeout: float = 5.0) -> None:
        self._owner = owner
        self._stop_timeout = stop_timeout
        self._tasks: set[asyncio.Task[None]] = set()
        self._error: BaseException | None = None

    def start(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._owner}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self._error is None:
            self._error = exc
            log.error("task %s failed: %r", task.get_name(), exc)

    @property
    def tasks(self) -> frozenset[asyncio.Task[None]]:
        return frozenset(self._tasks)

    @property
    def error(self) -> BaseException | None:
        return self._error

    def check(self) -> None:
        """Re-raise the first failure of an owned task, if any."""
        if self._error is not None:
            raise self._error

    async def aclose(self) -> None:
        """Cancel every task and wait for them (at most ``stop_timeout`` seconds)."""
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self._stop_timeout)
        if pending:
            raise Timeout(f"tasks of {self._owner} to stop", self._stop_timeout)
