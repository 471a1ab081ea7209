"""The local server's realtime endpoint: ``GET /api-ws/v1/realtime?model=M`` (protocol.md §5).

Role: the driver of one :class:`Session` per WebSocket. The handler coroutine reads client
frames and feeds them to the session's rules (:class:`~tts_stream.server.session.ServerSession`,
pure); a worker task (same TaskGroup) synthesizes the segments it cuts one response at a time,
so text can be appended while audio streams. No thread per session: synthesis backends are
async iterators (espeak hops to a worker thread per clause, the tone backend is pure numpy).

Boundary: aiohttp WebSocket I/O, the handshake, synthesis scheduling, audio encoding and
pacing, and the fault knobs (a :class:`~tts_stream.server.faults.FaultPlan` taken at the
handshake) live here; what to answer to which event lives in ``session.py``. Voice lookups go
through :class:`~tts_stream.server.voices.VoiceStore`, PCM comes from a
:class:`~tts_stream.server.synth.Synthesizer`.

Choices where protocol.md leaves the behaviour open (§9):

* ``server_commit`` cut rule (configurable, :class:`RealtimeConfig`): a segment is cut when
  the buffer *ends* with sentence punctuation (``。！？!?；;.`` or a newline), when it reaches
  ``cut_max_chars``, or after ``cut_idle_s`` without an append. ``input_text_buffer.committed``
  precedes every response (also automatic cuts and the implicit one at ``session.finish``);
  it is sent right before ``response.created``, so one response's events never interleave.
* Unknown model: ``session.created`` is sent, then the socket closes with 1000 (§5.2).
* Default voice in ``session.created``: ``Cherry`` (the documented legacy default). Text
  committed before a valid cloned voice is set gets the engine-411 ``error`` and is dropped.
* ``session.update`` is atomic (one bad key rejects the whole update) and partial (keys not
  sent keep their value); ``session.updated`` echoes the effective configuration: the
  documented eight keys plus every key the client ever set. Refused once a response has
  been queued.
* ``response_format``: every documented one. ``pcm``; ``wav`` (each response's audio
  starts with one 44-byte RIFF header whose size fields are 0xFFFFFFFF, streaming style,
  then PCM); ``mp3`` and ``opus`` (Ogg): one encoded stream per response
  (:mod:`~tts_stream.server.encode`), each delta the bytes the encoder had ready after the
  next ``delta_ms`` of audio. ``bit_rate`` sets the opus rate; mp3 stays at 128 kbit/s
  (§5.4: ``bit_rate`` is only meaningful for opus).
* ``volume`` scales the samples (50 = unity); ``pitch_rate`` scales the voice's pitch;
  ``speech_rate`` scales the speaking rate (espeak words per minute, tone duration).
* ``response.cancel``: ``cancel="error"`` (default) answers ``error`` "Unsupported event
  type" like any unknown event; ``cancel="truncate"`` stops the current response's audio
  and ends it with ``response.done`` status ``incomplete``.
* Audio: deltas of ``delta_ms`` (default 100 ms) of PCM16 at the session's ``sample_rate``,
  base64 in one pre-built frame (orjson/pybase64, no per-delta dict). ``pacing="burst"``
  sends them as fast as they are synthesized; ``pacing="realtime"`` sends delta *k* at
  ``start + audio_sent_before_k / rate`` (absolute schedule, never a sum of sleeps).
* Malformed JSON, binary frames, unknown events: an ``error`` event; the session goes on.
* Idle: no client frame for ``session_timeout_s`` closes the session with 1000. Text beyond
  ``max_buffer_chars`` in the input buffer is refused with an ``error``.
* Handshake: no valid ``Authorization: Bearer`` key → HTTP 401 ``InvalidApiKey``; no
  ``model`` query parameter or no upgrade → HTTP 400 ``InvalidParameter`` (JSON bodies).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import struct
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import orjson
import pybase64
from aiohttp import WSMsgType, web

from ..audio import PCM16
from ..errors import ProtocolViolation
from ..messages import (
    ClientEvent,
    Error,
    InputTextBufferAppend,
    InputTextBufferCommitted,
    ResponseDone,
    ServerEvent,
    SessionFinished,
    UnknownEvent,
    parse_client_event,
    to_dict,
)
from .encode import DEFAULT_BIT_RATE_KBPS, Encoder, make_encoder
from .faults import Counters, FaultPlan, Faults
from .likeness import SpeakerFeatures
from .pacer import Pacer
from .session import (
    SYSTEM_VOICES,
    Close,
    DeltaFrames,
    Failure,
    Finish,
    LookUpVoice,
    Output,
    RealtimeConfig,
    Response,
    ServerSession,
    SessionState,
    StopAudio,
    Synthesize,
)
from .synth import SynthesisBusy, SynthesisError, Synthesizer, VoiceProfile
from .voices import StoredVoice, VoiceStore

__all__ = [
    "SYSTEM_VOICES",
    "RealtimeConfig",
    "RealtimeService",
    "Session",
    "SessionState",
    "handshake_error_body",
]

log = logging.getLogger(__name__)

_HANDSHAKE_ERRORS = {
    400: ("InvalidParameter",
          "Required parameter(model) missing or invalid, please check the request parameters."),
    401: ("InvalidApiKey", "Invalid API-key provided."),
    403: ("AccessDenied", "Access denied."),
    429: ("Throttling.RateQuota", "Requests rate limit exceeded, please try again later."),
    500: ("InternalError", "An internal error has occured, please try again later."),
    503: ("ServiceUnavailable", "Service temporarily unavailable, please try again later."),
}  # fmt: skip
_WAV_UNKNOWN = 0xFFFFFFFF
_LATE_S = 0.020  # a delta sent this long after its due time counts as late (ServerStats)
_HIGH_WATER = 256 * 1024  # unsent bytes past which a response waits (aiohttp's writer limit)
_DRAIN_POLL_S = 0.005
_TOUCH_EVERY_S = 60.0  # voice last-used bookkeeping: at most one write per session per minute
# The client events ``error_event_at`` can replace (faults.py), by event type.
_FAULT_STEPS = {
    "session.update": "session.update",
    "input_text_buffer.append": "append",
    "input_text_buffer.commit": "commit",
    "input_text_buffer.clear": "clear",
    "session.finish": "finish",
}

_Job = Synthesize[StoredVoice] | Finish


def handshake_error_body(status: int, request_id: str) -> dict[str, str]:
    """DashScope-style JSON body for a refused upgrade (§3.2, §7.1)."""
    code, message = _HANDSHAKE_ERRORS.get(status, ("InternalError", f"HTTP {status}"))
    return {"request_id": request_id, "code": code, "message": message}


class _SessionOver(Exception):
    """Raised inside the worker when a fault or the peer ended the session."""


class _CloseNow(_SessionOver):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code, self.reason = code, reason


class RealtimeService:
    """Everything the realtime endpoint shares across sessions."""

    def __init__(
        self,
        *,
        config: RealtimeConfig,
        store: VoiceStore,
        synthesizer: Synthesizer,
        faults: Faults,
        counters: Counters,
        authenticate: Callable[[str | None], str | None],
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.store = store
        self.synthesizer = synthesizer
        self.faults = faults
        self.counters = counters
        self.authenticate = authenticate
        self.clock = clock
        self.sessions: set[Session] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The aiohttp handler of ``GET /api-ws/v1/realtime``."""
        self.counters.handshakes += 1
        owner = self.authenticate(request.headers.get("Authorization"))
        if owner is None:
            return self._refuse(401)
        model = request.query.get("model", "")
        if not model:
            return self._refuse(400)
        plan = self.faults.take_session()
        if plan.refuse_handshake is not None:
            return self._refuse(plan.refuse_handshake)
        ws = web.WebSocketResponse(
            compress=False,
            autoping=True,
            heartbeat=None,
            timeout=self.config.close_timeout_s,
            max_msg_size=16 * 1024 * 1024,
            decode_text=False,
        )
        if not ws.can_prepare(request).ok:
            return self._refuse(400, "Expected a WebSocket upgrade request.")
        await ws.prepare(request)
        session = Session(self, ws, request, owner=owner, model=model, plan=plan)
        self.counters.sessions_opened += 1
        self.counters.sessions_active += 1
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            self.counters.sessions_active -= 1
        return ws

    def _refuse(self, status: int, message: str | None = None) -> web.Response:
        self.counters.handshakes_refused += 1
        rid = str(uuid.uuid4())
        body = handshake_error_body(status, rid)
        if message is not None:
            body["message"] = message
        return web.json_response(body, status=status, headers={"x-request-id": rid})

    async def close_all(self) -> None:
        """Close every open session with 1001 (server shutdown), bounded in time."""
        sessions = list(self.sessions)
        if not sessions:
            return
        try:
            async with asyncio.timeout(self.config.close_timeout_s + 1.0):
                async with asyncio.TaskGroup() as tg:
                    for s in sessions:
                        tg.create_task(s.shutdown())
        except TimeoutError:
            # aiohttp's own shutdown timeout cancels whatever handler is still running.
            log.warning("%d session(s) did not close in time", len(self.sessions))


class Session:
    """The driver of one realtime WebSocket session (the rules are ``self.machine``'s)."""

    def __init__(
        self,
        service: RealtimeService,
        ws: web.WebSocketResponse,
        request: web.Request,
        *,
        owner: str,
        model: str,
        plan: FaultPlan,
    ) -> None:
        self.svc = service
        self.cfg = service.config
        self.ws = ws
        self.request = request
        self.owner = owner
        self.plan = plan
        self.machine: ServerSession[StoredVoice] = ServerSession(model=model, config=self.cfg)
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(self.cfg.max_pending_segments)
        self.deltas = 0
        self.stalled = False
        self.server_closing = False
        self.cancelled: str | None = None  # the response whose audio response.cancel stopped
        self.error_fired = False
        self.last_touch = -1e18
        self.loop = asyncio.get_running_loop()

    @property
    def state(self) -> SessionState:
        return self.machine.state

    @property
    def responding(self) -> bool:
        """True while a response is being generated."""
        return self.machine.responding

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._send_event(self.machine.created())
            await self._maybe_inject("session.created")
            if not self.machine.model_known:
                log.info("unknown model %r: closing after session.created", self.machine.model)
                await self._close(1000, "")
                return
            async with asyncio.TaskGroup() as tg:
                worker = tg.create_task(self._work())
                try:
                    await self._read()
                finally:
                    if self.server_closing and not worker.done():
                        # The worker is closing the socket itself (finish or a fault): let it.
                        await asyncio.wait({worker}, timeout=self.cfg.close_timeout_s)
                    worker.cancel()
        except (ConnectionError, _SessionOver):
            pass
        finally:
            self.machine.close()

    async def shutdown(self) -> None:
        """Close with 1001 (server going away)."""
        self.server_closing = True
        await self._close(1001, "server shutdown")

    async def _close(self, code: int, reason: str) -> None:
        self.server_closing = True
        try:
            await self.ws.close(code=code, message=reason.encode())
        except ConnectionError:
            pass

    def _drop(self) -> None:
        """Abrupt close: no WebSocket close frame (the client sees 1006)."""
        self.server_closing = True
        transport = self.request.transport
        if transport is None:
            return
        # abort() discards unsent bytes; close() flushes them first. Either way no close frame
        # follows, because nothing else writes on this socket after this point.
        if transport.get_write_buffer_size() == 0:
            transport.abort()
        else:
            transport.close()

    # --- sending --------------------------------------------------------------------------------

    async def _send_raw(self, data: bytes) -> None:
        if self.stalled:
            return
        await self.ws.send_frame(data, WSMsgType.TEXT)

    async def _send_delta(self, frame: bytes) -> None:
        """Write one delta's whole WebSocket frame (``DeltaFrames.ws_frame``) to the transport.

        Deltas are most of the traffic: one ``transport.write`` instead of aiohttp's three
        coroutine layers and its header + payload copy. Safe next to aiohttp's own writes
        (other events, pongs, the close frame): each is one synchronous transport write of a
        whole frame, and no delta follows a close (``ws.closed`` is set before aiohttp
        writes its close frame). Flow control as aiohttp's: past ``_HIGH_WATER`` unsent
        bytes this response waits until the client has read them.
        """
        if self.stalled:
            return
        transport = self.request.transport
        if self.ws.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        transport.write(frame)
        if transport.get_write_buffer_size() > _HIGH_WATER:
            await self._drain(transport)

    async def _drain(self, transport: asyncio.Transport) -> None:
        """Wait until the client has read the bytes held back (a slow or stopped reader)."""
        while transport.get_write_buffer_size() > _HIGH_WATER // 2:
            if transport.is_closing():
                raise ConnectionResetError("Cannot write to closing transport")
            await asyncio.sleep(_DRAIN_POLL_S)

    async def _send_event(self, event: ServerEvent) -> None:
        counters = self.svc.counters
        if isinstance(event, Error):
            counters.errors_sent += 1
        await self._send_raw(orjson.dumps(to_dict(event)))
        if isinstance(event, ResponseDone):
            counters.responses += 1
        elif isinstance(event, SessionFinished):
            counters.sessions_finished += 1

    async def _emit(self, outputs: Iterable[Output]) -> None:
        """Send the machine's events and carry out its commands, in order."""
        for out in outputs:
            if isinstance(out, ServerEvent):
                await self._send_event(out)
            elif isinstance(out, Synthesize | Finish):
                await self.queue.put(out)  # bounded: a full queue holds the reader back
            elif isinstance(out, LookUpVoice):
                voice = self.svc.store.get(self.owner, out.name, now=self.svc.clock())
                await self._emit(self.machine.voice_found(voice))
            elif isinstance(out, StopAudio):
                self.cancelled = out.response_id
            elif isinstance(out, Close):
                await self._close(out.code, out.reason)
                raise _SessionOver

    async def _maybe_inject(self, step: str) -> bool:
        """Send the injected error for ``step`` if the plan says so; True if it replaced it."""
        if self.error_fired or self.plan.error_event_at != step:
            return False
        self.error_fired = True
        plan = self.plan
        await self._send_event(self.machine.error(plan.error_code, plan.error_message,
                                                  typed=False))  # fmt: skip
        if plan.error_close_code is not None:
            await self._close(plan.error_close_code, "fault injected")
            raise _SessionOver
        return True

    # --- reading --------------------------------------------------------------------------------

    async def _read(self) -> None:
        machine = self.machine
        while True:
            due = machine.idle_cut_at()
            timeout = self.cfg.session_timeout_s
            if due is not None:
                timeout = max(0.001, due - self.loop.time())
            try:
                msg = await self.ws.receive(timeout=timeout)
            except TimeoutError:
                if due is not None:
                    await self._emit(machine.idle())
                    continue
                log.info("session %s idle for %.0f s: closing", machine.session_id, timeout)
                await self._close(1000, "idle timeout")
                return
            if msg.type is WSMsgType.TEXT:
                self.svc.counters.client_events += 1
                await self._on_frame(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await self._send_event(machine.binary_frame())
            else:  # CLOSE, CLOSING, CLOSED, ERROR
                return

    async def _on_frame(self, data: str | bytes) -> None:
        try:
            event = parse_client_event(data)
        except ProtocolViolation as exc:
            await self._send_event(self.machine.malformed(str(exc)))
            return
        refused = self.machine.refusal(event)
        if refused is not None:
            await self._send_event(refused)
        elif not await self._fault_replaces(event):
            await self._emit(self.machine.receive(event, self.loop.time()))

    async def _fault_replaces(self, event: ClientEvent | UnknownEvent) -> bool:
        """True when a fault knob takes the place of ``event``'s own handling."""
        step = _FAULT_STEPS.get(event.type)
        if step is not None and await self._maybe_inject(step):
            return True
        return (
            self.plan.ignore_appends_during_response
            and isinstance(event, InputTextBufferAppend)
            and self.machine.responding
        )

    # --- the worker: one response at a time -----------------------------------------------------

    async def _work(self) -> None:
        try:
            while True:
                try:
                    async with asyncio.timeout(self.cfg.session_timeout_s):
                        job = await self.queue.get()
                except TimeoutError:
                    continue  # the reader owns idle handling; just wait again
                if isinstance(job, Finish):
                    await self._emit(self.machine.finished())
                    return
                await self._respond(job)
        except _CloseNow as exc:
            await self._close(exc.code, exc.reason)
        except (ConnectionError, _SessionOver):
            # Dropped, stalled (the socket stays open and silent; the reader keeps reading
            # until the client or a shutdown closes it), the peer went away, or closed.
            pass

    async def _respond(self, job: Synthesize[StoredVoice]) -> None:
        now = self.svc.clock()
        if now - self.last_touch >= _TOUCH_EVERY_S:
            self.last_touch = now
            self.svc.store.touch(self.owner, job.voice.name, now=now)
        response = self.machine.start_response(job)
        failure: Failure | None = None
        try:
            await self._begin(response.events)
            try:
                completed = await _Audio(self, response).run()
            except SynthesisError as exc:  # over capacity, or the engine failed: say so, close
                completed, failure = False, _failure(exc)
        except BaseException:
            self.machine.abandon_response()
            raise
        await self._emit(self.machine.end_response(completed=completed, failure=failure))

    async def _begin(self, events: list[ServerEvent]) -> None:
        """Send the events before the audio, with the ``committed`` fault knobs."""
        plan = self.plan
        for event in events:
            if isinstance(event, InputTextBufferCommitted):
                if plan.omit_committed:
                    continue
                if plan.duplicate_committed:
                    twin = self.machine.ids.make("event_")
                    await self._send_event(dataclasses.replace(event, event_id=twin))
            await self._send_event(event)

    def _after_delta(self, n: int) -> None:
        """Apply the delta-count faults after the nth delta of the session."""
        plan = self.plan
        if plan.drop_after_deltas is not None and n >= plan.drop_after_deltas:
            self._drop()
            raise _SessionOver
        if plan.close_after_deltas is not None and n >= plan.close_after_deltas:
            raise _CloseNow(plan.close_code, plan.close_reason)
        if plan.stall_after_deltas is not None and n >= plan.stall_after_deltas:
            self.stalled = True
            raise _SessionOver


def _failure(exc: SynthesisError) -> Failure:
    """The ``error`` and close code of a failed synthesis: 1013 when over capacity."""
    if isinstance(exc, SynthesisBusy):
        return Failure(exc.code, str(exc), 1013)
    return Failure("InternalError", str(exc), 1011)


def _profile(voice: StoredVoice, settings: Any) -> VoiceProfile:
    """The synthesis profile of ``voice`` under the session's pitch and speech rates."""
    pitch_rate = float(settings.get("pitch_rate", 1.0))
    pitch = voice.pitch_hz
    if pitch is not None:
        pitch *= pitch_rate
    features = SpeakerFeatures.from_json(voice.features) if voice.features else None
    if features is not None:  # the enrolled figures win over the rough pitch estimate
        pitch = features.f0_median_hz * pitch_rate
    return VoiceProfile(pitch_hz=pitch, speech_rate=float(settings.get("speech_rate", 1.0)),
                        features=features)  # fmt: skip


class _Audio:
    """The deltas of one response: volume, format, pacing and the delta-count faults.

    PCM goes out in deltas of ``delta_ms``; ``wav`` adds one streaming RIFF header in front;
    ``mp3``/``opus`` feed whole deltas of PCM to the encoder and send what it has ready.
    """

    def __init__(self, session: Session, response: Response[StoredVoice]) -> None:
        self.session = session
        self.response_id = response.response_id
        s = response.job.settings
        self.rate: int = s["sample_rate"]
        self.delta_bytes = max(2, int(self.rate * session.cfg.delta_ms / 1000)) * 2
        self.frames = DeltaFrames(session.machine.ids, response.response_id, response.item_id)
        self.gain = s.get("volume", 50) / 50.0
        self.stream = session.svc.synthesizer.stream(
            response.job.text, sample_rate=self.rate, language=s["language_type"],
            profile=_profile(response.job.voice, s),
        )  # fmt: skip
        fmt = s["response_format"]
        self.buf = bytearray(_wav_header(self.rate) if fmt == "wav" else b"")  # unsent bytes
        self.header_left = len(self.buf)
        self.encoder: Encoder | None = (
            make_encoder(fmt, self.rate, int(s.get("bit_rate", DEFAULT_BIT_RATE_KBPS)))
            if fmt in ("mp3", "opus")
            else None
        )
        self.pcm = bytearray()  # encoded formats: PCM not yet given to the encoder
        self.fed = 0  # encoded formats: PCM bytes encoded since the last delta
        self.sent_bytes = 0  # audio bytes of this response already sent (pacing clock)
        self.k = 0  # deltas of this response
        self.t0 = 0.0  # time.monotonic() of the first delta: the schedule's origin
        self.realtime = session.cfg.pacing == "realtime"
        self.pacer = Pacer.for_loop(session.loop)

    @property
    def cancelled(self) -> bool:
        return self.session.cancelled == self.response_id

    async def run(self) -> bool:
        """Send every delta; False when ``response.cancel`` stopped the response."""
        try:
            async for chunk in self.stream:
                if self.cancelled:
                    return False
                await self._feed(self._bytes(chunk))
                if self.cancelled:
                    return False
            if self.encoder is not None:
                await self._encode(last=True)
            elif self.buf:
                await self._send(len(self.buf))
            return not self.cancelled
        finally:
            if self.encoder is not None:
                self.encoder.close()
            aclose = getattr(self.stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def _bytes(self, chunk: PCM16) -> memoryview:
        if self.gain != 1.0:
            chunk = np.clip(chunk * self.gain, -32768, 32767).astype(np.int16)
        return np.ascontiguousarray(chunk, dtype="<i2").data.cast("B")

    async def _feed(self, data: memoryview) -> None:
        if self.encoder is not None:
            self.pcm.extend(data)
            await self._encode(last=False)
            return
        self.buf += data
        while len(self.buf) >= self.delta_bytes and not self.cancelled:
            await self._send(self.delta_bytes)

    async def _encode(self, *, last: bool) -> None:
        """Encode the PCM held back (whole deltas, or all of it when ``last``); send what
        the encoder has ready as one delta (compressed deltas vary in size)."""
        encoder, pcm, buf = self.encoder, self.pcm, self.buf
        assert encoder is not None
        while len(pcm) >= self.delta_bytes or (last and pcm):
            n = min(self.delta_bytes, len(pcm))
            buf.extend(encoder.encode(pcm[:n]))
            del pcm[:n]
            self.fed += n
            if buf and not last:
                await self._send(len(buf), self.fed)
                self.fed = 0
            if self.cancelled:
                return
        if last:
            buf.extend(encoder.flush())
            if buf:
                await self._send(len(buf), self.fed)
                self.fed = 0

    async def _pace(self) -> float | None:
        """Wait until delta ``k`` is due: an absolute schedule, never a sum of sleeps.

        Returns the due time (``time.monotonic()`` seconds) when there is a schedule
        (real-time pacing or ``delta_interval_s``), else None.
        """
        plan = self.session.plan
        if self.k == 0:
            if plan.first_audio_delay_s > 0:
                await asyncio.sleep(plan.first_audio_delay_s)
            self.t0 = time.monotonic()
            return self.t0 if self.realtime else None
        target = self.t0 + self.sent_bytes / 2 / self.rate if self.realtime else None
        if plan.delta_interval_s > 0:
            spaced = self.t0 + self.k * plan.delta_interval_s
            target = spaced if target is None else max(target, spaced)
        if target is not None:
            wake = self.pacer.wait(target)  # one timer per loop, not one per session
            if wake is not None:
                await wake
        return target

    async def _send(self, nbytes: int, audio_bytes: int | None = None) -> None:
        """Send the first ``nbytes`` of ``buf`` as one delta, on schedule; it carries
        ``audio_bytes`` of PCM (default: the bytes themselves, after any header)."""
        session, plan = self.session, self.session.plan
        if session.deltas == 0:
            session._after_delta(0)  # a count of 0 means: before the session's first audio
        due = await self._pace()
        n = session.deltas + 1
        if plan.error_delta == n:
            await session._maybe_inject(plan.error_event_at or "")
        now = time.monotonic()
        if due is not None and now - due > _LATE_S:
            session.svc.counters.count_late(now - due)
        stamp = now if plan.stamp_deltas else None
        # Encode straight from the buffer (no intermediate copy), then drop those bytes.
        with memoryview(self.buf) as view, view[:nbytes] as piece:
            encoded = pybase64.b64encode(piece)
        del self.buf[:nbytes]
        await session._send_delta(self.frames.ws_frame(encoded, stamp))
        audio = max(0, nbytes - self.header_left) if audio_bytes is None else audio_bytes
        self.header_left = max(0, self.header_left - nbytes)
        self.sent_bytes += audio
        self.k += 1
        session.deltas = n
        counters = session.svc.counters
        counters.deltas_sent += 1
        counters.audio_samples_sent += audio // 2
        session._after_delta(n)


def _wav_header(rate: int) -> bytes:
    """A streaming RIFF/WAVE header for mono PCM16 with unknown length (§5.8)."""
    return (
        b"RIFF" + struct.pack("<I", _WAV_UNKNOWN) + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data" + struct.pack("<I", _WAV_UNKNOWN)
    )  # fmt: skip
