"""tts-stream as a LiveKit Agents TTS: ``TTS`` (extra ``[livekit]``).

``TTS(voice=...)`` is a ``livekit.agents.tts.TTS`` with ``TTSCapabilities(streaming=True)``:

* ``stream()`` gives a ``SynthesizeStream``: tokens in (``push_text``), one segment per
  stream, spoken by one tts-stream :class:`~tts_stream.Speech` (``flush()`` commits what was
  pushed so far in ``mode="commit"``; in ``server_commit`` the server cuts by itself;
  ``end_input()`` finishes the speech);
* ``synthesize(text)`` gives a ``ChunkedStream`` (one speech, one text);
* ``prewarm()`` dials a configured spare session in the background.

Audio goes through a :class:`HandoffSink` into LiveKit's ``AudioEmitter``; what the stream's
consumer has not read yet is bounded (``max_buffered_ms``), so a consumer that stops reading
pushes back on the speech. ``TTSMetrics`` come from LiveKit's own monitor (ttfb from the
first text sent), with ``acquire_time`` and ``connection_reused`` from the pool.

Errors map onto LiveKit's tree so its retry loop does the right thing: a loss *after* audio
reached LiveKit is ``APIConnectionError(retryable=False)`` (LiveKit must not speak it again;
before audio the engine has already retried on fresh sessions and a further loss is
retryable), a :class:`~tts_stream.Timeout` is ``APITimeoutError``, a
:class:`~tts_stream.ServerError` is ``APIStatusError`` with its status, request id and
``retryable``.

Boundary: public API of :mod:`tts_stream` and :mod:`sinks` only (like any application).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Mapping
from typing import Any

from tts_stream import (
    ConnectionFailed,
    Engine,
    Frame,
    ServerError,
    Timeout,
    TtsStreamError,
    UsageError,
    Voice,
)
from tts_stream.errors import MissingDependency

from ._common import EngineHost, HandoffSink, resolve_voice, split_speak_options

try:
    from livekit.agents import (
        DEFAULT_API_CONNECT_OPTIONS,
        APIConnectionError,
        APIConnectOptions,
        APIError,
        APIStatusError,
        APITimeoutError,
        tts,
    )
    from livekit.agents.utils import shortuuid
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependency(
        "tts_stream.integrations.livekit needs LiveKit Agents: "
        "pip install 'tts-stream[livekit]'"
    ) from exc

__all__ = ["TTS", "to_livekit_error"]

log = logging.getLogger(__name__)

_SERVER_RATES = (8000, 16000, 24000, 48000)


def to_livekit_error(exc: TtsStreamError, *, audio_sent: bool) -> APIError:
    """The LiveKit error for a tts-stream error; nothing is retryable once audio was sent."""
    if isinstance(exc, Timeout):
        return APITimeoutError(str(exc), retryable=not audio_sent)
    if isinstance(exc, ServerError):
        return APIStatusError(
            str(exc), status_code=exc.status if exc.status is not None else -1,
            request_id=exc.request_id, body={"code": exc.code},
            retryable=exc.retryable and not audio_sent,
        )  # fmt: skip
    if isinstance(exc, ConnectionFailed):
        return APIConnectionError(str(exc), retryable=not audio_sent)
    return APIError(str(exc), retryable=False)  # misuse: would fail the same way again


class TTS(tts.TTS[None]):
    """A LiveKit Agents TTS that speaks through tts-stream with a cloned voice.

    ``voice``, ``engine``, ``base_url``, ``api_key``, ``model`` and ``speak_options`` work as
    for Pipecat's ``TtsStreamTTSService``: a voice name without ``model`` is looked up; with
    no ``engine`` the TTS opens its own on first use and closes it in :meth:`aclose`.
    ``sample_rate`` is what the server synthesizes (8000, 16000, 24000 or 48000 Hz).
    """

    def __init__(
        self,
        *,
        voice: Voice | str,
        engine: Engine | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        speak_options: Mapping[str, Any] | None = None,
        sample_rate: int = 24000,
        max_buffered_ms: float = 1000.0,
    ) -> None:
        if sample_rate not in _SERVER_RATES:
            rates = ", ".join(map(str, _SERVER_RATES))
            raise UsageError(f"sample_rate must be one of {rates}, got {sample_rate!r}")
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=True),
            sample_rate=sample_rate,
            num_channels=1,
        )
        if model is None and isinstance(voice, Voice):
            model = voice.target_model
        self._voice: Voice | str = voice
        self._model = model
        self._speak_kwargs, self._session_kwargs = split_speak_options(speak_options)
        self._max_buffered_ms = max_buffered_ms
        self._engine = engine
        self._host = (
            EngineHost(lambda: Engine(base_url=base_url, api_key=api_key))
            if engine is None
            else None
        )
        self._resolved = False
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def model(self) -> str:
        return self._model or "unknown"

    @property
    def provider(self) -> str:
        return "tts-stream"

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> ChunkedStream:
        return ChunkedStream(tts=self, input_text=text, conn_options=conn_options)

    def stream(
        self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> SynthesizeStream:
        return SynthesizeStream(tts=self, conn_options=conn_options)

    def prewarm(self) -> None:
        """Dial one configured spare session in the background (errors are logged)."""
        task = asyncio.get_running_loop().create_task(self._prewarm(), name="tts-stream-prewarm")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _prewarm(self) -> None:
        try:
            engine = await self.ready()
            await engine.prewarm(
                self._voice, 1, model=self._model, sample_rate=self.sample_rate,
                **self._session_kwargs,
            )  # fmt: skip
        except TtsStreamError as exc:
            log.warning("prewarm failed: %s", exc)

    async def ready(self) -> Engine:
        """The engine, opened if this TTS owns it, with the voice resolved."""
        async with self._lock:
            if self._engine is not None:
                engine = self._engine
            else:
                assert self._host is not None
                engine = await self._host.start()
            if not self._resolved:
                self._voice = await resolve_voice(engine, self._voice, self._model)
                if isinstance(self._voice, Voice):
                    self._model = self._voice.target_model
                self._resolved = True
            return engine

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._host is not None:
            await self._host.aclose()

    async def _speak(
        self,
        stream: ChunkedStream | SynthesizeStream,
        emitter: tts.AudioEmitter,
        texts: AsyncIterable[str | None],
    ) -> None:
        """Speak ``texts`` (``None``: commit now) into ``emitter``, mapping errors."""

        async def deliver(frame: Frame) -> bool:
            emitter.push(frame.samples.tobytes())
            return True

        sink = stream._sink = HandoffSink(
            deliver, max_outstanding_ms=self._max_buffered_ms, drain=False, name="livekit"
        )
        try:
            engine = await self.ready()
            speech = engine.speak(
                self._voice, sinks=[sink], model=self._model, sample_rate=self.sample_rate,
                **self._speak_kwargs,
            )  # fmt: skip
            async with speech:
                info = speech.metrics
                stream._acquire_time = (info.acquire_ms or 0.0) / 1000.0
                stream._connection_reused = bool(info.was_warm)
                async for text in texts:
                    if text is None:
                        # server_commit: the server cuts on its own and the finish commits
                        # the rest (a commit here races the server's cut).
                        if speech.mode == "commit":
                            await speech.commit()
                    else:
                        stream._mark_started()
                        await speech.push(text)
        except TtsStreamError as exc:
            raise to_livekit_error(exc, audio_sent=sink.stats().samples_written > 0) from exc


class ChunkedStream(tts.ChunkedStream):
    """``TTS.synthesize(text)``: one speech for one text."""

    def __init__(self, *, tts: TTS, input_text: str, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._tts_stream = tts
        self._sink: HandoffSink | None = None

    def _mark_started(self) -> None:
        pass  # ChunkedStream times from its creation (LiveKit's definition)

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(
            request_id=shortuuid(), sample_rate=self._tts_stream.sample_rate, num_channels=1,
            mime_type="audio/pcm",
        )  # fmt: skip

        async def texts() -> AsyncIterable[str | None]:
            yield self._input_text

        await self._tts_stream._speak(self, output_emitter, texts())
        output_emitter.flush()

    async def __anext__(self) -> tts.SynthesizedAudio:
        ev = await super().__anext__()
        if self._sink is not None:
            self._sink.taken(ev.frame.samples_per_channel)  # the consumer read it
        return ev


class SynthesizeStream(tts.SynthesizeStream):
    """``TTS.stream()``: tokens in, one segment spoken by one speech."""

    def __init__(self, *, tts: TTS, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, conn_options=conn_options)
        self._tts_stream = tts
        self._sink: HandoffSink | None = None

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(
            request_id=shortuuid(), sample_rate=self._tts_stream.sample_rate, num_channels=1,
            mime_type="audio/pcm", stream=True,
        )  # fmt: skip
        started = False

        async def texts() -> AsyncIterable[str | None]:
            nonlocal started
            async for data in self._input_ch:
                if isinstance(data, self._FlushSentinel):
                    yield None
                    continue
                if not started:
                    output_emitter.start_segment(segment_id=shortuuid())
                    started = True
                yield data

        await self._tts_stream._speak(self, output_emitter, texts())
        output_emitter.end_input()

    async def __anext__(self) -> tts.SynthesizedAudio:
        ev = await super().__anext__()
        if self._sink is not None:
            self._sink.taken(ev.frame.samples_per_channel)  # the consumer read it
        return ev
