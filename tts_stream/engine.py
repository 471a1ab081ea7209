"""The Engine: the facade users hold (``async with Engine() as engine``).

Role: composition root of the library. It resolves the :class:`~tts_stream.config.Endpoint`,
owns the aiohttp ``ClientSession`` (for :attr:`Engine.voices`, the enrollment client), the
warm-spare :class:`~tts_stream.pool.Pool` of realtime sessions and the bounded metrics
history, and creates a :class:`~tts_stream.speech.Speech` per utterance. A voice is only
ever streamed with the model it was enrolled for: a mismatch raises
:class:`~tts_stream.errors.ModelMismatch` before anything is sent (protocol.md §5.1, §6.9).

Boundary: never imports ``sinks`` (callers pass sink objects) and never changes the event
loop policy; :func:`run` is the helper for entry points that want uvloop when installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import gc
import logging
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import aiohttp

from ._resource import StackResource
from .audio import Sink, preferred_sample_rate
from .config import Endpoint
from .enrollment import Voice, Voices
from .errors import ClosedError, ModelMismatch, TtsStreamError, UsageError
from .fanout import Policy
from .messages import MODES, RESPONSE_FORMATS, SAMPLE_RATES, VC_MODELS
from .metrics import History, Observer, UtteranceMetrics
from .pool import Pool, PoolKey, PoolStats
from .samples import SampleReport, inspect_sample
from .speech import Speech, SpeechOptions, SpeechState

__all__ = ["SESSION_KEYS", "Engine", "EngineStats", "RecentError", "run", "sink_kind"]

log = logging.getLogger(__name__)

_RECENT_ERRORS = 20

T = TypeVar("T")

#: The ``session.update`` keys of protocol.md §5.4 that ``**session`` may carry (``voice``,
#: ``mode``, ``response_format`` and ``sample_rate`` have their own arguments). Any other
#: name is refused before connecting (a typo such as ``speach_rate`` would otherwise be sent
#: and silently ignored or refused by the server); a key the service added since goes
#: through ``extra_session={...}`` unchecked.
SESSION_KEYS = (
    "language_type", "speech_rate", "volume", "pitch_rate", "bit_rate",
    "instructions", "optimize_instructions", "enable_tn",
)  # fmt: skip


def run(main: Callable[[], Coroutine[Any, Any, T]] | Coroutine[Any, Any, T]) -> T:
    """Run ``main`` (a coroutine or a coroutine function) on uvloop if installed, else asyncio.

    For entry points (CLI, benchmarks, scripts); the library itself never touches the loop
    policy.
    """
    coro = main() if callable(main) else main
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: T = uvloop.run(coro)
    return result


def preferred_rate(sinks: Sequence[Sink], default: int = 24000) -> int:
    """The sample rate all ``sinks`` prefer (``preferred_sample_rate``), else ``default``."""
    rates = {preferred_sample_rate(sink) for sink in sinks}
    if len(rates) == 1:
        (rate,) = rates
        if isinstance(rate, int) and rate in SAMPLE_RATES:
            return rate
    return default


def sink_kind(sink: Sink) -> str:
    """A sink's kind for metrics attributes: ``WavSink`` -> ``"wav"``."""
    name = type(sink).__name__
    return (name.removesuffix("Sink") or name).lower()


@dataclass(frozen=True)
class RecentError:
    """One failed utterance, as :meth:`Engine.stats` keeps the last few."""

    at: float  # wall clock (epoch seconds) when the record was final
    model: str
    error: str


@dataclass(frozen=True)
class EngineStats:
    """One snapshot of a running engine (:meth:`Engine.stats`)."""

    pool: PoolStats
    speeches_in_flight: int
    utterances: int  # finished since the engine opened
    errors: int  # of those, how many failed
    recent_errors: tuple[RecentError, ...]
    accepting: bool  # False once shutdown() began


class Engine(StackResource):
    """Voice enrollment plus real-time speech to sinks.

    ``api_key`` defaults to ``$DASHSCOPE_API_KEY``; ``region`` is ``"intl"`` or ``"cn"``;
    ``base_url`` (e.g. a :class:`~tts_stream.server.LocalServer`'s) wins over the region.
    ``pool_size`` warm spares are kept per (model, voice, format, rate, mode) once used, or
    ``pool_size="auto"``: as many as the key's recent peak of speeches at once (between 1
    and ``pool_auto_max``; see :mod:`tts_stream.pool`); ``max_idle_s`` replaces a spare
    before the service's idle limit. ``freeze_gc`` (default on) moves everything alive when
    the engine opens and after each :meth:`prewarm` out of the garbage collector's
    generations (:func:`gc.freeze`; undone when the last such engine closes), so full
    collections scan only what streaming allocates and stay short (README, "The
    collector"); ``freeze_gc=False`` leaves the collector alone. Keepalive: a ping after
    ``ping_interval`` s in which the socket delivered nothing while we were ready to read,
    and the connection is given up after ``ping_timeout`` s more without an answer
    (``ping_interval=None`` turns it off); back-pressure from slow sinks never counts.
    ``speech`` holds the
    default :class:`~tts_stream.speech.SpeechOptions` of every utterance. A ``model`` passed
    to ``speak``/``prewarm`` must be one of :data:`~tts_stream.messages.VC_MODELS` (refused
    before connecting otherwise, naming the known ones) or listed in ``extra_models``: the
    escape hatch for a model the service added after this release (a voice's own
    ``target_model``, as the server reports it, is always accepted). ``aclose()`` (or
    leaving the block) finishes the spare sessions gracefully and closes the HTTP session.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        region: str = "intl",
        base_url: str | None = None,
        workspace: str | None = None,
        pool_size: int | Literal["auto"] = 1,
        pool_auto_max: int = 32,
        max_idle_s: float = 45.0,
        dial_concurrency: int = 4,
        open_timeout: float = 10.0,
        configure_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float = 20.0,
        http_timeout: float = 30.0,
        history: int = 1000,
        speech: SpeechOptions = SpeechOptions(),  # noqa: B008 - frozen
        extra_models: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        observers: Sequence[Observer] = (),
        freeze_gc: bool = True,
    ) -> None:
        self.endpoint = Endpoint.resolve(
            api_key=api_key, region=region, base_url=base_url, workspace=workspace, env=env
        )
        self.speech_options = speech
        if isinstance(extra_models, str):
            raise UsageError("extra_models takes a list of model names, not one string")
        self.extra_models = tuple(extra_models)
        self.history = History(history)
        self._pool_opts: dict[str, Any] = {
            "size": pool_size,
            "auto_max": pool_auto_max,
            "max_idle_s": max_idle_s,
            "dial_concurrency": dial_concurrency,
            "open_timeout": open_timeout,
            "configure_timeout": configure_timeout,
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout,
        }
        self._http_timeout = http_timeout
        self._pool: Pool | None = None
        self._voices: Voices | None = None
        self._observers: list[Observer] = list(observers)
        self._live: weakref.WeakSet[Speech] = weakref.WeakSet()
        self._accepting = True
        self._finished = 0
        self._errors = 0
        self._recent_errors: deque[RecentError] = deque(maxlen=_RECENT_ERRORS)
        self._speech_done = asyncio.Event()
        self._freeze_gc = freeze_gc

    def __repr__(self) -> str:
        return f"Engine({self.endpoint!r})"

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        if self._stack is not None:
            raise ClosedError("an Engine is single-use; create a new one")
        stack = self._stack = contextlib.AsyncExitStack()
        try:
            http = await stack.enter_async_context(aiohttp.ClientSession())
            self._voices = Voices(http, self.endpoint, timeout=self._http_timeout)
            self._pool = await stack.enter_async_context(Pool(self.endpoint, **self._pool_opts))
        except BaseException:
            await stack.aclose()
            raise
        if self._freeze_gc:
            _Freezer.hold()
            stack.callback(_Freezer.release)
            _Freezer.point(full=False)
        return self

    def _gc_safe_point(self) -> None:
        """After a prewarm: freeze the spares too (``freeze_gc``; :class:`_Freezer`).

        Only while no speech of this engine exists: nothing transient is frozen, and the
        collection before it pauses no stream.
        """
        if self._freeze_gc and not self._live and not self._closed:
            _Freezer.point()

    # --- enrollment ---------------------------------------------------------------------------

    @property
    def voices(self) -> Voices:
        """The voice enrollment client (create / list / all / count / delete)."""
        if self._voices is None or self._closed:
            raise ClosedError("use the Engine inside `async with Engine(...) as engine`")
        return self._voices

    @staticmethod
    def check_sample(source: str | os.PathLike[str] | bytes) -> SampleReport:
        """Check a clone sample locally against every enrollment rule (no network)."""
        return inspect_sample(source)

    # --- speech -------------------------------------------------------------------------------

    def _pool_or_raise(self) -> Pool:
        if self._pool is None or self._closed:
            raise ClosedError("use the Engine inside `async with Engine(...) as engine`")
        return self._pool

    @staticmethod
    def pool_key(
        voice: Voice | str,
        *,
        model: str | None = None,
        mode: str = "server_commit",
        sample_rate: int = 24000,
        response_format: str = "pcm",
        extra_models: Sequence[str] = (),
        extra_session: Mapping[str, Any] | None = None,
        **session: Any,
    ) -> PoolKey:
        """The pool key of a session; raises :class:`ModelMismatch` / :class:`UsageError`.

        ``**session`` keys must be among :data:`SESSION_KEYS`; ``extra_session`` adds keys
        unchecked. ``model`` must be known (:data:`~tts_stream.messages.VC_MODELS` or
        ``extra_models``) unless it is the voice's own ``target_model``.
        """
        if isinstance(voice, Voice):
            name, enrolled = voice.name, voice.target_model
        elif isinstance(voice, str) and voice:
            name, enrolled = voice, None
        else:
            raise UsageError(f"voice must be a Voice or a voice name, got {voice!r}")
        if model is None:
            if enrolled is None:
                raise UsageError(
                    f"model is required for voice {name!r}: its target_model is unknown "
                    "(pass model=... or a Voice from engine.voices)"
                )
            model = enrolled
        elif enrolled is not None and enrolled != model:
            raise ModelMismatch(name, enrolled, model)
        elif enrolled is None and model not in VC_MODELS and model not in extra_models:
            # The service answers an unknown model with session.created and a silent close
            # (protocol.md §5.2): say what is wrong before connecting.
            raise UsageError(
                f"unknown model {model!r}: the known realtime models are "
                f"{', '.join(VC_MODELS)}{_suggest(model, VC_MODELS)}; for a model the "
                f"service added since, pass Engine(extra_models=[{model!r}])"
            )
        _check_session(session, mode, sample_rate, response_format)
        if extra_session:
            session = {**session, **extra_session}
        return PoolKey.make(
            model=model, voice=name, response_format=response_format,
            sample_rate=sample_rate, mode=mode, **session,
        )  # fmt: skip

    def speak(
        self,
        voice: Voice | str,
        *,
        sinks: Sequence[Sink],
        model: str | None = None,
        mode: str = "server_commit",
        sample_rate: int | None = None,
        first_commit: Literal["clause"] | None = None,
        policies: Mapping[str, Policy] | None = None,
        options: SpeechOptions | None = None,
        on_loss: Literal["fail", "resume"] | None = None,
        **session: Any,
    ) -> Speech:
        """A :class:`~tts_stream.speech.Speech` to use with ``async with``.

        ``model`` defaults to ``voice.target_model`` (a mismatch raises
        :class:`~tts_stream.errors.ModelMismatch` here, before connecting); a plain voice
        name needs ``model``. ``**session`` adds ``session.update`` keys (``language_type``,
        ``speech_rate``, ``volume``, ``pitch_rate``...: :data:`SESSION_KEYS`; any other name
        is refused as a likely typo, ``extra_session={...}`` sends new keys unchecked).
        ``policies`` maps sink names to a
        fan-out :class:`~tts_stream.fanout.Policy`. ``on_loss="resume"`` continues after a
        connection lost after audio from the next sentence (``server_commit`` mode only; see
        :mod:`tts_stream.resume`); the default ``"fail"`` raises, never repeating speech.

        ``sample_rate`` defaults to the rate every sink prefers when they all agree (telephony
        sinks prefer 8000 Hz, so the server synthesizes at 8 kHz and nothing is resampled),
        else to 24000 Hz.
        """
        pool = self._pool_or_raise()
        if not self._accepting:
            raise ClosedError("the engine is shutting down: it takes no new speech")
        rate = sample_rate if sample_rate is not None else preferred_rate(sinks)
        key = self.pool_key(voice, model=model, mode=mode, sample_rate=rate,
                            extra_models=self.extra_models, **session)  # fmt: skip
        opts = options or self.speech_options
        changes: dict[str, Any] = {}
        if first_commit is not None:
            changes["first_commit"] = first_commit
        if policies is not None:
            changes["policies"] = dict(policies)
        if on_loss is not None:
            changes["on_loss"] = on_loss
        if changes:
            opts = dataclasses.replace(opts, **changes)
        kinds = {sink.name: sink_kind(sink) for sink in sinks}
        speech = Speech(
            pool=pool, key=key, sinks=sinks, options=opts,
            on_done=lambda record: self._utterance_done(speech, record, kinds),
            on_open=_Freezer.opened if self._freeze_gc else None,
        )  # fmt: skip
        self._live.add(speech)
        return speech

    def _utterance_done(
        self, speech: Speech, record: UtteranceMetrics, kinds: Mapping[str, str]
    ) -> None:
        self._live.discard(speech)
        self._speech_done.set()
        if self._freeze_gc:
            _Freezer.closed()  # on_done follows on_open, once per speech that opened
        self.history.add(record)
        self._finished += 1
        if record.error:
            self._errors += 1
            self._recent_errors.append(RecentError(time.time(), record.model, record.error))
        for observer in self._observers:
            try:
                observer(record, kinds)
            except Exception:  # an exporter's failure must not fail the speech
                log.exception("metrics observer %r failed", observer)

    def add_observer(self, observer: Observer) -> None:
        """Call ``observer(record, {sink name: kind})`` once per finished utterance."""
        self._observers.append(observer)

    async def say(
        self, voice: Voice | str, text: str, *, sinks: Sequence[Sink], **kwargs: Any
    ) -> UtteranceMetrics:
        """Speak ``text`` to ``sinks`` and wait until every sink has it; return the metrics."""
        speech = self.speak(voice, sinks=sinks, **kwargs)
        async with speech:
            await speech.push(text)
        return speech.metrics

    async def prewarm(
        self,
        voice: Voice | str,
        n: int = 1,
        *,
        model: str | None = None,
        mode: str = "server_commit",
        sample_rate: int = 24000,
        allow_partial: bool = False,
        **session: Any,
    ) -> int:
        """Keep ``n`` configured spare sessions for this voice ready; returns once they are,
        with the number of spares ready.

        Each dial is bounded on its own (``open_timeout`` + ``configure_timeout``, from when
        it gets one of the ``dial_concurrency`` slots), so a large ``n`` takes the rounds it
        needs. When fewer than ``n`` could be made, the spares that connected stay in the
        pool and the error of a failed dial is raised, with a note of how many are ready:
        :class:`~tts_stream.errors.ConnectionFailed` (nothing listening),
        :class:`~tts_stream.errors.Timeout` (a server that never answers), a
        :class:`~tts_stream.errors.ServerError` (key or configuration refused);
        ``allow_partial=True`` returns the count instead of raising.
        """
        key = self.pool_key(voice, model=model, mode=mode, sample_rate=sample_rate,
                            extra_models=self.extra_models, **session)  # fmt: skip
        try:
            return await self._pool_or_raise().prewarm(key, n, allow_partial=allow_partial)
        finally:
            self._gc_safe_point()

    def stats(self) -> EngineStats:
        """One snapshot: the pool, speeches in flight, utterances and the recent errors."""
        return EngineStats(
            pool=self._pool_or_raise().stats(),
            speeches_in_flight=self._in_flight(),
            utterances=self._finished,
            errors=self._errors,
            recent_errors=tuple(self._recent_errors),
            accepting=self._accepting and not self._closed,
        )

    def _in_flight(self) -> int:
        return sum(1 for s in self._live if s.state is not SpeechState.NEW)

    async def shutdown(self, *, drain_timeout: float = 30.0) -> EngineStats:
        """Stop gracefully, in this order (for services under a process manager):

        1. stop taking speech: ``speak()`` raises :class:`~tts_stream.errors.ClosedError`;
        2. drain: wait up to ``drain_timeout`` s for the speeches in flight to finish (their
           owners leave their ``async with`` blocks as usual); those still open then are
           interrupted (barge-in: sinks stop, their owners get the report);
        3. close: finish the warm spares and close the HTTP session (``aclose()``).

        Returns the stats taken after the drain. Idempotent; ``aclose()`` alone skips 1–2.
        """
        self._accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        while self._in_flight() and (remaining := deadline - loop.time()) > 0:
            self._speech_done.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._speech_done.wait()
        for speech in list(self._live):
            if speech.state in (SpeechState.OPEN, SpeechState.FINISHING):
                log.warning("shutdown: interrupting a speech still open after the drain")
                with contextlib.suppress(TtsStreamError):
                    await speech.interrupt()
        stats = self.stats() if not self._closed else None
        await self.aclose()
        return stats or EngineStats(PoolStats(), 0, self._finished, self._errors,
                                    tuple(self._recent_errors), False)  # fmt: skip

    def pool_stats(self) -> PoolStats:
        """Counters of the warm-spare pool."""
        return self._pool_or_raise().stats()

    def spares(self, voice: Voice | str, **kwargs: Any) -> int:
        """Warm spares ready now for the session ``speak(voice, **kwargs)`` would use."""
        kwargs.setdefault("extra_models", self.extra_models)
        return self._pool_or_raise().spares(self.pool_key(voice, **kwargs))


BUSY_RECOLLECT = 200_000
"""Objects the frozen set may grow by, beyond doubling, before a busy process collects it."""
BUSY_CHECK_EVERY = 1000
"""Speeches opened between two measurements of the frozen set while busy
(:func:`gc.get_freeze_count` walks the whole set: once per open cost seconds at 500 streams)."""


class _Freezer:
    """The engines' use of :func:`gc.freeze`, process-wide (the collector is one per process).

    At a safe point (an engine opened, a prewarm finished, no speech of that engine alive):
    a collection, then ``gc.freeze()``: every object alive moves to the permanent
    generation, and full (gen-2) collections stop scanning the modules, the libraries and
    the prewarmed spares, whose pauses (90-150 ms at 500 streams) made frames late
    (bench/README.md, The collector). When an engine opens, the collection is of the young
    generations only (a full one would scan the whole heap once more, seconds in a large
    process), so old garbage there is frozen until the unfreeze below; after a prewarm it is
    full, which scans only what was allocated since the last freeze.

    Each speech that opens freezes again, without a collection (``gc.freeze()`` moves lists,
    it scans nothing): what the speeches of a burst allocate at their start would otherwise
    pile up in the old generation and make the next full collection scan all of it (one
    pause of 40-100 ms at 500 streams). A finished speech leaves no reference cycle (tests
    pin it), so its frozen objects are freed by reference counting. Garbage that is part of
    a cycle when a freeze catches it (the application's own, or an object that later joins
    an unreachable cycle) waits for a full collection of the permanent generation: when the
    last speech of the process closes and the frozen count has grown by a quarter since the
    last one (CPython's own rule for the old generation), an engine that owns the freeze
    unfreezes, collects and freezes again (a pause while no speech plays); and
    a service that is never idle gets the same full collection, during a speech, once the
    frozen count has doubled (plus ``BUSY_RECOLLECT``) since the last one (measured every
    ``BUSY_CHECK_EVERY`` opens), so its memory
    stays bounded; and :func:`gc.unfreeze` when the last freezing engine closes, unless
    something else had frozen objects before the first one opened (then it is the
    application's to call).
    """

    holders = 0
    owned = False
    speeches = 0  # speeches open, in every freezing engine of the process
    opens = 0  # speeches opened since the frozen set was last measured while busy
    frozen_at_full = 0  # gc.get_freeze_count() after the last full collection of it all

    @classmethod
    def hold(cls) -> None:
        if cls.holders == 0:
            cls.owned = gc.get_freeze_count() == 0
        cls.holders += 1

    @classmethod
    def point(cls, *, full: bool = True) -> None:
        gc.collect(2 if full else 1)
        gc.freeze()
        cls.frozen_at_full = max(cls.frozen_at_full, gc.get_freeze_count())

    @classmethod
    def opened(cls) -> None:
        cls.speeches += 1
        gc.freeze()
        cls.opens += 1
        if cls.opens >= BUSY_CHECK_EVERY and cls.owned:  # get_freeze_count walks the list
            cls.opens = 0
            if gc.get_freeze_count() > cls.frozen_at_full * 2 + BUSY_RECOLLECT:
                cls._recollect()  # never idle and still growing: bound the memory, a pause

    @classmethod
    def closed(cls) -> None:
        cls.speeches -= 1
        if cls.speeches == 0 and cls.owned and cls.holders > 0:
            if gc.get_freeze_count() > cls.frozen_at_full * 5 // 4:
                cls._recollect()

    @classmethod
    def _recollect(cls) -> None:
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        cls.frozen_at_full = gc.get_freeze_count()

    @classmethod
    def release(cls) -> None:
        cls.holders -= 1
        if cls.holders == 0 and cls.owned:
            gc.unfreeze()
            cls.frozen_at_full = 0


def _check_session(
    session: Mapping[str, Any], mode: str, sample_rate: int, response_format: str
) -> None:
    """Refuse a misspelt ``session.update`` key or an unknown mode, rate or format."""
    unknown = [k for k in session if k not in SESSION_KEYS]
    if unknown:
        k = unknown[0]
        raise UsageError(
            f"unknown session option {k!r}{_suggest(k, SESSION_KEYS)}; the session.update "
            f"keys are {', '.join(SESSION_KEYS)} (and voice, mode, sample_rate, "
            f"response_format); send a key this client does not know with "
            f"extra_session={{{k!r}: ...}}"
        )
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if sample_rate not in SAMPLE_RATES:
        rates = ", ".join(map(str, SAMPLE_RATES))
        raise UsageError(f"sample_rate must be one of {rates}, got {sample_rate!r}")
    if response_format not in RESPONSE_FORMATS:
        formats = ", ".join(RESPONSE_FORMATS)
        raise UsageError(f"response_format must be one of {formats}, got {response_format!r}")


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
