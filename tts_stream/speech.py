"""A Speech: text in (with back-pressure), audio out to the fan-out, one utterance at a time.

Role: ``async with engine.speak(voice, sinks=[...]) as speech`` gives a :class:`Speech`. It
holds a configured realtime session from the pool, one *pump* task per session that moves
frames from the connection into the :class:`~tts_stream.fanout.Fanout`, and the orchestration
around them; every fact about the text and the audio (pushed, cut, consumed, billed,
delivered, replayable, heard) lives in the pure :class:`~tts_stream.ledger.Ledger`:

* **Back-pressure**: :meth:`Speech.push` waits while the text not yet synthesized exceeds
  ``max_pending_chars`` or the audio queued for the slowest lossless sink exceeds half of
  ``max_unplayed_ms``; a fast LLM token stream cannot grow memory without bound. When the
  text budget is full and no response is running, the speech commits (so a ``commit``-mode
  caller who never commits cannot deadlock).
* **first_commit="clause"** (``server_commit`` mode): commit as soon as the first clause is
  complete, for the lowest first audio; the server segments the rest.
* **Retry** (protocol.md §6.6): if the session is lost *before any audio reached a sink*, a
  fresh session is acquired and every text event sent so far is replayed (bounded
  attempts; the ledger's replay log). Whether an error is worth it is the error's own
  ``retryable``; one that asks for a wait first (``retry_after``: a rate limit) is raised.
  After audio, speech is never repeated: :class:`~tts_stream.errors.ConnectionLost` with
  ``audio_received=True`` is raised, and everything received was delivered to the sinks.
* **Barge-in**: :meth:`Speech.interrupt` clears the server's text buffer, retires the socket
  (closes it: ``response.cancel`` is not documented, §5.4), drops late deltas, interrupts
  every sink at once and reports what was played. The next push dials a new session.
* **Commit without noise**: :meth:`Speech.commit` sends only when the ledger has text the
  server has not cut yet; when the server's own cut overtakes a commit on the wire, the
  server's "empty buffer" answer is recognised and logged at debug level only.
* **Finish**: leaving the block sends ``session.finish``, waits for ``session.finished`` and
  for every sink to drain, and closes the sinks it opened.
* **Waits are bounded by inactivity**, never by the length of the speech: a wait (room for
  text, ``session.finished``, sinks draining) raises :class:`~tts_stream.errors.Timeout`
  only after ``idle_timeout`` seconds without *progress*: an audio delta or another event
  from the server, or a sink taking a frame. A three-minute utterance from a real-time
  server, or into a real-time sink, finishes; a stalled server is reported after
  ``idle_timeout`` of silence.

Errors of the pump are raised to the caller from the next ``push``/``commit`` or from the
exit of the ``async with`` block, never as an ExceptionGroup. Boundary: uses the pool, the
fan-out and metrics; never imports ``sinks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

from . import protocol as p
from .audio import PCM16, AudioFormat, Frame, Sink
from .connection import Audio, Connection, ResponseBegan
from .errors import (
    ClosedError,
    ConnectionFailed,
    ConnectionLost,
    Timeout,
    TtsStreamError,
    UsageError,
    server_error,
)
from .fanout import Fanout, LaneStats, Policy
from .ledger import CLAUSE_END, InterruptReport, Ledger, chars_for_billable
from .metrics import Recorder, UtteranceMetrics
from .pool import Lease, Pool, PoolKey
from .resume import Resumed, SentenceCutter, resume_point

__all__ = ["InterruptReport", "Speech", "SpeechOptions", "SpeechState", "chars_for_billable"]

log = logging.getLogger(__name__)

_FINISH_STATES = (p.State.FINISHING, p.State.FINISHED)
# Text budget full and nothing synthesizing: commit after _IDLE_GRACE_S (server_commit), and
# re-sync the text count after _DRIFT_WAIT_S; re-check every _IDLE_STEP_S meanwhile.
_IDLE_GRACE_S = 0.5
_DRIFT_WAIT_S = 2.0
_IDLE_STEP_S = 0.1
_CLEAR_TIMEOUT_S = 0.2  # best effort before the socket is retired anyway


class SpeechState(enum.Enum):
    NEW = "new"
    OPEN = "open"  # accepting text
    FINISHING = "finishing"  # session.finish sent (leaving the block)
    DONE = "done"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True, kw_only=True)
class SpeechOptions:
    """Tuning of a :class:`Speech` (all keyword-only; defaults suit a voice bot).

    ``idle_timeout``: the longest any wait of the speech goes on *without progress* (an
    audio delta or event from the server, a sink taking a frame); never a deadline on the
    whole utterance. ``stall_timeout`` and ``drain_timeout`` (older names, kept) override it
    for one phase: waiting for room to push, and finishing (``session.finished``, sinks
    draining); both are inactivity limits too. ``sink_timeout`` bounds one sink call
    (open, close, interrupt, its final drain).
    """

    max_pending_chars: int = 2000
    max_unplayed_ms: float = 4000.0
    lossy_buffered_ms: float = 1000.0
    policies: Mapping[str, Policy] = field(default_factory=dict)
    first_commit: Literal["clause"] | None = None
    retries: int = 2
    idle_timeout: float = 30.0
    drain_timeout: float | None = None
    stall_timeout: float | None = None
    sink_timeout: float = 10.0
    #: After audio, a lost connection fails the speech ("fail": nothing is ever repeated) or
    #: continues on a fresh session from the next sentence ("resume", see tts_stream.resume).
    on_loss: Literal["fail", "resume"] = "fail"
    resume_attempts: int = 3  # resumes per speech at most
    resume_backoff_s: float = 0.2  # before each resume, doubled each time, at most 2 s
    resume_stall_s: float = 5.0  # a response silent this long counts as lost (resume only)
    on_resume: Callable[[Resumed], None] | None = None

    def __post_init__(self) -> None:
        for name in ("idle_timeout", "drain_timeout", "stall_timeout", "sink_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UsageError(f"SpeechOptions.{name} must be > 0, got {value!r}")

    @property
    def finish_idle_s(self) -> float:
        """Inactivity limit while finishing (``drain_timeout``, else ``idle_timeout``)."""
        return self.drain_timeout if self.drain_timeout is not None else self.idle_timeout

    @property
    def push_idle_s(self) -> float:
        """Inactivity limit while ``push`` waits for room (``stall_timeout``, else
        ``idle_timeout``)."""
        return self.stall_timeout if self.stall_timeout is not None else self.idle_timeout


class _Progress(asyncio.Event):
    """An event set on every sign of progress, remembering when (``at``, monotonic).

    Set by the pump for every server event and by the fan-out for every frame a sink took;
    inactivity limits are measured from ``at``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.at = time.monotonic()
        self._on = False  # is_set() without a call: set() runs twice per delta

    def set(self) -> None:
        self.at = time.monotonic()
        if not self._on:
            self._on = True
            super().set()

    def clear(self) -> None:
        self._on = False
        super().clear()


@dataclass
class _Attempt:
    lease: Lease
    retired: bool = False
    complete: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    watch: asyncio.Task[None] | None = None  # on_loss="resume": the stall watchdog
    last_activity: float = 0.0  # monotonic time of the last delta or response start


def _stop_watch(att: _Attempt) -> None:
    watch, att.watch = att.watch, None
    if watch is not None and watch is not asyncio.current_task():
        watch.cancel()


def _retryable(exc: BaseException) -> bool:
    """The one retry policy (:mod:`tts_stream.errors`), for a real-time speech: retry what
    the error calls retryable *at once*. An error that asks for a wait first (a rate limit,
    ``retry_after``) is raised without a retry: the caller is waiting for audio now, and a
    retry before the wait would only count as another request against the same limit."""
    return isinstance(exc, TtsStreamError) and exc.retryable and not exc.retry_after


class Speech:
    """One utterance streamed to sinks. Create it with ``Engine.speak``; use ``async with``."""

    def __init__(
        self,
        *,
        pool: Pool,
        key: PoolKey,
        sinks: Sequence[Sink],
        options: SpeechOptions = SpeechOptions(),  # noqa: B008 - frozen
        on_done: Callable[[UtteranceMetrics], None] | None = None,
        on_open: Callable[[], None] | None = None,
    ) -> None:
        if not sinks:
            raise UsageError("speak() needs at least one sink")
        if options.on_loss not in ("fail", "resume"):
            raise UsageError(f"on_loss must be 'fail' or 'resume', got {options.on_loss!r}")
        if options.on_loss == "resume" and key.mode == "commit":
            raise UsageError(
                "on_loss='resume' needs mode='server_commit': in commit mode the segments are "
                "the caller's and the client cannot re-cut them at a sentence"
            )
        self.key = key
        self.mode = key.mode
        self.fmt = AudioFormat(sample_rate=key.sample_rate)
        self.options = options
        self._pool = pool
        self._sinks = list(sinks)
        self._on_done = on_done
        self._on_open = on_open  # called once the session is acquired and its pump runs
        self.state = SpeechState.NEW
        self._progress = _Progress()
        # Set when the session completes or fails: what finishing waits for (not every delta).
        self._ended = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._stack: contextlib.AsyncExitStack | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._fanout: Fanout | None = None
        self._attempt: _Attempt | None = None
        self._failure: BaseException | None = None
        self._rec = Recorder(
            model=key.model, voice=key.voice, mode=key.mode, sample_rate=key.sample_rate,
            started_at=time.monotonic(),
        )  # fmt: skip
        self._final: UtteranceMetrics | None = None
        # Every fact about the text and the audio: pushed, cut, consumed, heard, replayable.
        self._ledger = Ledger(key.sample_rate, server_cuts=key.mode == "server_commit")
        self._attempts_left = options.retries
        # on_loss="resume": commit per sentence; what was resumed so far.
        self._cutter = SentenceCutter() if options.on_loss == "resume" else None
        self._resumed: list[Resumed] = []

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Speech:
        if self.state is not SpeechState.NEW:
            raise ClosedError("a Speech is single-use")
        stack = self._stack = contextlib.AsyncExitStack()
        try:
            self._fanout = await stack.enter_async_context(
                Fanout(
                    self._sinks,
                    self.fmt,
                    policies=self.options.policies,
                    max_buffered_ms=self.options.max_unplayed_ms,
                    lossy_buffered_ms=self.options.lossy_buffered_ms,
                    timeout=self.options.sink_timeout,
                    progress=self._progress,
                )
            )
            self._tg = await stack.enter_async_context(asyncio.TaskGroup())
            stack.push_async_callback(self._retire_all)
            async with self._send_lock:
                await self._new_attempt()
        except BaseException:
            self.state = SpeechState.CLOSED
            await stack.aclose()
            raise
        self.state = SpeechState.OPEN
        on_open, self._on_open = self._on_open, None
        if on_open is not None:
            on_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._stack is not None
        raised: BaseException | None = None
        try:
            if exc is None and self._failure is None:
                await self._finish_and_drain()
            elif self._failure is not None:
                await self._drain_quietly()  # keep everything received (WAV stays valid)
            if exc is None and self._failure is not None:
                raised = self._failure
        except TtsStreamError as err:
            raised = err
            self._rec.error = self._rec.error or repr(err)
        finally:
            if self.state is not SpeechState.FAILED:
                self.state = SpeechState.CLOSED
            await self._stack.aclose()
            self._finalize()
        if raised is not None:
            raise raised

    async def aclose(self) -> None:
        """Abort: close the session and the sinks opened here, dropping queued audio."""
        if self._stack is not None and self.state not in (SpeechState.CLOSED,):
            self.state = SpeechState.CLOSED
            await self._stack.aclose()
            self._finalize()

    def _finalize(self) -> None:
        if self._final is None:
            self._final = self._snapshot()
            on_done, self._on_done = self._on_done, None
            if on_done is not None:
                on_done(self._final)
        self._unlink()

    def _unlink(self) -> None:
        """Drop what points back at this speech once it is closed (the task group, the exit
        stack, the attempt): a finished speech is then freed by reference counting alone,
        not left as a cycle for a full collection to find (issue 11, the collector)."""
        self._stack = None
        self._tg = None
        self._attempt = None

    # --- public API ---------------------------------------------------------------------------

    @property
    def metrics(self) -> UtteranceMetrics:
        """Latency record of this utterance (final once the block is left)."""
        return self._final if self._final is not None else self._snapshot()

    def queue_stats(self) -> tuple[LaneStats, ...]:
        """The fan-out's per-sink queue statistics (sizes, peaks, drops)."""
        return self._fanout.stats() if self._fanout else ()

    @property
    def resumes(self) -> tuple[Resumed, ...]:
        """Every resume after a lost connection (``on_loss="resume"``), in order."""
        return tuple(self._resumed)

    @property
    def pending_chars(self) -> int:
        """Text pushed that no completed response has consumed yet."""
        return self._ledger.pending_chars

    async def push(self, text: str) -> None:
        """Send ``text`` (any size: a token, a sentence); waits while the pipeline is full."""
        self._check_open("push")
        if not isinstance(text, str):
            raise UsageError(f"push() takes str, got {type(text).__name__}")
        # A long text goes in pieces so that the budget applies inside one call, too.
        step = max(64, self.options.max_pending_chars // 4)
        for i in range(0, len(text), step):
            await self._push_piece(text[i : i + step])

    async def _push_piece(self, text: str) -> None:
        await self._wait_for_room()
        async with self._send_lock:
            self._check_open("push")
            att = await self._ensure_attempt()
            if self._cutter is not None:
                await self._send_cut(att, text)
                return
            await self._send(att, "append", text)
            if (
                self.options.first_commit == "clause"
                and self.mode == "server_commit"
                and not self._ledger.committed_once
                and any(c in CLAUSE_END for c in text)
            ):
                await self._send(att, "commit", "")

    async def commit(self) -> None:
        """Synthesize what was pushed so far now (both modes, protocol.md §5.6).

        Sends nothing when the server already cut all the text (``server_commit`` mode, a
        sentence end): a commit of an empty buffer is an error on the server.
        """
        self._check_open("commit")
        async with self._send_lock:
            self._check_open("commit")
            att = self._attempt
            if att is None or self._ledger.uncut == 0:
                return
            await self._send(att, "commit", "")

    async def interrupt(self) -> InterruptReport:
        """Barge-in: stop every sink now, drop late audio, retire the session; report."""
        if self.state not in (SpeechState.OPEN, SpeechState.FINISHING):
            raise UsageError(f"cannot interrupt a speech in state {self.state.name}")
        assert self._fanout is not None
        self._rec.interrupted = True
        async with self._send_lock:
            att, self._attempt = self._attempt, None
            if att is not None:
                att.retired = True  # the pump drops everything from now on
                att.lease.connection.retire_current()
                await self._cancel_pump(att)
            played = await self._fanout.interrupt()  # the sinks stop first, at once
            report = self._ledger.report(played)
            if att is not None:
                conn = att.lease.connection
                if conn.state in (p.State.READY, p.State.STREAMING):
                    # Clear the server's text buffer, then retire the socket: response.cancel
                    # is not documented (§5.4), closing is what stops synthesis for sure.
                    with contextlib.suppress(TtsStreamError, TimeoutError):
                        async with asyncio.timeout(_CLEAR_TIMEOUT_S):
                            await conn.clear()
                await att.lease.release()
            self._ledger.interrupted()  # the next push starts afresh on a new session
            self._progress.set()
        return report

    # --- sending ------------------------------------------------------------------------------

    def _check_open(self, what: str) -> None:
        if self._failure is not None:
            raise self._failure
        if self.state is not SpeechState.OPEN:
            raise ClosedError(f"cannot {what} a speech in state {self.state.name}")

    async def _send(self, att: _Attempt, op: str, text: str) -> None:
        """Send one text event on the current session (the caller holds the send lock).

        Recorded in the ledger even when the socket is going away: a replay sends it again.
        """
        conn = att.lease.connection
        now = time.monotonic()
        try:
            if op == "append":
                await conn.append(text)
                self._rec.text_sent(now, len(text))
            elif op == "commit":
                await conn.commit()
            else:
                await conn.finish()
        except (ConnectionFailed, ClosedError) as exc:
            # The socket is going away; the pump sees the close and decides (retry or fail).
            log.debug("send of %s failed: %r", op, exc)
        except UsageError:
            if conn.state not in (p.State.FAILED, p.State.CLOSED):
                raise
            # The session failed under us; the pump reports why (retry or the server error).
        self._record(op, text)

    def _record(self, op: str, text: str) -> None:
        if op == "append":
            self._ledger.appended(text)
        elif op == "commit":
            self._ledger.committed()
        else:
            self._ledger.finishing()

    async def _send_cut(self, att: _Attempt, text: str) -> None:
        """on_loss="resume": append ``text`` committing after each sentence (lock held)."""
        assert self._cutter is not None
        for op, piece in self._cutter.feed(text):
            if op == "append":
                await self._send(att, "append", piece)
            elif self._ledger.uncut > 0:
                await self._send(att, "commit", "")

    async def _ensure_attempt(self) -> _Attempt:
        if self._attempt is None:
            await self._new_attempt()
        assert self._attempt is not None
        return self._attempt

    async def _new_attempt(self) -> None:
        """Acquire a session and start its pump (the caller holds the send lock).

        A failure to connect is retried like a loss before audio (bounded, short backoff),
        except for errors that would repeat (401/403, 429, a refused configuration).
        """
        assert self._tg is not None
        backoff = 0.05
        while True:
            try:
                lease = await self._pool.acquire(self.key)
                break
            except TtsStreamError as exc:
                if not _retryable(exc) or self._attempts_left <= 0:
                    raise
                self._attempts_left -= 1
                self._rec.retries += 1
                log.info("could not get a session (%s): retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 4, 1.0)
        self._rec.acquired(lease.info)
        att = _Attempt(lease)
        self._attempt = att
        att.task = self._tg.create_task(self._pump(att), name="tts-stream-speech-pump")
        if self._cutter is not None:
            att.last_activity = time.monotonic()
            att.watch = self._tg.create_task(self._watch(att), name="tts-stream-speech-stall")

    async def _watch(self, att: _Attempt) -> None:
        """on_loss="resume": a response silent for ``resume_stall_s`` is a lost connection."""
        limit = self.options.resume_stall_s
        step = max(limit / 4, 0.01)
        while not att.retired and not att.complete.is_set():
            await asyncio.sleep(step)
            conn = att.lease.connection
            if conn.protocol.response_active and time.monotonic() - att.last_activity > limit:
                log.warning("no audio for %.1f s during a response: the session stalled", limit)
                att.watch = None  # this task resumes now: nobody may cancel it midway
                await self._after_loss(att, Timeout("audio from a stalled session", limit))
                return

    async def _cancel_pump(self, att: _Attempt) -> None:
        att.retired = True
        _stop_watch(att)
        task = att.task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(self.options.sink_timeout):
                    await asyncio.shield(task)
        if task is not None and task.done():
            att.task = None  # its exception's traceback holds the pump's frame, which holds att

    async def _stop_attempt(self, att: _Attempt) -> None:
        await self._cancel_pump(att)
        await att.lease.release()

    async def _retire_all(self) -> None:
        att, self._attempt = self._attempt, None
        if att is not None:
            await self._stop_attempt(att)

    # --- back-pressure ------------------------------------------------------------------------

    def _full(self) -> bool:
        assert self._fanout is not None
        if self._ledger.pending_chars >= self.options.max_pending_chars:
            return True
        audio_cap = self.fmt.samples(self.options.max_unplayed_ms) // 2
        return self._fanout.backlog_samples() > audio_cap

    async def _wait_for_room(self) -> None:
        idle_since: float | None = None
        while self._full():
            self._check_open("push")
            att = self._attempt
            idle = (
                att is not None
                and self._ledger.pending_chars >= self.options.max_pending_chars
                and not att.lease.connection.protocol.response_active
            )
            if att is None or not idle:
                idle_since = None
            else:
                # The text budget is full but nothing is being synthesized.
                now = time.monotonic()
                idle_since = idle_since if idle_since is not None else now
                done = await self._unstick(att, now - idle_since)
                if done == "forgiven":
                    continue
                if done == "committed":
                    idle_since = None
            await self._wait_progress(idle)

    async def _unstick(
        self, att: _Attempt, waited: float
    ) -> Literal["committed", "forgiven"] | None:
        """The text budget is full and the server idle for ``waited`` s: commit, or re-sync."""
        ledger = self._ledger
        if ledger.uncut > 0 and (self.mode == "commit" or waited >= _IDLE_GRACE_S):
            # The server holds text it has not cut (commit mode: the caller never committed;
            # server_commit: its cut rule is waiting): cut now rather than deadlock. In
            # server_commit mode give the server a moment first.
            async with self._send_lock:
                if self._attempt is att and ledger.uncut > 0:
                    await self._send(att, "commit", "")
            return "committed"
        if ledger.uncut == 0 and waited >= _DRIFT_WAIT_S:
            # The server cut all our text and is idle, yet text counts as pending.
            n = ledger.forgive_unbilled()
            log.warning("%d pending chars were never billed: counted as spoken", n)
            return "forgiven"
        return None

    async def _wait_progress(self, idle: bool) -> None:
        """Wait for progress: a short step while idle, else up to the push inactivity limit."""
        self._progress.clear()
        limit = self.options.push_idle_s
        try:
            async with asyncio.timeout(_IDLE_STEP_S if idle else limit):
                await self._progress.wait()
        except TimeoutError as exc:
            if not idle:
                raise Timeout("room for more text", limit, inactivity=True) from exc

    # --- the pump -----------------------------------------------------------------------------

    async def _pump(self, att: _Attempt) -> None:
        """Move one session's events into the fan-out. Never raises into the TaskGroup."""
        try:
            lost = await self._pump_events(att)
            if att.retired or att.complete.is_set():
                return
            conn = att.lease.connection
            await self._after_loss(att, lost or self._lost(conn, conn.close_code,
                                                           conn.close_reason))  # fmt: skip
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("speech pump failed")
            self._fail(exc)
        finally:
            _stop_watch(att)
            self._progress.set()
            self._ended.set()

    async def _pump_events(self, att: _Attempt) -> BaseException | None:
        """Handle the session's events until its channel ends; returns the loss, if any.

        Audio mostly never reaches this loop: the connection hands each delta to
        :meth:`_audio_nowait` from its frame callback while nothing is queued before it;
        what that cannot take without waiting comes through the channel, in order.
        """
        conn = att.lease.connection
        conn.deliver_nowait = functools.partial(self._audio_nowait, att)
        try:
            return await self._pump_channel(att, conn)
        finally:
            conn.deliver_nowait = None

    async def _pump_channel(self, att: _Attempt, conn: Connection) -> BaseException | None:
        lost: BaseException | None = None
        async for item in conn.events:  # no loop round-trip when one is ready
            if att.retired:
                return None
            if isinstance(item, Audio):
                await self._on_audio(att, item)
            else:
                loss = self._on_event(att, item)
                if isinstance(item, p.ServerFailure) and loss is not None:
                    return loss  # fatal: the session is unusable even if the socket stays open
                lost = lost or loss
            self._progress.set()
        return lost

    def _audio_nowait(
        self, att: _Attempt, samples: PCM16, rid: str, at: float, sent_at: float | None
    ) -> bool:
        """The connection's fast path (one delta, from its frame callback): what
        :meth:`_on_audio` does, when the fan-out takes the frame without waiting; else False
        and the delta goes through the channel. Never raises into the connection: a failure
        fails the speech as the pump's would."""
        if att.retired:
            return True  # dropped, as the pump would
        try:
            ledger, fanout, rec = self._ledger, self._fanout, self._rec
            assert fanout is not None
            # ledger.samples_out: the offset ledger.audio gives this delta below
            if not fanout.write_nowait(Frame(samples, ledger.samples_out, rid, at)):
                return False
            rec.delta(at, samples, server_sent_at=sent_at)
            self._on_response_started(rid, at)
            ledger.audio(len(samples))  # nothing is replayable from now on
            att.last_activity = at
            att.lease.first_audio()  # the pool starts the refill now (idempotent, O(1))
            self._progress.set()
        except Exception as exc:
            log.exception("speech pump failed")
            att.retired = True  # the rest of this session is dropped, as after a pump failure
            self._fail(exc)
        return True

    def _on_event(self, att: _Attempt, item: object) -> BaseException | None:
        """One event other than audio; returns the loss it reports, if any."""
        if isinstance(item, ResponseBegan):
            self._on_response_started(item.response_id, item.received_at)
        elif isinstance(item, p.ResponseFinished):
            self._rec.response_done(item.characters)
            self._ledger.response_finished(item.response_id, item.characters)
        elif isinstance(item, p.BufferCommitted):
            self._ledger.server_cut()
        elif isinstance(item, p.ServerFailure):
            return self._on_server_failure(item)
        elif isinstance(item, p.SessionComplete):
            att.complete.set()
            self._ended.set()
        elif isinstance(item, p.SessionLost):
            return self._lost(att.lease.connection, item.code, item.reason)
        return None

    def _on_server_failure(self, item: p.ServerFailure) -> BaseException | None:
        if item.fatal:
            return server_error(item.message or "server error", code=item.code)
        if self._ledger.commit_overtaken(item.code):
            # The server's own cut overtook our commit on the wire: expected, not an error.
            log.debug("commit overtaken by the server's cut (%s: %s)", item.code, item.message)
        else:
            log.warning("server reported %s: %s", item.code, item.message)
        return None

    def _lost(self, conn: Connection, code: int | None, reason: str) -> ConnectionLost:
        return ConnectionLost(
            f"connection {conn.close_cause()} before the session finished",
            code=code,
            reason=reason,
            audio_received=not self._ledger.replayable,
        )

    async def _on_audio(self, att: _Attempt, item: Audio) -> None:
        assert self._fanout is not None
        samples, rid, at = item.samples, item.response_id, item.received_at
        self._rec.delta(at, samples, server_sent_at=item.server_sent_at)
        self._on_response_started(rid, at)
        offset = self._ledger.audio(samples.shape[0])  # nothing is replayable from now on
        att.last_activity = at
        await self._fanout.write(Frame(samples, offset, rid, at))  # the delta's one Frame
        att.lease.first_audio()  # the pool starts the refill now (idempotent, O(1))

    def _on_response_started(self, rid: str, at: float) -> None:
        if self._ledger.response_started(rid):
            self._rec.response_created(at)

    async def _after_loss(self, att: _Attempt, lost: BaseException) -> None:
        """The session ended early: retry transparently before audio, else fail (or resume)."""
        delivered = not self._ledger.replayable
        if delivered and self._cutter is not None and _retryable(lost):
            await self._resume(att, lost)
            return
        if delivered or not _retryable(lost) or self._attempts_left <= 0:
            if isinstance(lost, ConnectionLost):
                lost.audio_received = delivered
            self._fail(lost)
            return
        self._attempts_left -= 1
        log.info("session lost before any audio (%s): retrying on a fresh session", lost)
        async with self._send_lock:
            if not await self._take_over(att):
                return
            self._rec.forget_audio()
            ops = self._ledger.replay()
            try:
                await self._new_attempt()
                assert self._attempt is not None
                for op, text in ops:
                    await self._send(self._attempt, op, text)
            except TtsStreamError as exc:
                if _retryable(exc) and self._attempts_left > 0:
                    # The fresh session failed as well: let its own pump (if any) decide.
                    log.info("retry failed: %r", exc)
                self._fail(exc)

    async def _take_over(self, att: _Attempt) -> bool:
        """Retire the lost attempt ``att`` if it is still current (the send lock is held)."""
        if att.retired or self._attempt is not att:
            return False  # someone else (the pump or the stall watchdog) took over already
        await self._cancel_pump(att)
        await att.lease.release()
        self._attempt = None
        return True

    async def _resume(self, att: _Attempt, lost: BaseException) -> None:
        """on_loss="resume": continue on a fresh session from the next sentence (bounded)."""
        opts = self.options
        async with self._send_lock:
            if not await self._take_over(att):
                return
            ledger = self._ledger
            heard = ledger.running_heard
            cut, rest = ledger.resume_from(resume_point(ledger.pending_text, running_heard=heard))
            finishing = self.state is SpeechState.FINISHING
            if len(self._resumed) >= opts.resume_attempts:
                self._fail(lost)
                return
            await asyncio.sleep(min(opts.resume_backoff_s * 2 ** len(self._resumed), 2.0))
            try:
                await self._new_attempt()  # connect failures: retried like any acquire
            except TtsStreamError as exc:
                self._fail(exc)
                return
            assert self._attempt is not None
            event = self._record_resume(lost, cut, rest, heard)
            self._cutter = SentenceCutter()
            await self._send_cut(self._attempt, rest)
            if finishing:
                await self._send(self._attempt, "finish", "")
        if opts.on_resume is not None:
            try:
                opts.on_resume(event)
            except Exception:
                log.exception("on_resume callback failed")

    def _record_resume(self, lost: BaseException, cut: str, rest: str, heard: bool) -> Resumed:
        event = Resumed(
            attempt=len(self._resumed) + 1,
            code=getattr(lost, "code", None),
            reason=str(lost),
            audio_ms=self.fmt.ms(self._ledger.samples_out),
            cut_text=cut,
            resumed_text=rest,
        )  # fmt: skip
        self._resumed.append(event)
        self._rec.resumes += 1
        self._rec.lost_chars += len(cut) if heard else 0
        log.warning("connection lost after %.0f ms of audio: resumed at a sentence "
                    "boundary (%d chars cut)", event.audio_ms, len(cut))  # fmt: skip
        return event

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
            self._rec.error = repr(exc)
        if self.state in (SpeechState.OPEN, SpeechState.FINISHING):
            self.state = SpeechState.FAILED
        self._progress.set()
        self._ended.set()

    # --- finishing ----------------------------------------------------------------------------

    async def _finish_and_drain(self) -> None:
        assert self._fanout is not None
        self.state = SpeechState.FINISHING
        limit = self.options.finish_idle_s
        started = time.monotonic()
        async with self._send_lock:
            att = self._attempt
            # Sent (or, on a dead session, recorded for the replay) unless already finishing.
            if att is not None and att.lease.connection.state not in _FINISH_STATES:
                await self._send(att, "finish", "")
        # Wait for session.finished; a retry may swap the attempt meanwhile.
        while True:
            att = self._attempt
            if self._failure is not None or att is None or att.complete.is_set():
                break
            self._ended.clear()
            # Woken at the end, or when the limit since the last progress may have run out
            # (not on every delta: the pump and the sinks only stamp _progress.at).
            remaining = max(started, self._progress.at) + limit - time.monotonic()
            if remaining <= 0:
                raise Timeout("session.finished", limit, inactivity=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._ended.wait()
        async with self._send_lock:
            pass  # a barge-in from another task ended the wait: let it complete first
        if self._failure is not None:
            await self._drain_quietly()
            raise self._failure
        await self._wait_sinks_caught_up(limit)
        await self._fanout.drain()
        self.state = SpeechState.DONE

    async def _wait_sinks_caught_up(self, limit: float) -> None:
        """Wait until no lossless queue holds audio, bounded by inactivity: a real-time sink
        takes as long as the audio it has queued (the fan-out's own drain is a deadline)."""
        assert self._fanout is not None
        while self._fanout.backlog_samples() > 0:
            self._progress.clear()
            try:
                async with asyncio.timeout(limit):
                    await self._progress.wait()
            except TimeoutError as exc:
                raise Timeout("sinks to play the queued audio", limit, inactivity=True) from exc

    async def _drain_quietly(self) -> None:
        if self._fanout is None:
            return
        try:
            await self._fanout.drain()
        except TtsStreamError as exc:
            log.warning("draining sinks after a failure: %r", exc)

    # --- reports ------------------------------------------------------------------------------

    def _snapshot(self) -> UtteranceMetrics:
        sinks = self._fanout.sink_stats() if self._fanout else {}
        return self._rec.snapshot(sinks)
