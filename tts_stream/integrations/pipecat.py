"""tts-stream as a Pipecat TTS service: ``TtsStreamTTSService`` (extra ``[pipecat]``).

One Pipecat audio context (one turn, or one ``TTSSpeakFrame``) is one tts-stream
:class:`~tts_stream.Speech`: the turn's first text opens it on a warm pooled session, every
text Pipecat aggregates (a token in ``TextAggregationMode.TOKEN``, a sentence in
``SENTENCE``, which is then committed at once) is pushed into it, and the end of the turn
(``flush_audio``) finishes it. Audio goes through a :class:`HandoffSink` into the context's
queue as ``TTSAudioRawFrame`` at the pipeline's output rate; the server synthesizes at that
rate when it is one of 8/16/24/48 kHz (an 8 kHz telephony pipeline gets 8 kHz from the
server), otherwise at 24 kHz, resampled by Pipecat's own resampler.

Pipecat's base class does the rest the Pipecat way: ``TTSStartedFrame`` and TTFB start at the
turn's first text (``push_start_frame``), TTFB stops at its first audio frame, for every turn;
usage metrics; text frames. A barge-in (``InterruptionFrame``) reaches
:meth:`TtsStreamTTSService.on_audio_context_interrupted`, which calls ``speech.interrupt()``:
the session is retired, late audio dropped, and the pool has the next turn's session ready.
Errors become ``ErrorFrame`` (pushed upstream), never exceptions out of the pipeline.

The speech (and the engine, when the service opened it) lives in a task of its own, because
the engine's TaskGroups must be entered and left by one task while Pipecat calls
``run_tts``, ``flush_audio`` and the interruption hook from different ones.

Boundary: public API of :mod:`tts_stream` and :mod:`sinks` only (like any application).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tts_stream import (
    AudioFormat,
    Engine,
    Frame,
    InterruptReport,
    Sink,
    Speech,
    Timeout,
    TtsStreamError,
    Voice,
)
from tts_stream.audio import pcm16
from tts_stream.errors import MissingDependency

from ._common import EngineHost, HandoffSink, resolve_voice, split_speak_options

try:
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        InterruptionFrame,
        StartFrame,
        TTSAudioRawFrame,
        TTSStoppedFrame,
    )
    from pipecat.frames.frames import Frame as PipecatFrame
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.services.settings import TTSSettings
    from pipecat.services.tts_service import TextAggregationMode, TTSService
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependency(
        "tts_stream.integrations.pipecat needs Pipecat: pip install 'tts-stream[pipecat]'"
    ) from exc

__all__ = ["SinkOutput", "TtsStreamTTSService"]

log = logging.getLogger(__name__)

_SERVER_RATES = (8000, 16000, 24000, 48000)
_OPEN_TIMEOUT_S = 30.0  # a turn's speech to open (pool acquire + configure, retries included)


@dataclass(eq=False)
class _Turn:
    """One audio context spoken by one Speech, run by its own task."""

    context_id: str
    sink: HandoffSink
    speech: Speech | None = None
    error: Exception | None = None
    reported: bool = False
    interrupted: bool = False
    handed: deque[int] = field(default_factory=deque)  # samples per frame not pushed on
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    finish: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class TtsStreamTTSService(TTSService):
    """A Pipecat ``TTSService`` that speaks through tts-stream with a cloned voice.

    ``voice`` is a :class:`~tts_stream.Voice` or a voice name; a name with no ``model`` is
    looked up (``engine.voices.find``) for its ``target_model`` when the pipeline starts.
    ``engine``: an open :class:`~tts_stream.Engine` you own; without one the service opens
    its own when the pipeline starts (``DASHSCOPE_API_KEY`` for the real service, or
    ``base_url``/``api_key`` for a compatible server such as the local one) and closes it when
    the pipeline ends. Either way one session is prewarmed at start. ``speak_options`` go to
    ``engine.speak`` (``mode``, ``first_commit``, ``policies``, ``options``, session keys
    such as ``language_type``). ``max_buffered_ms`` bounds the audio handed to Pipecat and
    not yet pushed on by this service; ``max_lead_ms`` paces the audio to real time plus
    that lead (``None``: as fast as it comes), because Pipecat's downstream queues never
    push back (see the README, "Voice-bot frameworks"). Other keyword arguments go to
    Pipecat's ``TTSService`` (``text_aggregation_mode``, ``sample_rate``, ...).
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
        max_buffered_ms: float = 1000.0,
        max_lead_ms: float | None = 2000.0,
        **kwargs: Any,
    ) -> None:
        name = voice.name if isinstance(voice, Voice) else voice
        if model is None and isinstance(voice, Voice):
            model = voice.target_model
        self._speak_kwargs, self._session_kwargs = split_speak_options(speak_options)
        kwargs.setdefault("text_aggregation_mode", TextAggregationMode.SENTENCE)
        super().__init__(
            push_start_frame=True,
            push_stop_frames=False,  # the turn's task appends TTSStoppedFrame itself
            settings=TTSSettings(model=model, voice=name, language=None),
            **kwargs,
        )
        self._voice: Voice | str = voice
        self._model = model
        self._engine = engine
        self._host: EngineHost | None = None
        if engine is None:
            self._host = EngineHost(
                lambda: Engine(base_url=base_url, api_key=api_key),
                spawn=lambda coro: self.create_task(coro, name="tts-stream-engine"),
            )
        self._max_buffered_ms = max_buffered_ms
        self._max_lead_ms = max_lead_ms
        self._turns: dict[str, _Turn] = {}
        self._setup_error: Exception | None = None
        self._last_report: InterruptReport | None = None

    # --- Pipecat properties -------------------------------------------------------------------

    def can_generate_metrics(self) -> bool:
        return True

    @property
    def supports_processing_metrics(self) -> bool:
        return False  # synthesis happens in the speech's task, not inside run_tts

    @property
    def last_interrupt_report(self) -> InterruptReport | None:
        """The :class:`~tts_stream.InterruptReport` of the last barge-in (``played_ms``:
        audio pushed downstream by this service, i.e. delivered to the pipeline)."""
        return self._last_report

    @property
    def _server_rate(self) -> int:
        return self.sample_rate if self.sample_rate in _SERVER_RATES else 24000

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        try:
            engine = await self._get_engine()
            self._voice = await resolve_voice(engine, self._voice, self._model)
            if isinstance(self._voice, Voice):
                self._model = self._voice.target_model
                self._settings.model = self._model
            await engine.prewarm(
                self._voice, 1, model=self._model, sample_rate=self._server_rate,
                **self._session_kwargs,
            )  # fmt: skip
        except TtsStreamError as exc:
            self._setup_error = exc
            await self.push_error(error_msg=f"tts-stream: {exc}", exception=exc)

    async def stop(self, frame: EndFrame) -> None:
        for turn in list(self._turns.values()):  # let open turns finish before the playout
            turn.finish.set()
            await self._wait_turn(turn)
        await super().stop(frame)
        await self._close()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._close()

    async def cleanup(self) -> None:
        await super().cleanup()  # type: ignore[no-untyped-call]
        await self._close()

    async def _close(self) -> None:
        for turn in list(self._turns.values()):
            self._interrupt_turn(turn)
            await self._wait_turn(turn)
        if self._host is not None:
            await self._host.aclose()

    async def _get_engine(self) -> Engine:
        if self._engine is not None:
            return self._engine
        assert self._host is not None
        return await self._host.start()

    # --- Pipecat hooks ------------------------------------------------------------------------

    async def run_tts(
        self, text: str, context_id: str
    ) -> AsyncGenerator[PipecatFrame | None, None]:
        turn = self._turns.get(context_id)
        if turn is None:
            turn = await self._open_turn(context_id)
        if turn.speech is not None and turn.error is None and not turn.interrupted:
            try:
                await turn.speech.push(text)
                await self.start_tts_usage_metrics(text)
            except TtsStreamError as exc:
                turn.error = turn.error or exc
                turn.finish.set()
        await self._report(turn)
        yield None  # the audio arrives through the turn's sink

    async def flush_audio(self, context_id: str | None = None) -> None:
        self._finish(context_id)

    async def on_turn_context_completed(self) -> None:
        # Also when Pipecat's audio context ended early (no flush_audio then).
        context_id = self._turn_context_id
        await super().on_turn_context_completed()  # type: ignore[no-untyped-call]
        self._finish(context_id)

    async def on_audio_context_interrupted(self, context_id: str) -> None:
        turn = self._turns.get(context_id)
        if turn is not None:
            self._interrupt_turn(turn)
        await super().on_audio_context_interrupted(context_id)

    async def push_frame(
        self, frame: PipecatFrame, direction: FrameDirection = FrameDirection.DOWNSTREAM
    ) -> None:
        await super().push_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            turn = self._turns.get(frame.context_id or "")
            if turn is not None and turn.handed:
                turn.sink.taken(turn.handed.popleft())  # left this service

    # --- turns --------------------------------------------------------------------------------

    def _finish(self, context_id: str | None) -> None:
        turn = self._turns.get(context_id or "")
        if turn is not None:
            turn.finish.set()
            if turn.done.is_set():
                self._turns.pop(turn.context_id, None)

    def _interrupt_turn(self, turn: _Turn) -> None:
        """Barge-in: refuse the turn's audio from now on and interrupt its speech.

        ``speech.interrupt()`` runs in a task of its own, so Pipecat's interruption is not
        held up by it (retiring the socket): the audio is already refused here.
        """
        if turn.interrupted:
            return
        turn.interrupted = True
        turn.handed.clear()
        turn.finish.set()
        if turn.speech is not None:
            self.create_task(self._interrupt_speech(turn.speech), name="tts-stream-interrupt")

    async def _interrupt_speech(self, speech: Speech) -> None:
        try:
            self._last_report = await speech.interrupt()
        except TtsStreamError as exc:  # it failed or finished meanwhile: nothing to stop
            log.debug("interrupt: %r", exc)

    async def _open_turn(self, context_id: str) -> _Turn:
        async def deliver(f: Frame) -> bool:
            return await self._deliver(turn, f)

        sink = HandoffSink(
            deliver, max_outstanding_ms=self._max_buffered_ms, max_lead_ms=self._max_lead_ms,
            name="pipecat",
        )  # fmt: skip
        turn = _Turn(context_id, sink)
        self._turns[context_id] = turn
        if self._setup_error is not None:
            turn.error = self._setup_error
            await self._end_context(turn)
            turn.done.set()
            return turn
        turn.task = self.create_task(self._run_turn(turn), name="tts-stream-turn")
        try:
            async with asyncio.timeout(_OPEN_TIMEOUT_S):
                await turn.opened.wait()
        except TimeoutError:
            turn.error = turn.error or Timeout("the speech to open", _OPEN_TIMEOUT_S)
            turn.finish.set()
        return turn

    async def _run_turn(self, turn: _Turn) -> None:
        """The turn's task: open the speech, wait for the end of the turn, finish it."""
        try:
            engine = await self._get_engine()
            speech = engine.speak(
                self._voice, sinks=[turn.sink], model=self._model,
                sample_rate=self._server_rate, **self._speak_kwargs,
            )  # fmt: skip
            async with speech:
                turn.speech = speech
                turn.opened.set()
                if turn.interrupted:  # the barge-in came while the speech was opening
                    await self._interrupt_speech(speech)
                await turn.finish.wait()  # end of turn, barge-in, or the pipeline's end
        except TtsStreamError as exc:
            turn.error = turn.error or exc
        finally:
            turn.opened.set()
            if not turn.interrupted:
                await self._report(turn)
                await self._end_context(turn)
            turn.done.set()
            if turn.finish.is_set():
                self._turns.pop(turn.context_id, None)

    async def _end_context(self, turn: _Turn) -> None:
        if turn.interrupted or not self.audio_context_available(turn.context_id):
            return  # Pipecat dropped the context itself
        await self.append_to_audio_context(
            turn.context_id, TTSStoppedFrame(context_id=turn.context_id)
        )
        await self.remove_audio_context(turn.context_id)

    async def _wait_turn(self, turn: _Turn) -> None:
        try:
            async with asyncio.timeout(_OPEN_TIMEOUT_S):
                await turn.done.wait()
        except TimeoutError:
            log.warning("a tts-stream turn did not end in time")

    async def _deliver(self, turn: _Turn, frame: Frame) -> bool:
        """The hand-off sink's output: one TTSAudioRawFrame into the turn's audio context."""
        if turn.interrupted:
            return False
        audio = frame.samples.tobytes()
        if self._server_rate != self.sample_rate:
            audio = await self._resampler.resample(audio, self._server_rate, self.sample_rate)
        if not audio:
            return False
        turn.handed.append(len(frame))
        out = TTSAudioRawFrame(audio, self.sample_rate, 1, context_id=turn.context_id)
        await self.append_to_audio_context(turn.context_id, out)
        if not self.audio_context_available(turn.context_id):
            turn.handed.pop()  # Pipecat discarded it (the context is gone)
            return False
        return True

    async def _report(self, turn: _Turn) -> None:
        if turn.error is None or turn.reported:
            return
        turn.reported = True
        exc = turn.error
        await self.push_error(error_msg=f"tts-stream: {exc}", exception=exc)


class SinkOutput(FrameProcessor):
    """Plays the pipeline's bot audio into tts-stream sinks (WAV file, sound card, RTP...).

    Put it at the end of a pipeline: every ``TTSAudioRawFrame`` is written to each sink (in
    order, awaiting the sink: a ``SoundCardSink`` paces the pipeline's output to real time)
    and passed on; an ``InterruptionFrame`` interrupts every sink at once (the sound card
    fades out); ``EndFrame`` drains and closes them, ``CancelFrame`` closes them. The sinks
    are opened with the first frame's rate. A sink that fails is reported once as an
    ``ErrorFrame`` and left out from then on; the others go on. ``stats()`` of a sink is
    what it actually played, the figure ``InterruptReport.played_ms`` cannot give inside a
    framework.
    """

    def __init__(self, sinks: list[Sink], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sinks = list(sinks)
        self._live: list[Sink] = []
        self._fmt: AudioFormat | None = None
        self._offset = 0

    async def process_frame(self, frame: PipecatFrame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame) and frame.audio:
            await self._write(frame)
        elif isinstance(frame, InterruptionFrame):
            await self._each(lambda sink: sink.interrupt())
        elif isinstance(frame, EndFrame | CancelFrame):
            await self._close(drain=isinstance(frame, EndFrame))
        await self.push_frame(frame, direction)

    async def _each(self, op: Callable[[Sink], Awaitable[object]]) -> None:
        for sink in list(self._live):
            try:
                await op(sink)
            except TtsStreamError as exc:
                self._live.remove(sink)
                msg = f"tts-stream sink {sink.name}: {exc}"
                await self.push_error(error_msg=msg, exception=exc)

    async def _write(self, frame: TTSAudioRawFrame) -> None:
        fmt = AudioFormat(frame.sample_rate, frame.num_channels)
        if self._fmt is None:
            self._fmt, self._live = fmt, list(self.sinks)
            await self._each(lambda sink: sink.open(fmt))
        elif fmt != self._fmt:
            msg = f"SinkOutput opened for {self._fmt}, got a frame in {fmt}: not written"
            await self.push_error(error_msg=msg)
            return
        samples = pcm16(frame.audio)
        out = Frame(samples, self._offset)
        self._offset += len(samples) // fmt.channels
        await self._each(lambda sink: sink.write(out))

    async def _close(self, *, drain: bool) -> None:
        if not drain:
            await self._each(lambda sink: sink.interrupt())
        await self._each(lambda sink: sink.aclose())
        self._live = []

    async def cleanup(self) -> None:
        await super().cleanup()  # type: ignore[no-untyped-call]
        await self._close(drain=False)
