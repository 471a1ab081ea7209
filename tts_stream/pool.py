"""Warm spare realtime sessions, keyed by (model, voice, format, rate, mode, options).

Role: a realtime session is single-use (the server closes the socket at ``session.finished``),
so "pooling" means keeping *spares* ready ahead of need (research/peers.md §4.1): each spare
is connected, has seen ``session.created``, sent ``session.update`` and received
``session.updated``, so the first text is the only thing left on the critical path.

* Every checkout *owes* a refill. The refill dial starts when the lease that took the spare
  has its first audio (:meth:`Lease.first_audio`, which the speech calls), when it is
  released, or :data:`REFILL_BOUND_S` after the checkout, whichever comes first: it never
  competes with that first audio (bench/README.md, Concurrency, hot spot E), and the next
  turn finds the spare ready one dial time after the previous turn's first audio.
* An acquire that finds no ready spare waits for a dial already in flight (a refill) rather
  than starting another; it dials only when the dials in flight do not cover the waiters.
* ``size`` spares per key that has been used or prewarmed, or ``size="auto"``: the recent
  peak of leases in use at once for the key (the highest count over the last one to two
  :data:`AUTO_WINDOW_S` windows), between 1 and ``auto_max``, so N callers speaking at once
  each find a spare. A target that fell is reached by letting spares age out, not by
  closing them early.
* Dials run in parallel, capped by ``dial_concurrency``, with no global lock held while
  dialling.
* A spare is replaced before ``max_idle_s`` (the service closes idle sessions; the limit is
  undocumented, §5.10) and gracefully (``session.finish``), so no session shows as failed.
* A spare the server closed while idle is discarded at once (the reader sees the close) and
  redialled; ``acquire`` never hands out a closed spare. A spare that fails on its very
  first send is the speech's business: it retries before any audio (speech.py).
* Every connection lives in one *keeper* task, inside the TaskGroup owned by the pool's
  async context manager: the keeper enters the connection's context manager, parks it as a
  spare or hands it to a waiting acquirer, and leaves the context (closing it) when the
  lease is released, the spare ages out, or the pool closes.
* Each acquire records :class:`~tts_stream.metrics.AcquireInfo` (``acquire_ms``,
  ``was_warm``, ``spare_age_s``); :class:`PoolStats` counts warm and cold acquires and,
  per cold one, why (:data:`COLD_REASONS`).

Boundary: knows :class:`~tts_stream.connection.Connection` and nothing about text or sinks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from ._resource import StackResource
from .config import Endpoint
from .connection import Connection
from .errors import ClosedError, ConnectionFailed, Timeout, UsageError
from .metrics import AcquireInfo

__all__ = ["COLD_REASONS", "Lease", "Pool", "PoolKey", "PoolStats"]

log = logging.getLogger(__name__)

#: Longest wait, after a checkout, before the spare's refill starts when the lease has not
#: reported its first audio (a speech that holds a session without text, a lost session).
REFILL_BOUND_S = 0.25

#: ``size="auto"``: the peak of leases in use at once is kept per window of this many
#: seconds; the target is the highest of the current and the previous window.
AUTO_WINDOW_S = 30.0

#: Why a cold acquire was cold (the keys of :attr:`PoolStats.cold_reasons`):
#: ``first_use`` the key had no target yet (never used or prewarmed); ``no_spares_kept``
#: the pool keeps none (``size=0``); ``spare_closed`` the spares there were had been closed
#: by the server; ``refill_in_flight`` the refill was still dialling (the acquire waited for
#: it instead of dialling another); ``dial_failed`` the last spare dial of the key failed;
#: ``busy`` every spare was in use (more callers at once than spares).
COLD_REASONS = (
    "first_use", "no_spares_kept", "spare_closed", "refill_in_flight", "dial_failed", "busy",
)  # fmt: skip

# A spare the server closes sooner than this after it was ready is redialled with backoff.
_SHORT_LIFE_S = 1.0
_BACKOFF_MIN_S = 0.1
_BACKOFF_MAX_S = 5.0


@dataclass(frozen=True)
class PoolKey:
    """What makes two sessions interchangeable: their URL model and their configuration."""

    model: str
    voice: str
    response_format: str = "pcm"
    sample_rate: int = 24000
    mode: str = "server_commit"
    options: tuple[tuple[str, Any], ...] = ()  # other session.update keys, sorted

    @classmethod
    def make(
        cls,
        *,
        model: str,
        voice: str,
        response_format: str = "pcm",
        sample_rate: int = 24000,
        mode: str = "server_commit",
        **options: Any,
    ) -> PoolKey:
        return cls(model, voice, response_format, sample_rate, mode, tuple(sorted(options.items())))

    def session(self) -> dict[str, Any]:
        """The ``session`` object of ``session.update`` (§5.4)."""
        return {
            "voice": self.voice,
            "mode": self.mode,
            "response_format": self.response_format,
            "sample_rate": self.sample_rate,
            **dict(self.options),
        }


@dataclass(frozen=True)
class PoolStats:
    """Counters of the pool since it opened, plus the state now per key."""

    dials: int = 0
    dial_failures: int = 0
    warm_acquires: int = 0
    cold_acquires: int = 0
    discarded_closed: int = 0
    replaced_aged: int = 0
    finished_gracefully: int = 0
    peak_parallel_dials: int = 0
    dials_in_flight: int = 0  # dials connecting now
    spares: Mapping[PoolKey, int] = field(default_factory=dict)
    #: cold acquires by reason (:data:`COLD_REASONS`); they add up to ``cold_acquires``
    cold_reasons: Mapping[str, int] = field(default_factory=dict)
    targets: Mapping[PoolKey, int] = field(default_factory=dict)  # spares wanted per key now
    leases: Mapping[PoolKey, int] = field(default_factory=dict)  # held or being acquired, per key
    refills_owed: int = 0  # checkouts whose refill waits for their first audio


class _Peak:
    """The most leases of one key in use at once over the last one to two windows.

    Pure: time is an argument. Two buckets (the current window and the previous one) are
    enough for "recent": a burst is remembered for at least one window, at most two.
    """

    __slots__ = ("now", "current", "previous", "started")

    def __init__(self) -> None:
        self.now = 0
        self.current = 0
        self.previous = 0
        self.started = 0.0

    def change(self, delta: int, at: float) -> None:
        self._roll(at)
        self.now += delta
        self.current = max(self.current, self.now)

    def peak(self, at: float) -> int:
        self._roll(at)
        return max(self.current, self.previous, self.now)

    def _roll(self, at: float) -> None:
        elapsed = at - self.started
        if elapsed < AUTO_WINDOW_S:
            return
        self.previous = self.current if elapsed < 2 * AUTO_WINDOW_S else self.now
        self.current = self.now
        self.started = at


class _Slot:
    """One connection's place in the pool, shared by its keeper task and its lease."""

    def __init__(self, key: PoolKey) -> None:
        self.key = key
        self.conn: Connection | None = None
        self.ready_at = 0.0
        self.checked_out = False
        self.released = False
        self.owes_refill = False  # checked out, the refill not started yet
        self.returned = False  # the lease was released (counted once)
        self.refill_timer: asyncio.TimerHandle | None = None
        self.wake = asyncio.Event()


class Lease:
    """A checked-out connection. ``release()`` (or leaving ``async with``) closes it."""

    def __init__(self, pool: Pool, slot: _Slot, info: AcquireInfo) -> None:
        assert slot.conn is not None
        self._pool = pool
        self._slot = slot
        self.connection: Connection = slot.conn
        self.info = info

    def first_audio(self) -> None:
        """Tell the pool this session delivered its first audio: the refill starts now.

        Cheap and idempotent (the speech may call it for every delta); before it, the
        refill waits (at most :data:`REFILL_BOUND_S`) so it never competes with the first
        audio.
        """
        if self._slot.owes_refill:
            self._pool._settle(self._slot)

    async def release(self) -> None:
        """Close the connection (it is single-use) and let its keeper task end. Idempotent."""
        if self._slot.released:
            return
        self._pool._returned(self._slot)
        await self.connection.aclose()
        self._slot.released = True
        self._slot.wake.set()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()


class Pool(StackResource):
    """Warm spares of realtime sessions. ``async with Pool(endpoint) as pool: ...``.

    ``size``: spares kept per key once the key was used (``prewarm`` can raise it per key),
    or ``"auto"``: the key's recent peak of leases in use at once, between 1 and
    ``auto_max``. ``max_idle_s``: a spare older than this is replaced. ``connect`` options
    are passed to each :class:`~tts_stream.connection.Connection`. ``aclose()`` finishes
    every spare gracefully and closes checked-out connections.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        size: int | Literal["auto"] = 1,
        max_idle_s: float = 45.0,
        dial_concurrency: int = 4,
        finish_timeout: float = 2.0,
        auto_max: int = 32,
        **connect: Any,
    ) -> None:
        auto = size == "auto"
        if not auto and not (isinstance(size, int) and size >= 0):
            raise UsageError(f"size must be an int >= 0 or 'auto', got {size!r}")
        if dial_concurrency < 1 or max_idle_s <= 0 or auto_max < 1:
            raise UsageError("need dial_concurrency >= 1, max_idle_s > 0 and auto_max >= 1")
        self.endpoint = endpoint
        self.size: int | Literal["auto"] = size
        self.auto_max = auto_max
        self.max_idle_s = max_idle_s
        self._auto = auto
        self._floor = 1 if auto else int(size)  # spares once a key is used
        self._connect = connect
        self._finish_timeout = finish_timeout
        self._dial_sem = asyncio.Semaphore(dial_concurrency)
        self._spares: dict[PoolKey, deque[_Slot]] = {}
        self._target: dict[PoolKey, int] = {}  # the floor: size once used, or prewarm's n
        self._peaks: dict[PoolKey, _Peak] = {}
        self._dialing: dict[PoolKey, int] = {}
        self._owed: dict[PoolKey, int] = {}
        self._waiters: dict[PoolKey, deque[asyncio.Future[_Slot]]] = {}
        self._slots: set[_Slot] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._closing = False
        self._changed = asyncio.Event()  # a dial finished (spare ready or failed)
        self._counts = {
            "dials": 0, "dial_failures": 0, "warm_acquires": 0, "cold_acquires": 0,
            "discarded_closed": 0, "replaced_aged": 0, "finished_gracefully": 0,
            "peak_parallel_dials": 0,
        }  # fmt: skip
        self._cold_reasons: dict[str, int] = {}
        self._in_flight = 0
        self._backoff: dict[PoolKey, float] = {}
        self._dial_errors: dict[PoolKey, Exception] = {}  # the last failed spare dial
        self._last_failed: set[PoolKey] = set()  # keys whose latest dial failed
        open_t = float(connect.get("open_timeout", 10.0))
        conf_t = float(connect.get("configure_timeout", 10.0))
        self._dial_timeout = open_t + conf_t + 5.0

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Pool:
        if self._stack is not None:
            raise ClosedError("a Pool is single-use")
        stack = self._stack = contextlib.AsyncExitStack()
        self._tg = await stack.enter_async_context(asyncio.TaskGroup())
        stack.push_async_callback(self._shutdown)
        return self

    async def _shutdown(self) -> None:
        self._closing = True
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(ClosedError("the pool closed"))
        for slot in list(self._slots):
            if slot.refill_timer is not None:
                slot.refill_timer.cancel()
            slot.wake.set()

    # --- public API ---------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        now = time.monotonic()
        keys = set(self._spares) | set(self._target)
        return PoolStats(
            **self._counts,
            dials_in_flight=self._in_flight,
            spares={k: self.spares(k) for k in self._spares},
            cold_reasons=dict(self._cold_reasons),
            targets={k: self._goal(k, now) for k in keys},
            leases={k: peak.now for k, peak in self._peaks.items() if peak.now},
            refills_owed=sum(self._owed.values()),
        )

    async def wait_until(
        self, predicate: Callable[[PoolStats], bool], *, within: float = 10.0
    ) -> PoolStats:
        """Wait (at most ``within`` s) until ``predicate(stats())`` holds; return the stats.

        Re-evaluated whenever a dial ends or a spare is discarded or finished: for
        monitoring and tests, without polling.
        """
        try:
            async with asyncio.timeout(within):
                while not predicate(stats := self.stats()):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError as exc:
            raise Timeout("the pool to reach the expected state", within) from exc
        return stats

    def spares(self, key: PoolKey) -> int:
        """Spares of ``key`` ready right now."""
        return sum(1 for s in self._spares.get(key, ()) if s.conn and s.conn.is_usable)

    async def prewarm(
        self, key: PoolKey, n: int, *, wait: bool = True, allow_partial: bool = False
    ) -> int:
        """Keep at least ``n`` spares of ``key``; with ``wait`` return once they are ready.

        Returns the spares of ``key`` ready then. Each dial has its own bound (the
        connection's ``open_timeout`` + ``configure_timeout``, counted from when it holds a
        dial slot, ``dial_concurrency``), so ``n`` dials take as long as they need in
        ``ceil(n / dial_concurrency)`` rounds and a slow one fails alone. With ``wait``,
        once every dial has ended and fewer than ``n`` spares are ready, the spares that
        connected stay in the pool and the error of a failed dial is raised
        (:class:`~tts_stream.errors.ConnectionFailed` for a refused connection,
        :class:`~tts_stream.errors.Timeout` for a server that never answers, a
        :class:`~tts_stream.errors.ServerError` for a refused key or configuration), with
        a note saying how many of the ``n`` are ready; ``allow_partial=True`` returns that
        count instead (and logs the error once).
        """
        self._check_open()
        self._dial_errors.pop(key, None)
        self._target[key] = max(self._target.get(key, 0), n)
        self._ensure(key)
        if not wait:
            return self.spares(key)
        # No bound of its own: every dial in flight is bounded (_dial), and one that fails
        # starts no other, so this ends when the last dial of the key has ended.
        while self.spares(key) < n and self._dialing.get(key):
            self._changed.clear()
            await self._changed.wait()
        ready = self.spares(key)
        if ready >= n:
            return ready
        err = self._dial_errors.pop(key, None)
        if err is None:
            err = ConnectionFailed(f"only {ready} of {n} warm spares connected")
        if allow_partial:
            log.warning("prewarm: %d of %d warm spares for %s ready (%s)", ready, n,
                        key.voice, err)  # fmt: skip
            return ready
        err.add_note(f"prewarm: {ready} of {n} warm spares ready (they stay in the pool)")
        raise err

    async def acquire(self, key: PoolKey) -> Lease:
        """A configured connection for ``key``: a warm spare if one is ready, else the next
        dial that completes (a refill in flight, or a dial started now)."""
        self._check_open()
        t0 = time.monotonic()
        first_use = key not in self._target
        self._target[key] = max(self._target.get(key, 0), self._floor)
        self._peaks.setdefault(key, _Peak()).change(+1, t0)
        self._owed[key] = self._owed.get(key, 0) + 1
        try:
            slot, closed_seen = self._take_spare(key)
            if slot is not None:
                self._counts["warm_acquires"] += 1
                now = time.monotonic()
                return self._lease(
                    slot, AcquireInfo((now - t0) * 1000.0, True, now - slot.ready_at)
                )
            reason = self._cold_reason(key, first_use=first_use, closed_seen=closed_seen)
            slot = await self._next_dial(key)
        except BaseException:
            self._peaks[key].change(-1, time.monotonic())
            self._owed[key] -= 1
            self._ensure(key)
            raise
        self._counts["cold_acquires"] += 1
        self._cold_reasons[reason] = self._cold_reasons.get(reason, 0) + 1
        return self._lease(slot, AcquireInfo((time.monotonic() - t0) * 1000.0, False, None))

    # --- checkout and refill ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._tg is None or self._closing:
            raise ClosedError("pool is not open")

    def _take_spare(self, key: PoolKey) -> tuple[_Slot | None, bool]:
        """Pop the oldest usable spare (and whether closed ones were passed over)."""
        queue = self._spares.get(key)
        closed_seen = False
        while queue:
            slot = queue.popleft()
            if slot.conn is not None and slot.conn.is_usable:
                slot.checked_out = True
                slot.wake.set()
                return slot, closed_seen
            closed_seen = True
            slot.wake.set()  # closed while idle: its keeper discards it
        return None, closed_seen

    def _cold_reason(self, key: PoolKey, *, first_use: bool, closed_seen: bool) -> str:
        if self._goal(key, time.monotonic()) == 0:
            return "no_spares_kept"
        if first_use:
            return "first_use"
        if closed_seen:
            return "spare_closed"
        if self._dialing.get(key, 0) > self._live_waiters(key):
            return "refill_in_flight"
        if key in self._last_failed:
            return "dial_failed"
        return "busy"

    async def _next_dial(self, key: PoolKey) -> _Slot:
        """Wait for the next spare dial of ``key`` to complete; start one if none covers us."""
        waiter: asyncio.Future[_Slot] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(key, deque())
        waiters.append(waiter)
        self._ensure(key)
        try:
            async with asyncio.timeout(self._dial_timeout):
                return await waiter
        except TimeoutError as exc:
            _abandon(waiter)
            raise Timeout("a realtime session", self._dial_timeout) from exc
        except BaseException:
            _abandon(waiter)
            raise
        finally:
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)

    def _lease(self, slot: _Slot, info: AcquireInfo) -> Lease:
        slot.owes_refill = True
        slot.refill_timer = asyncio.get_running_loop().call_later(
            REFILL_BOUND_S, self._settle, slot
        )
        return Lease(self, slot, info)

    def _settle(self, slot: _Slot) -> None:
        """The checkout of ``slot`` no longer holds its refill back: dial it now."""
        if not slot.owes_refill:
            return
        slot.owes_refill = False
        if slot.refill_timer is not None:
            slot.refill_timer.cancel()
            slot.refill_timer = None
        self._owed[slot.key] -= 1
        self._ensure(slot.key)

    def _returned(self, slot: _Slot) -> None:
        """A lease was released: its refill (if still owed) starts now."""
        if slot.returned:
            return
        slot.returned = True
        self._peaks[slot.key].change(-1, time.monotonic())
        self._settle(slot)

    def _goal(self, key: PoolKey, now: float) -> int:
        """Spares wanted for ``key``: the floor, or with ``size="auto"`` the recent peak."""
        floor = self._target.get(key, 0)
        if not self._auto or key not in self._peaks:
            return floor
        return max(floor, min(self._peaks[key].peak(now), self.auto_max))

    def _live_waiters(self, key: PoolKey) -> int:
        return sum(1 for w in self._waiters.get(key, ()) if not w.done())

    def _ensure(self, key: PoolKey) -> None:
        """Start dials so that spares + dials in flight cover the waiting acquirers plus
        the key's target, less the refills still held back for a first audio."""
        if self._closing or self._tg is None:
            return
        wanted = max(0, self._goal(key, time.monotonic()) - self._owed.get(key, 0))
        # Every queued spare counts, usable or not: one the server closed is discarded by its
        # keeper, which then calls this again (so no refill is lost), and counting the queue
        # is O(1) where ``spares()`` tests every slot (O(n) per acquire: ~1M tests for 1000
        # streams starting within a second).
        have = len(self._spares.get(key, ())) + self._dialing.get(key, 0)
        for _ in range(self._live_waiters(key) + wanted - have):
            self._dialing[key] = self._dialing.get(key, 0) + 1
            self._tg.create_task(self._keeper(key), name="tts-stream-pool-spare")

    # --- one connection's life ----------------------------------------------------------------

    async def _keeper(self, key: PoolKey) -> None:
        """Own one connection from dial to close. Never raises (it lives in the pool's group)."""
        slot = _Slot(key)
        self._slots.add(slot)
        try:
            async with contextlib.AsyncExitStack() as stack:
                conn = await self._dial(slot, stack)
                if conn is not None:
                    self._place(slot, conn)
                    await self._hold(slot, conn)
        except Exception:
            log.exception("pool keeper failed")
        finally:
            self._slots.discard(slot)
            queue = self._spares.get(key)
            if queue and slot in queue:
                queue.remove(slot)

    async def _dial(self, slot: _Slot, stack: contextlib.AsyncExitStack) -> Connection | None:
        """Connect and configure; on failure count it, tell a waiter (or log) and return None."""
        key = slot.key
        conn = Connection(self.endpoint, model=key.model, session=key.session(), **self._connect)
        conn.on_closed = slot.wake.set
        try:
            async with self._dial_sem:
                self._counts["dials"] += 1
                self._in_flight += 1
                peak = max(self._counts["peak_parallel_dials"], self._in_flight)
                self._counts["peak_parallel_dials"] = peak
                try:
                    # This dial's own bound, from when it holds a slot (Connection bounds
                    # each step already; this one is the guard for the sum).
                    async with asyncio.timeout(self._dial_timeout) as bound:
                        await stack.enter_async_context(conn)
                except TimeoutError as exc:
                    if not bound.expired():
                        raise  # the connection's own Timeout (a TimeoutError too)
                    raise Timeout("a realtime session to connect", self._dial_timeout) from exc
                finally:
                    self._in_flight -= 1
        except Exception as exc:
            self._counts["dial_failures"] += 1
            self._dial_failed(key, exc)
            return None
        finally:
            self._dialing[key] -= 1
        self._last_failed.discard(key)
        return conn

    def _dial_failed(self, key: PoolKey, exc: Exception) -> None:
        self._last_failed.add(key)
        waiter = self._pop_waiter(key)
        if waiter is not None:
            waiter.set_exception(exc)
        else:
            self._dial_errors[key] = exc
            log.warning("dialling a spare for %s failed: %s", key.voice, exc)
        self._changed.set()

    def _pop_waiter(self, key: PoolKey) -> asyncio.Future[_Slot] | None:
        waiters = self._waiters.get(key)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                return waiter
        return None

    def _place(self, slot: _Slot, conn: Connection) -> None:
        """A ready connection goes to the oldest waiting acquirer, else into the spares."""
        slot.conn = conn
        slot.ready_at = time.monotonic()
        waiter = self._pop_waiter(slot.key)
        if waiter is not None:
            slot.checked_out = True
            waiter.set_result(slot)
        else:
            self._spares.setdefault(slot.key, deque()).append(slot)
        self._changed.set()

    async def _hold(self, slot: _Slot, conn: Connection) -> None:
        # Idle phase: wait for a checkout, a server close, the age limit or pool shutdown.
        while not slot.checked_out:
            slot.wake.clear()
            if self._closing:
                await self._finish(conn)
                return
            if conn.closed or not conn.is_usable:
                self._counts["discarded_closed"] += 1
                log.info("spare for %s closed by the server (code %s): redialling",
                         slot.key.voice, conn.close_code)  # fmt: skip
                lived = time.monotonic() - slot.ready_at
                self._discard(slot, refill=False)
                await self._refill_after_close(slot.key, lived)
                return
            remaining = self.max_idle_s - (time.monotonic() - slot.ready_at)
            if remaining <= 0:
                self._counts["replaced_aged"] += 1
                self._discard(slot)
                await self._finish(conn)
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await slot.wake.wait()
        # Checked out: the lease owns the session; keep the context open until released.
        while not slot.released and not self._closing:
            slot.wake.clear()
            await slot.wake.wait()

    def _discard(self, slot: _Slot, *, refill: bool = True) -> None:
        queue = self._spares.get(slot.key)
        if queue and slot in queue:
            queue.remove(slot)
        if refill:
            self._ensure(slot.key)
        self._changed.set()

    async def _refill_after_close(self, key: PoolKey, lived: float) -> None:
        """Redial a spare the server closed; back off if spares die young (no dial storm)."""
        if lived < _SHORT_LIFE_S:
            delay = self._backoff.get(key, _BACKOFF_MIN_S)
            self._backoff[key] = min(delay * 2, _BACKOFF_MAX_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    while not self._closing:  # wake early only to stop
                        self._changed.clear()
                        await self._changed.wait()
        else:
            self._backoff.pop(key, None)
        self._ensure(key)

    async def _finish(self, conn: Connection) -> None:
        """Graceful end of an unused spare: ``session.finish``, then wait for the close."""
        if conn.closed:
            return
        try:
            await conn.finish()
            async with asyncio.timeout(self._finish_timeout):
                await conn.wait_closed()
            if conn.protocol.complete:
                self._counts["finished_gracefully"] += 1
        except Exception as exc:  # the close below happens anyway
            log.debug("graceful finish of a spare failed: %r", exc)
        finally:
            self._changed.set()


def _abandon(waiter: asyncio.Future[_Slot]) -> None:
    """An acquire gave up: a slot handed to it in the same instant is released, not leaked."""
    if not waiter.done():
        waiter.cancel()
    elif not waiter.cancelled() and waiter.exception() is None:
        slot = waiter.result()
        slot.released = True
        slot.wake.set()
