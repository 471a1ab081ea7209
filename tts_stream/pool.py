"""Warm spare realtime sessions, keyed by (model, voice, format, rate, mode, options).

Role: a realtime session is single-use (the server closes the socket at ``session.finished``),
so "pooling" means keeping *spares* ready ahead of need (research/peers.md §4.1): each spare
is connected, has seen ``session.created``, sent ``session.update`` and received
``session.updated``, so the first text is the only thing left on the critical path.

* After every checkout the pool refills in the background (target: ``size`` spares per key
  that has been used or prewarmed); dials run in parallel, capped by ``dial_concurrency``,
  with no global lock held while dialling.
* A spare is replaced before ``max_idle_s`` (the service closes idle sessions; the limit is
  undocumented, §5.10) and gracefully (``session.finish``), so no session shows as failed.
* A spare the server closed while idle is discarded at once (the reader sees the close) and
  redialled; ``acquire`` never hands out a closed spare. A spare that fails on its very
  first send is the speech's business: it retries before any audio (speech.py).
* Every connection lives in one *keeper* task, inside the TaskGroup owned by the pool's
  async context manager: the keeper enters the connection's context manager, parks it as a
  spare or hands it to an acquirer, and leaves the context (closing it) when the lease is
  released, the spare ages out, or the pool closes.
* Each acquire records :class:`~tts_stream.metrics.AcquireInfo` (``acquire_ms``,
  ``was_warm``, ``spare_age_s``).

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
from typing import Any

from ._resource import StackResource
from .config import Endpoint
from .connection import Connection
from .errors import ClosedError, ConnectionFailed, Timeout, UsageError
from .metrics import AcquireInfo

__all__ = ["Lease", "Pool", "PoolKey", "PoolStats"]

log = logging.getLogger(__name__)

#: Seconds between handing out a spare and dialling its replacement.
REFILL_DELAY_S = 0.25

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
    """Counters of the pool since it opened, plus the spares ready now per key."""

    dials: int = 0
    dial_failures: int = 0
    warm_acquires: int = 0
    cold_acquires: int = 0
    discarded_closed: int = 0
    replaced_aged: int = 0
    finished_gracefully: int = 0
    peak_parallel_dials: int = 0
    spares: Mapping[PoolKey, int] = field(default_factory=dict)


class _Slot:
    """One connection's place in the pool, shared by its keeper task and its lease."""

    def __init__(self, key: PoolKey) -> None:
        self.key = key
        self.conn: Connection | None = None
        self.ready_at = 0.0
        self.checked_out = False
        self.released = False
        self.wake = asyncio.Event()


class Lease:
    """A checked-out connection. ``release()`` (or leaving ``async with``) closes it."""

    def __init__(self, slot: _Slot, info: AcquireInfo) -> None:
        assert slot.conn is not None
        self._slot = slot
        self.connection: Connection = slot.conn
        self.info = info

    async def release(self) -> None:
        """Close the connection (it is single-use) and let its keeper task end. Idempotent."""
        if self._slot.released:
            return
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

    ``size``: spares kept per key once the key was used (``prewarm`` can raise it per key).
    ``max_idle_s``: a spare older than this is replaced. ``connect`` options are passed to
    each :class:`~tts_stream.connection.Connection`. ``aclose()`` finishes every spare
    gracefully and closes checked-out connections.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        size: int = 1,
        max_idle_s: float = 45.0,
        dial_concurrency: int = 4,
        finish_timeout: float = 2.0,
        **connect: Any,
    ) -> None:
        if size < 0 or dial_concurrency < 1 or max_idle_s <= 0:
            raise UsageError("need size >= 0, dial_concurrency >= 1 and max_idle_s > 0")
        self.endpoint = endpoint
        self.size = size
        self.max_idle_s = max_idle_s
        self._connect = connect
        self._finish_timeout = finish_timeout
        self._dial_sem = asyncio.Semaphore(dial_concurrency)
        self._spares: dict[PoolKey, deque[_Slot]] = {}
        self._target: dict[PoolKey, int] = {}
        self._dialing: dict[PoolKey, int] = {}
        self._slots: set[_Slot] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._closing = False
        self._refills: dict[PoolKey, asyncio.TimerHandle] = {}
        self._changed = asyncio.Event()  # a dial finished (spare ready or failed)
        self._counts = {
            "dials": 0, "dial_failures": 0, "warm_acquires": 0, "cold_acquires": 0,
            "discarded_closed": 0, "replaced_aged": 0, "finished_gracefully": 0,
            "peak_parallel_dials": 0,
        }  # fmt: skip
        self._in_flight = 0
        self._backoff: dict[PoolKey, float] = {}
        self._dial_errors: dict[PoolKey, Exception] = {}  # the last failed spare dial
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
        for handle in self._refills.values():
            handle.cancel()
        self._refills.clear()
        for slot in list(self._slots):
            slot.wake.set()

    # --- public API ---------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        return PoolStats(**self._counts, spares={k: self.spares(k) for k in self._spares})

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

    async def prewarm(self, key: PoolKey, n: int, *, wait: bool = True) -> None:
        """Keep at least ``n`` spares of ``key``; with ``wait`` return once they are ready.

        With ``wait``, raises the error of a failed dial when fewer than ``n`` spares could
        be made (:class:`~tts_stream.errors.ConnectionFailed` for a refused connection,
        :class:`~tts_stream.errors.Timeout` for a server that never answers, a
        :class:`~tts_stream.errors.ServerError` for a refused key or configuration); the
        spares that did connect stay in the pool.
        """
        self._check_open()
        self._dial_errors.pop(key, None)
        self._target[key] = max(self._target.get(key, 0), n)
        self._ensure(key)
        if not wait:
            return
        try:
            async with asyncio.timeout(self._dial_timeout):
                while self.spares(key) < n:
                    if not self._dialing.get(key):
                        break  # every dial finished and some failed: do not wait forever
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError as exc:
            raise Timeout(f"{n} warm spares", self._dial_timeout) from exc
        if self.spares(key) < n:
            err = self._dial_errors.pop(key, None)
            if err is not None:
                raise err
            raise ConnectionFailed(f"only {self.spares(key)} of {n} warm spares connected")

    async def acquire(self, key: PoolKey) -> Lease:
        """A configured connection for ``key``: a warm spare if one is ready, else dial now."""
        self._check_open()
        t0 = time.monotonic()
        self._target[key] = max(self._target.get(key, 0), self.size)
        queue = self._spares.get(key)
        while queue:
            slot = queue.popleft()
            if slot.conn is not None and slot.conn.is_usable:
                slot.checked_out = True
                slot.wake.set()
                self._refill_later(key)
                now = time.monotonic()
                self._counts["warm_acquires"] += 1
                return Lease(slot, AcquireInfo((now - t0) * 1000.0, True, now - slot.ready_at))
            slot.wake.set()  # closed while idle: its keeper discards it
        assert self._tg is not None
        waiter: asyncio.Future[_Slot] = asyncio.get_running_loop().create_future()
        self._tg.create_task(self._keeper(key, waiter), name="tts-stream-pool-dial")
        self._ensure(key)
        try:
            async with asyncio.timeout(self._dial_timeout):
                slot = await waiter
        except TimeoutError as exc:
            raise Timeout("a realtime session", self._dial_timeout) from exc
        self._counts["cold_acquires"] += 1
        return Lease(slot, AcquireInfo((time.monotonic() - t0) * 1000.0, False, None))

    # --- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._tg is None or self._closing:
            raise ClosedError("pool is not open")

    def _refill_later(self, key: PoolKey) -> None:
        """Replace a spare just handed out, but not while its lease waits for first audio.

        A dial right away competes with that lease for this loop and for the server
        (bench/README.md, Concurrency, hot spot E: it doubled the engine's added latency).
        """

        def fire() -> None:
            self._refills.pop(key, None)
            self._ensure(key)

        if key not in self._refills:
            self._refills[key] = asyncio.get_running_loop().call_later(REFILL_DELAY_S, fire)

    def _ensure(self, key: PoolKey) -> None:
        """Start dials so that spares + dials in flight reach the key's target."""
        if self._closing or self._tg is None:
            return
        have = self.spares(key) + self._dialing.get(key, 0)
        for _ in range(self._target.get(key, 0) - have):
            self._dialing[key] = self._dialing.get(key, 0) + 1
            self._tg.create_task(self._keeper(key, None), name="tts-stream-pool-spare")

    async def _keeper(self, key: PoolKey, waiter: asyncio.Future[_Slot] | None) -> None:
        """Own one connection from dial to close. Never raises (it lives in the pool's group)."""
        slot = _Slot(key)
        self._slots.add(slot)
        counted = waiter is None  # spare dials are counted in _dialing until ready
        try:
            async with contextlib.AsyncExitStack() as stack:
                conn = Connection(
                    self.endpoint, model=key.model, session=key.session(), **self._connect
                )
                conn.on_closed = slot.wake.set
                try:
                    async with self._dial_sem:
                        self._counts["dials"] += 1
                        self._in_flight += 1
                        peak = max(self._counts["peak_parallel_dials"], self._in_flight)
                        self._counts["peak_parallel_dials"] = peak
                        try:
                            await stack.enter_async_context(conn)
                        finally:
                            self._in_flight -= 1
                except Exception as exc:
                    self._counts["dial_failures"] += 1
                    if waiter is not None and not waiter.done():
                        waiter.set_exception(exc)
                    else:
                        self._dial_errors[key] = exc
                        log.warning("dialling a spare for %s failed: %s", key.voice, exc)
                    return
                finally:
                    if counted:
                        self._dialing[key] -= 1
                        counted = False
                    self._changed.set()
                slot.conn = conn
                slot.ready_at = time.monotonic()
                if waiter is not None and not waiter.done():
                    slot.checked_out = True
                    waiter.set_result(slot)
                else:
                    self._spares.setdefault(key, deque()).append(slot)
                self._changed.set()
                await self._hold(slot, conn)
        except Exception:
            log.exception("pool keeper failed")
            if waiter is not None and not waiter.done():
                waiter.set_exception(Timeout("a realtime session", 0.0))
        finally:
            if counted:
                self._dialing[key] -= 1
            self._slots.discard(slot)
            queue = self._spares.get(key)
            if queue and slot in queue:
                queue.remove(slot)

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
