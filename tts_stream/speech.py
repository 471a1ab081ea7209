"""A Speech: text in (with back-pressure), audio out to the fan-out, one utterance at a time.

Role: ``async with engine.speak(voice, sinks=[...]) as speech`` gives a :class:`Speech`. It
holds a configured realtime session from the pool, one *pump* task per session that moves
frames from the connection into the :class:`~tts_stream.fanout.Fanout`, and the text
bookkeeping that makes these work:

* **Back-pressure**: :meth:`Speech.push` waits while the text not yet synthesized exceeds
  ``max_pending_chars`` or the audio queued for the slowest lossless sink exceeds half of
  ``max_unplayed_ms``; a fast LLM token stream cannot grow memory without bound. When the
  text budget is full and no response is running, the speech commits (so a ``commit``-mode
  caller who never commits cannot deadlock).
* **first_commit="clause"** (``server_commit`` mode): commit as soon as the first clause is
  complete, for the lowest first audio; the server segments the rest.
* **Retry** (protocol.md §6.6): if the session is lost *before any audio reached a sink*, a
  fresh session is acquired and every text event sent so far is replayed (bounded
  attempts). After audio, speech is never repeated: :class:`~tts_stream.errors.ConnectionLost`
  with ``audio_received=True`` is raised, and everything received was delivered to the sinks.
* **Barge-in**: :meth:`Speech.interrupt` clears the server's text buffer, retires the socket
  (closes it: ``response.cancel`` is not documented, §5.4), drops late deltas, interrupts
  every sink at once and reports what was played. The next push dials a new session.
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
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

from . import protocol as p
from .audio import AudioFormat, Frame, Sink
from .connection import Audio, ResponseBegan
from .errors import (
    AuthenticationError,
    ClosedError,
    ConnectionFailed,
    ConnectionLost,
    HandshakeRejected,
    RateLimited,
    Timeout,
    TtsStreamError,
    UsageError,
    server_error,
)
from .fanout import Fanout, LaneStats, Policy
from .ledger import InterruptReport, chars_for_billable, word_cut
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
_CHARS_PER_SECOND = 15.0  # typical speaking rate, used until a response tells the real one
_CLAUSE_END = frozenset(",;:!?.\n，、；：。！？")


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

    def set(self) -> None:
        self.at = time.monotonic()
        super().set()


@dataclass
class _Segment:
    """A response's place in the utterance: its audio range and (once known) its text."""

    response_id: str
    start: int  # first sample (utterance offset)
    end: int  # one past the last sample received
    text: str | None = None  # None while running


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
    if isinstance(exc, AuthenticationError | RateLimited):
        return False  # the same request would fail again (quick-failure, peers.md §2.3)
    if isinstance(exc, HandshakeRejected):
        return exc.status >= 500
    return isinstance(exc, ConnectionFailed | Timeout)


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
        # Text bookkeeping: `_pending` is pushed text no completed response has consumed yet.
        self._spoken: list[str] = []  # text of completed responses, in order
        self._pending = ""
        self._uncommitted = 0  # chars appended since the last commit (ours or the server's)
        self._ops: list[tuple[str, str]] = []  # text events of this session, for a replay
        self._committed_first = False
        self._segments: list[_Segment] = []
        self._created_mark = 0  # len(_pending) when the running response started
        self._samples_out = 0
        self._audio_delivered = False  # audio of the current session reached the fan-out
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
            if self._on_done is not None:
                self._on_done(self._final)

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
        return len(self._pending)

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
            self._pending += text
            self._uncommitted += len(text)
            if (
                self.options.first_commit == "clause"
                and self.mode == "server_commit"
                and not self._committed_first
                and any(c in _CLAUSE_END for c in text)
            ):
                await self._send(att, "commit", "")

    async def commit(self) -> None:
        """Synthesize what was pushed so far now (both modes, protocol.md §5.6)."""
        self._check_open("commit")
        async with self._send_lock:
            self._check_open("commit")
            att = self._attempt
            if att is None or self._uncommitted == 0:
                return  # nothing buffered: an empty commit is an error on the server
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
            report = self._report(played)
            if att is not None:
                conn = att.lease.connection
                if conn.state in (p.State.READY, p.State.STREAMING):
                    # Clear the server's text buffer, then retire the socket: response.cancel
                    # is not documented (§5.4), closing is what stops synthesis for sure.
                    with contextlib.suppress(TtsStreamError, TimeoutError):
                        async with asyncio.timeout(_CLEAR_TIMEOUT_S):
                            await conn.clear()
                await att.lease.release()
            # What was not heard is gone; the next push starts afresh on a new session.
            self._pending = ""
            self._uncommitted = 0
            self._ops.clear()
            self._segments = []
            self._committed_first = False
            self._audio_delivered = False
            self._progress.set()
        return report

    # --- sending ------------------------------------------------------------------------------

    def _check_open(self, what: str) -> None:
        if self._failure is not None:
            raise self._failure
        if self.state is not SpeechState.OPEN:
            raise ClosedError(f"cannot {what} a speech in state {self.state.name}")

    async def _send(self, att: _Attempt, op: str, text: str) -> None:
        """Send one text event on the current session (the caller holds the send lock)."""
        conn = att.lease.connection
        now = time.monotonic()
        try:
            if op == "append":
                await conn.append(text)
                self._rec.text_sent(now, len(text))
            elif op == "commit":
                await conn.commit()
                self._uncommitted = 0
                self._committed_first = True
            else:
                await conn.finish()
        except (ConnectionFailed, ClosedError) as exc:
            # The socket is going away; the pump sees the close and decides (retry or fail).
            log.debug("send of %s failed: %r", op, exc)
        except UsageError:
            if conn.state not in (p.State.FAILED, p.State.CLOSED):
                raise
            # The session failed under us; the pump reports why (retry or the server error).
        if not self._audio_delivered:
            self._ops.append((op, text))  # replayable until audio reached a sink
        elif self._ops:
            self._ops.clear()

    async def _send_cut(self, att: _Attempt, text: str) -> None:
        """on_loss="resume": append ``text`` committing after each sentence (lock held)."""
        assert self._cutter is not None
        for op, piece in self._cutter.feed(text):
            if op == "append":
                await self._send(att, "append", piece)
                self._pending += piece
                self._uncommitted += len(piece)
            elif self._uncommitted > 0:
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
        if len(self._pending) >= self.options.max_pending_chars:
            return True
        audio_cap = self.fmt.samples(self.options.max_unplayed_ms) // 2
        return self._fanout.backlog_samples() > audio_cap

    async def _wait_for_room(self) -> None:
        idle_since: float | None = None
        while self._full():
            self._check_open("push")
            att = self._attempt
            text_full = len(self._pending) >= self.options.max_pending_chars
            idle = (
                att is not None and text_full and not att.lease.connection.protocol.response_active
            )
            if not idle:
                idle_since = None
            else:
                # The text budget is full but nothing is being synthesized.
                now = time.monotonic()
                idle_since = idle_since if idle_since is not None else now
                waited = now - idle_since
                if self._uncommitted > 0 and (self.mode == "commit" or waited >= _IDLE_GRACE_S):
                    # The server holds text it has not cut (commit mode: the caller never
                    # committed; server_commit: its cut rule is waiting): cut now rather
                    # than deadlock. In server_commit mode give the server a moment first.
                    assert att is not None
                    async with self._send_lock:
                        if self._attempt is att and self._uncommitted > 0:
                            await self._send(att, "commit", "")
                    idle_since = None
                elif self._uncommitted == 0 and waited >= _DRIFT_WAIT_S:
                    # The server cut all our text and is idle, yet our count says text is
                    # pending: billed characters did not match the text (§5.12 is a doc
                    # rule, not a contract). Trust the server over the count.
                    log.warning("%d pending chars were never billed: counted as spoken",
                                len(self._pending))  # fmt: skip
                    self._spoken.append(self._pending)
                    self._pending, self._created_mark = "", 0
                    continue
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
        conn = att.lease.connection
        lost: BaseException | None = None
        try:
            async for item in conn.events:  # no loop round-trip when an item is ready
                if att.retired:
                    return
                if isinstance(item, Audio):
                    await self._on_audio(att, item)
                elif isinstance(item, ResponseBegan):
                    self._on_response_started(item.response_id, item.received_at)
                elif isinstance(item, p.ResponseFinished):
                    self._on_response_finished(item)
                elif isinstance(item, p.BufferCommitted):
                    self._uncommitted = 0
                elif isinstance(item, p.ServerFailure):
                    if item.fatal:  # the session is unusable even if the socket stays open
                        lost = server_error(item.message or "server error", code=item.code)
                        break
                    else:
                        log.warning("server reported %s: %s", item.code, item.message)
                elif isinstance(item, p.SessionComplete):
                    att.complete.set()
                    self._ended.set()
                elif isinstance(item, p.SessionLost) and lost is None:
                    lost = ConnectionLost(
                        f"connection {conn.close_cause()} before the session finished",
                        code=item.code,
                        reason=item.reason,
                        audio_received=self._audio_delivered,
                    )
                self._progress.set()
            if att.retired or att.complete.is_set():
                return
            if lost is None:
                lost = ConnectionLost(
                    f"connection {conn.close_cause()} before the session finished",
                    code=conn.close_code,
                    reason=conn.close_reason,
                    audio_received=self._audio_delivered,
                )
            await self._after_loss(att, lost)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("speech pump failed")
            self._fail(exc)
        finally:
            _stop_watch(att)
            self._progress.set()
            self._ended.set()

    async def _on_audio(self, att: _Attempt, item: Audio) -> None:
        assert self._fanout is not None
        frame = item.frame
        self._rec.delta(frame.received_at, frame.samples, server_sent_at=item.server_sent_at)
        n = len(frame)
        if not self._segments or self._segments[-1].response_id != frame.response_id:
            self._on_response_started(frame.response_id, frame.received_at)
        self._segments[-1].end += n
        out = Frame(frame.samples, self._samples_out, frame.response_id, frame.received_at)
        self._samples_out += n
        self._audio_delivered = True
        att.last_activity = frame.received_at
        if self._ops:
            self._ops.clear()  # never replayed now: speech must not repeat
        await self._fanout.write(out)
        att.lease.first_audio()  # the pool starts the refill now (idempotent, O(1))

    def _on_response_started(self, rid: str, at: float) -> None:
        if self._segments and self._segments[-1].response_id == rid:
            return
        self._rec.response_created(at)
        self._segments.append(_Segment(rid, self._samples_out, self._samples_out))
        self._created_mark = len(self._pending)
        if len(self._segments) > 64:  # only recent segments matter for a barge-in report
            del self._segments[:-64]

    def _on_response_finished(self, note: p.ResponseFinished) -> None:
        self._rec.response_done(note.characters)
        if note.characters is not None:
            n = chars_for_billable(self._pending, note.characters)
        else:
            n = self._created_mark
        text, self._pending = self._pending[:n], self._pending[n:]
        self._created_mark = 0
        self._spoken.append(text)
        for seg in reversed(self._segments):
            if seg.response_id == note.response_id:
                seg.text = text
                break

    async def _after_loss(self, att: _Attempt, lost: BaseException) -> None:
        """The session ended early: retry transparently before audio, else fail (or resume)."""
        if self._audio_delivered and self._cutter is not None and _retryable(lost):
            await self._resume(att, lost)
            return
        if self._audio_delivered or not _retryable(lost) or self._attempts_left <= 0:
            if isinstance(lost, ConnectionLost):
                lost.audio_received = self._audio_delivered
            self._fail(lost)
            return
        self._attempts_left -= 1
        log.info("session lost before any audio (%s): retrying on a fresh session", lost)
        async with self._send_lock:
            if not await self._take_over(att):
                return
            self._rec.forget_audio()
            self._segments = []
            self._pending = "".join(t for op, t in self._ops if op == "append")
            ops, self._ops = list(self._ops), []
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
            running = self._segments[-1] if self._segments else None
            heard = running is not None and running.text is None and running.end > running.start
            skip = resume_point(self._pending, running_heard=heard)
            cut, rest = self._pending[:skip], self._pending[skip:]
            if running is not None and running.text is None:
                running.text = cut  # consumed by the lost response (its rest is never said)
            self._spoken.append(cut)
            self._pending, self._created_mark, self._uncommitted = "", 0, 0
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
            event = Resumed(
                attempt=len(self._resumed) + 1,
                code=getattr(lost, "code", None),
                reason=str(lost),
                audio_ms=self.fmt.ms(self._samples_out),
                cut_text=cut,
                resumed_text=rest,
            )  # fmt: skip
            self._resumed.append(event)
            self._rec.resumes += 1
            self._rec.lost_chars += len(cut) if heard else 0
            log.warning("connection lost after %.0f ms of audio: resumed at a sentence "
                        "boundary (%d chars cut)", event.audio_ms, len(cut))  # fmt: skip
            self._cutter = SentenceCutter()
            await self._send_cut(self._attempt, rest)
            if finishing:
                await self._send(self._attempt, "finish", "")
        if opts.on_resume is not None:
            try:
                opts.on_resume(event)
            except Exception:
                log.exception("on_resume callback failed")

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

    def _report(self, played: Mapping[str, int]) -> InterruptReport:
        heard = max(played.values(), default=0)
        spoken: list[str] = []
        unspoken: list[str] = []
        # Completed responses older than the segments kept are long played: all spoken.
        kept_done = sum(1 for seg in self._segments if seg.text is not None)
        spoken.extend(self._spoken[: max(len(self._spoken) - kept_done, 0)])
        # Speaking rate, to place the cut inside the running response (whose text the server
        # never tells): learned from this speech's completed responses, else ~15 chars/s.
        done = [seg for seg in self._segments if seg.text is not None and seg.end > seg.start]
        done_chars = sum(len(seg.text or "") for seg in done)
        done_s = sum(seg.end - seg.start for seg in done) / self.fmt.sample_rate
        cps = done_chars / done_s if done_chars and done_s else _CHARS_PER_SECOND
        running = self._pending[: self._created_mark]
        cut_short = 0
        for seg in self._segments:
            if seg.text is not None:
                text = seg.text
                if seg.end <= heard:
                    spoken.append(text)
                    continue
                frac = (heard - seg.start) / max(seg.end - seg.start, 1)
                n = int(len(text) * min(max(frac, 0.0), 1.0))
            else:
                text = running
                n = int(max(heard - seg.start, 0) / self.fmt.sample_rate * cps)
            cut = word_cut(text, min(n, len(text)))
            spoken.append(text[:cut])
            unspoken.append(text[cut:])
            cut_short += 1
        running_open = bool(self._segments) and self._segments[-1].text is None
        unspoken.append(self._pending[len(running) if running_open else 0 :])
        return InterruptReport(
            played_ms={name: self.fmt.ms(n) for name, n in played.items()},
            spoken_text="".join(spoken),
            unspoken_text="".join(unspoken),
            dropped_responses=cut_short,
        )
