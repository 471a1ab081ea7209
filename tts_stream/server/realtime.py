"""The local server's realtime endpoint: ``GET /api-ws/v1/realtime?model=M`` (protocol.md §5).

Role: one :class:`Session` per WebSocket. The handler coroutine reads client events; a worker
task (same TaskGroup) synthesizes committed segments one response at a time, so text can be
appended while audio streams. No thread per session: synthesis backends are async
iterators (espeak hops to a worker thread per clause, the tone backend is pure numpy).

Boundary: aiohttp WebSocket I/O in, events built here, voice lookups through
:class:`~tts_stream.server.voices.VoiceStore`, PCM from a
:class:`~tts_stream.server.synth.Synthesizer`. Faults come from a
:class:`~tts_stream.server.faults.FaultPlan` taken at the handshake.

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
import enum
import logging
import secrets
import string
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson
import pybase64
from aiohttp import WSMsgType, web

from ..errors import ProtocolViolation
from ..messages import (
    LANGUAGE_TYPES,
    MODES,
    RESPONSE_FORMATS,
    SAMPLE_RATES,
    VC_MODELS,
    InputTextBufferAppend,
    SessionUpdate,
    UnknownEvent,
    billable_characters,
    parse_client_event,
)
from .encode import DEFAULT_BIT_RATE_KBPS, make_encoder
from .faults import Counters, FaultPlan, Faults
from .likeness import SpeakerFeatures
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

# Built-in voices of the Qwen-TTS flash models: rejected by the VC models (§5.1, §5.9).
SYSTEM_VOICES = frozenset(
    v.lower()
    for v in (
        "Cherry", "Serena", "Ethan", "Chelsie", "Momo", "Vivian", "Moon", "Maia", "Kai",
        "Nofish", "Bella", "Jennifer", "Ryan", "Katerina", "Aiden", "Eldric Sage", "Mia",
        "Mochi", "Bellona", "Vincent", "Bunny", "Neil", "Elias", "Arthur", "Nini", "Ebona",
        "Seren", "Pip", "Stella", "Dylan", "Jada", "Sunny", "Li", "Marcus", "Roy", "Peter",
        "Rocky", "Kiki", "Eric",
    )
)  # fmt: skip

_MSG_NOT_SUPPORTED = "The requested voice '{}' is not supported."
_MSG_ENGINE_411 = "[qwen-tts:]Engine return error code: 411"
_MSG_STARTED = "Session update error: session already started or finished or failed."
_MSG_EMPTY = "Input text buffer is empty."
_CANONICAL_LANG = {t.lower(): t for t in LANGUAGE_TYPES}
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
_TOUCH_EVERY_S = 60.0  # voice last-used bookkeeping: at most one write per session per minute


def handshake_error_body(status: int, request_id: str) -> dict[str, str]:
    """DashScope-style JSON body for a refused upgrade (§3.2, §7.1)."""
    code, message = _HANDSHAKE_ERRORS.get(status, ("InternalError", f"HTTP {status}"))
    return {"request_id": request_id, "code": code, "message": message}


@dataclass(frozen=True, kw_only=True)
class RealtimeConfig:
    """Behaviour knobs of the realtime endpoint (see the module docstring)."""

    pacing: Literal["burst", "realtime"] = "burst"
    delta_ms: float = 100.0
    cut_punctuation: str = "。！？!?；;.\n"
    cut_max_chars: int = 120
    cut_idle_s: float | None = 1.0
    cancel: Literal["error", "truncate"] = "error"
    session_timeout_s: float = 600.0
    close_timeout_s: float = 5.0
    max_pending_segments: int = 64
    max_buffer_chars: int = 100_000
    default_voice: str = "Cherry"
    models: tuple[str, ...] = VC_MODELS


class SessionState(enum.Enum):
    OPEN = "open"  # configurable
    STARTED = "started"  # a response was queued: session.update refused
    FINISHING = "finishing"  # session.finish received
    CLOSED = "closed"


_B62 = (string.digits + string.ascii_letters).encode()


class _Ids:
    """OpenAI-style ids: ``prefix_`` + 21 base62 characters (§5.3).

    13 random characters per session plus an 8-character counter: unique within the session,
    opaque, and a few hundred nanoseconds per id on the delta hot path.
    """

    __slots__ = ("_n", "_stem")

    def __init__(self) -> None:
        self._stem = bytes(secrets.choice(_B62) for _ in range(13))
        self._n = secrets.randbelow(62**7)

    def next(self) -> bytes:
        self._n += 1
        n, out = self._n, bytearray(8)
        for i in range(7, -1, -1):
            n, r = divmod(n, 62)
            out[i] = _B62[r]
        return self._stem + bytes(out)

    def make(self, prefix: str) -> str:
        return prefix + self.next().decode()


@dataclass(frozen=True)
class _Segment:
    text: str


_FINISH = object()


class _SessionOver(Exception):
    """Raised inside the worker when a fault or the peer ended the session."""


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
    """One realtime WebSocket session (see the module docstring for the rules)."""

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
        self.model = model
        self.plan = plan
        self.ids = _Ids()
        self.state = SessionState.OPEN
        self.session_id = self.ids.make("sess_")
        self.settings: dict[str, Any] = {
            "voice": self.cfg.default_voice,
            "mode": "server_commit",
            "language_type": "Auto",
            "response_format": "pcm",
            "sample_rate": 24000,
        }
        self.extra_keys: list[str] = []  # keys the client set beyond the documented ones
        self.voice: StoredVoice | None = None
        self.parts: list[str] = []
        self.buffered = 0
        self.last_append = 0.0
        self.queue: asyncio.Queue[object] = asyncio.Queue(self.cfg.max_pending_segments)
        self.deltas = 0
        self.stalled = False
        self.server_closing = False
        self.responding = False
        self.cancel_requested = False
        self.error_fired = False
        self.last_touch = -1e18
        self.loop = asyncio.get_running_loop()

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._send_obj({"type": "session.created", "session": self._created_view()})
            await self._maybe_inject("session.created")
            if self.model not in self.cfg.models:
                log.info("unknown model %r: closing after session.created", self.model)
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
            self.state = SessionState.CLOSED

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

    async def _send_obj(self, event: dict[str, Any]) -> None:
        eid = "event_" + self.ids.next().decode()
        await self._send_raw(orjson.dumps({"event_id": eid, **event}))

    async def _send_error(
        self,
        code: str,
        message: str,
        *,
        param: str | None = None,
        client_event_id: str | None = None,
        typed: bool = True,
    ) -> None:
        err: dict[str, Any] = {}
        if typed:
            err["type"] = "invalid_request_error"
        err["code"] = code
        err["message"] = message
        if param is not None:
            err["param"] = param
        if client_event_id:
            err["event_id"] = client_event_id
        self.svc.counters.errors_sent += 1
        await self._send_obj({"type": "error", "error": err})

    async def _maybe_inject(self, step: str) -> bool:
        """Send the injected error for ``step`` if the plan says so; True if it replaced it."""
        if self.error_fired or self.plan.error_event_at != step:
            return False
        self.error_fired = True
        await self._send_error(self.plan.error_code, self.plan.error_message, typed=False)
        if self.plan.error_close_code is not None:
            await self._close(self.plan.error_close_code, "fault injected")
            raise _SessionOver
        return True

    # --- reading --------------------------------------------------------------------------------

    async def _read(self) -> None:
        cfg = self.cfg
        while True:
            timeout = cfg.session_timeout_s
            idle_cut = (
                cfg.cut_idle_s is not None
                and self.buffered
                and self.settings["mode"] == "server_commit"
                and self.state is not SessionState.FINISHING
            )
            if idle_cut:
                assert cfg.cut_idle_s is not None
                timeout = max(0.001, self.last_append + cfg.cut_idle_s - self.loop.time())
            try:
                msg = await self.ws.receive(timeout=timeout)
            except TimeoutError:
                if idle_cut:
                    await self._cut()
                    continue
                log.info("session %s idle for %.0f s: closing", self.session_id, timeout)
                await self._close(1000, "idle timeout")
                return
            if msg.type is WSMsgType.TEXT:
                self.svc.counters.client_events += 1
                await self._on_frame(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await self._send_error("invalid_value", "Binary frames are not supported.")
            else:  # CLOSE, CLOSING, CLOSED, ERROR
                return

    async def _on_frame(self, data: str | bytes) -> None:
        try:
            event = parse_client_event(data)
        except ProtocolViolation as exc:
            await self._send_error("invalid_value", f"Invalid event: {exc}")
            return
        eid = event.event_id
        kind = event.type
        if isinstance(event, UnknownEvent) or (
            kind == "response.cancel" and self.cfg.cancel == "error"
        ):
            await self._send_error(
                "invalid_value", f"Unsupported event type: '{kind}'.", client_event_id=eid
            )
            return
        if self.state is SessionState.FINISHING:
            await self._send_error(
                "invalid_value", "Session is finishing: no more events accepted.",
                client_event_id=eid,
            )  # fmt: skip
            return
        if isinstance(event, SessionUpdate):
            if not await self._maybe_inject("session.update"):
                await self._on_update(event.session, eid)
        elif isinstance(event, InputTextBufferAppend):
            if not await self._maybe_inject("append"):
                await self._on_append(event.text, eid)
        elif kind == "input_text_buffer.commit":
            if not await self._maybe_inject("commit"):
                if not self.buffered:
                    await self._send_error("invalid_value", _MSG_EMPTY, client_event_id=eid)
                else:
                    await self._cut()
        elif kind == "input_text_buffer.clear":
            if not await self._maybe_inject("clear"):
                self.parts.clear()
                self.buffered = 0
                await self._send_obj({"type": "input_text_buffer.cleared"})
        elif kind == "session.finish":
            if not await self._maybe_inject("finish"):
                if self.buffered:
                    await self._cut()
                self.state = SessionState.FINISHING
                await self.queue.put(_FINISH)
        elif kind == "response.cancel":
            if self.responding:
                self.cancel_requested = True
            else:
                await self._send_error(
                    "invalid_value", "Cancellation failed: no active response found.",
                    client_event_id=eid,
                )  # fmt: skip

    async def _on_append(self, text: str, eid: str) -> None:
        if not text or (self.plan.ignore_appends_during_response and self.responding):
            return
        if self.buffered + len(text) > self.cfg.max_buffer_chars:
            await self._send_error(
                "invalid_value",
                f"Input text buffer is full ({self.cfg.max_buffer_chars} characters).",
                client_event_id=eid,
            )
            return
        self.parts.append(text)
        self.buffered += len(text)
        self.last_append = self.loop.time()
        if self.settings["mode"] == "server_commit" and (
            text[-1] in self.cfg.cut_punctuation or self.buffered >= self.cfg.cut_max_chars
        ):
            await self._cut()

    async def _cut(self) -> None:
        """Turn the buffer into a segment for the worker."""
        text = "".join(self.parts)
        self.parts.clear()
        self.buffered = 0
        if self.voice is None:
            # No cloned voice configured: what the VC models answer for a system voice (§5.9).
            await self._send_error("invalid_value", _MSG_ENGINE_411, param="session.voice")
            return
        self.state = SessionState.STARTED
        await self.queue.put(_Segment(text))

    async def _on_update(self, upd: dict[str, Any], eid: str) -> None:
        if self.state is not SessionState.OPEN:
            await self._send_error("invalid_value", _MSG_STARTED, client_event_id=eid)
            return
        new = dict(self.settings)
        for key, value in upd.items():
            problem = _check_setting(key, value)
            if problem is not None:
                message, param = problem
                await self._send_error("invalid_value", message, param=param, client_event_id=eid)
                return
            if key == "model":
                continue  # sent by some clients; the URL's model rules
            if key == "language_type":
                value = _CANONICAL_LANG[value.lower()]
            new[key] = value
        voice = self.voice
        if "voice" in upd:
            name = upd["voice"]
            if name.lower() in SYSTEM_VOICES:
                await self._send_error(
                    "invalid_value", _MSG_ENGINE_411, param="session.voice", client_event_id=eid
                )
                return
            voice = self.svc.store.get(self.owner, name, now=self.svc.clock())
            if voice is None or voice.target_model != self.model:
                await self._send_error(
                    "invalid_value", _MSG_NOT_SUPPORTED.format(name), param="session.voice",
                    client_event_id=eid,
                )  # fmt: skip
                return
        self.voice = voice
        for key in upd:
            if key not in _DOCUMENTED_KEYS and key != "model" and key not in self.extra_keys:
                self.extra_keys.append(key)
        self.settings = new
        await self._send_obj({"type": "session.updated", "session": self._updated_view()})

    def _created_view(self) -> dict[str, Any]:
        s = self.settings
        return {
            "object": "realtime.session",
            "mode": s["mode"],
            "model": self.model,
            "voice": s["voice"],
            "response_format": s["response_format"],
            "sample_rate": s["sample_rate"],
            "id": self.session_id,
        }

    def _updated_view(self) -> dict[str, Any]:
        s = self.settings
        view: dict[str, Any] = {"id": self.session_id, "object": "realtime.session",
                                "model": self.model}  # fmt: skip
        for key in _DOCUMENTED_KEYS:
            view[key] = s[key]
        for key in self.extra_keys:
            view[key] = s[key]
        return view

    # --- the worker: one response at a time -----------------------------------------------------

    async def _work(self) -> None:
        try:
            while True:
                try:
                    async with asyncio.timeout(self.cfg.session_timeout_s):
                        item = await self.queue.get()
                except TimeoutError:
                    continue  # the reader owns idle handling; just wait again
                if item is _FINISH:
                    await self._send_obj({"type": "session.finished"})
                    self.svc.counters.sessions_finished += 1
                    await self._close(1000, "")
                    return
                assert isinstance(item, _Segment)
                await self._respond(item.text)
        except _CloseNow as exc:
            await self._close(exc.code, exc.reason)
        except (ConnectionError, _SessionOver):
            # Dropped, stalled (the socket stays open and silent; the reader keeps reading
            # until the client or a shutdown closes it), or the peer went away.
            pass

    async def _respond(self, text: str) -> None:
        ids, plan = self.ids, self.plan
        rid, iid = ids.make("resp_"), ids.make("item_")
        voice = self.voice
        assert voice is not None
        vname = voice.name
        now = self.svc.clock()
        if now - self.last_touch >= _TOUCH_EVERY_S:
            self.last_touch = now
            self.svc.store.touch(self.owner, vname, now=now)
        if not plan.omit_committed:
            await self._send_obj({"type": "input_text_buffer.committed", "item_id": ""})
            if plan.duplicate_committed:
                await self._send_obj({"type": "input_text_buffer.committed", "item_id": ""})
        await self._send_obj({"type": "response.created", "response": {
            "id": rid, "object": "realtime.response", "conversation_id": "",
            "status": "in_progress", "voice": vname, "output": []}})  # fmt: skip
        await self._send_obj({"type": "response.output_item.added", "response_id": rid,
            "output_index": 0, "item": {"id": iid, "object": "realtime.item", "type": "message",
            "status": "in_progress", "role": "assistant", "content": []}})  # fmt: skip
        part = {"type": "audio", "text": ""}
        await self._send_obj({"type": "response.content_part.added", "response_id": rid,
            "item_id": iid, "output_index": 0, "content_index": 0, "part": part})  # fmt: skip
        self.responding = True
        self.cancel_requested = False
        failure: SynthesisError | None = None
        try:
            completed = await self._stream_audio(text, rid, iid, voice)
        except SynthesisError as exc:  # over capacity, or the engine failed: say so, then close
            completed, failure = False, exc
        finally:
            self.responding = False
        if failure is not None:
            code = failure.code if isinstance(failure, SynthesisBusy) else "InternalError"
            await self._send_error(code, str(failure), typed=False)
        status = "failed" if failure else "completed" if completed else "incomplete"
        refs = {"response_id": rid, "item_id": iid, "output_index": 0, "content_index": 0}
        await self._send_obj({"type": "response.audio.done", **refs})
        await self._send_obj({"type": "response.content_part.done", **refs, "part": part})
        await self._send_obj({"type": "response.output_item.done", "response_id": rid,
            "output_index": 0, "item": {"id": iid, "object": "realtime.item", "type": "message",
            "status": status, "role": "assistant", "content": [part]}})  # fmt: skip
        response: dict[str, Any] = {
            "id": rid, "object": "realtime.response", "conversation_id": "", "status": status,
            "modalities": ["text", "audio"], "voice": vname,
            "output": [{"id": iid, "object": "realtime.item", "type": "message",
                        "status": status, "role": "assistant",
                        "content": [{"type": "audio", "transcript": ""}]}],
            "usage": {"characters": billable_characters(text)},
        }  # fmt: skip
        if failure is not None:
            response["status_details"] = {"type": "failed", "error": {"code": code}}
        elif not completed:
            response["status_details"] = {"type": "incomplete", "reason": "client_cancelled"}
        await self._send_obj({"type": "response.done", "response": response})
        self.svc.counters.responses += 1
        if failure is not None:
            raise _CloseNow(1013 if isinstance(failure, SynthesisBusy) else 1011, "synthesis")

    async def _stream_audio(self, text: str, rid: str, iid: str, voice: StoredVoice) -> bool:
        """Send the deltas of one response; False when it was cancelled."""
        s, plan, counters = self.settings, self.plan, self.svc.counters
        rate: int = s["sample_rate"]
        delta_bytes = max(2, int(rate * self.cfg.delta_ms / 1000)) * 2
        head = (
            f'","type":"response.audio.delta","response_id":"{rid}","item_id":"{iid}",'
            '"output_index":0,"content_index":0,'
        ).encode()
        realtime = self.cfg.pacing == "realtime"
        interval = plan.delta_interval_s
        error_delta = plan.error_delta
        gain = s.get("volume", 50) / 50.0
        pitch = voice.pitch_hz
        if pitch is not None:
            pitch *= float(s.get("pitch_rate", 1.0))
        features = SpeakerFeatures.from_json(voice.features) if voice.features else None
        if features is not None:  # the enrolled figures win over the rough pitch estimate
            pitch = features.f0_median_hz * float(s.get("pitch_rate", 1.0))
        profile = VoiceProfile(pitch_hz=pitch, speech_rate=float(s.get("speech_rate", 1.0)),
                               features=features)  # fmt: skip
        buf = bytearray()  # wire bytes not yet sent
        fmt = s["response_format"]
        if fmt == "wav":
            buf += _wav_header(rate)
        header_left = len(buf)
        encoder = (
            make_encoder(fmt, rate, int(s.get("bit_rate", DEFAULT_BIT_RATE_KBPS)))
            if fmt in ("mp3", "opus")
            else None
        )
        pcm = bytearray()  # encoded formats: PCM not yet given to the encoder
        fed = 0  # encoded formats: PCM bytes encoded since the last delta
        sent_bytes = 0  # audio bytes of this response already sent (pacing clock)
        k = 0  # deltas of this response
        t0 = 0.0
        stream = self.svc.synthesizer.stream(
            text, sample_rate=rate, language=s["language_type"], profile=profile
        )
        loop = self.loop

        async def send(nbytes: int, audio_bytes: int | None = None) -> None:
            """Send the first ``nbytes`` of ``buf`` as one delta, on schedule; it carries
            ``audio_bytes`` of PCM (default: the bytes themselves, after any header)."""
            nonlocal sent_bytes, k, t0, header_left
            if self.deltas == 0:
                self._after_delta(0)  # a count of 0 means: before the session's first audio
            if k == 0:
                if plan.first_audio_delay_s > 0:
                    await asyncio.sleep(plan.first_audio_delay_s)
                t0 = loop.time()
            else:
                # Absolute schedule (start + audio sent / rate), never a sum of sleeps.
                target = t0 + (sent_bytes / 2 / rate if realtime else 0.0)
                if interval > 0:
                    target = max(target, t0 + k * interval)
                delay = target - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            n = self.deltas + 1
            if error_delta == n:
                await self._maybe_inject(plan.error_event_at or "")
            stamp = (
                b'"x_sent_monotonic":' + repr(time.monotonic()).encode() + b","
                if plan.stamp_deltas
                else b""
            )
            # Encode straight from the buffer (no intermediate copy), then drop those bytes.
            with memoryview(buf) as view, view[:nbytes] as piece:
                encoded = pybase64.b64encode(piece)
            del buf[:nbytes]
            frame = b"".join((b'{"event_id":"event_', self.ids.next(), head, stamp,
                              b'"delta":"', encoded, b'"}'))  # fmt: skip
            await self._send_raw(frame)
            audio = max(0, nbytes - header_left) if audio_bytes is None else audio_bytes
            header_left = max(0, header_left - nbytes)
            sent_bytes += audio
            k += 1
            self.deltas = n
            counters.deltas_sent += 1
            counters.audio_samples_sent += audio // 2
            self._after_delta(n)

        async def send_encoded(last: bool) -> None:
            """Encode the PCM held back (whole deltas, or all of it when ``last``); send
            what the encoder has ready as one delta (compressed deltas vary in size)."""
            nonlocal fed
            assert encoder is not None
            while len(pcm) >= delta_bytes or (last and pcm):
                n = min(delta_bytes, len(pcm))
                buf.extend(encoder.encode(pcm[:n]))
                del pcm[:n]
                fed += n
                if buf and not last:
                    await send(len(buf), fed)
                    fed = 0
                if self.cancel_requested:
                    return
            if last:
                buf.extend(encoder.flush())
                if buf:
                    await send(len(buf), fed)
                    fed = 0

        try:
            async for chunk in stream:
                if self.cancel_requested:
                    return False
                if gain != 1.0:
                    chunk = np.clip(chunk * gain, -32768, 32767).astype(np.int16)
                data = np.ascontiguousarray(chunk, dtype="<i2").data.cast("B")
                if encoder is not None:
                    pcm.extend(data)
                    await send_encoded(last=False)
                    continue
                buf += data
                while len(buf) >= delta_bytes:
                    await send(delta_bytes)
                    if self.cancel_requested:
                        return False
            if self.cancel_requested:
                return False
            if encoder is not None:
                await send_encoded(last=True)
            elif buf:
                await send(len(buf))
            return not self.cancel_requested
        finally:
            if encoder is not None:
                encoder.close()
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

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


class _CloseNow(_SessionOver):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code, self.reason = code, reason


_DOCUMENTED_KEYS = ("voice", "language_type", "mode", "response_format", "sample_rate")
_RANGES: dict[str, tuple[float, float, bool]] = {
    "speech_rate": (0.5, 2.0, False),
    "pitch_rate": (0.5, 2.0, False),
    "volume": (0, 100, True),
    "bit_rate": (6, 510, True),
}


def _fmt_values(values: tuple[Any, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def _check_setting(key: str, value: Any) -> tuple[str, str] | None:
    """``(message, param)`` when ``session.<key> = value`` is not acceptable, else None."""
    param = f"session.{key}"
    if key == "voice":
        if not isinstance(value, str) or not value:
            return "Invalid value: voice must be a non-empty string.", param
    elif key == "mode":
        if value not in MODES:
            return f"Invalid value: '{value}'. Supported values are: {_fmt_values(MODES)}.", param
    elif key == "language_type":
        if not isinstance(value, str) or value.lower() not in _CANONICAL_LANG:
            return (
                f"Invalid value: '{value}'. Supported values are: {_fmt_values(LANGUAGE_TYPES)}.",
                param,
            )
    elif key == "response_format":
        if value not in RESPONSE_FORMATS:
            return (
                f"Invalid value: '{value}'. Supported values are: {_fmt_values(RESPONSE_FORMATS)}.",
                param,
            )
    elif key == "sample_rate":
        if isinstance(value, bool) or value not in SAMPLE_RATES:
            return (
                f"Invalid value: '{value}'. Supported values are: {_fmt_values(SAMPLE_RATES)}.",
                param,
            )
    elif key in _RANGES:
        lo, hi, integral = _RANGES[key]
        ok_type = isinstance(value, int) if integral else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type or not lo <= value <= hi:
            return f"Invalid value: {value!r}. Supported range is [{lo:g}, {hi:g}].", param
    elif key in ("enable_tn", "optimize_instructions"):
        if not isinstance(value, bool):
            return f"Invalid value: {value!r}. Expected a boolean.", param
    elif key == "instructions":
        if not isinstance(value, str):
            return f"Invalid value: {value!r}. Expected a string.", param
    return None


def _wav_header(rate: int) -> bytes:
    """A streaming RIFF/WAVE header for mono PCM16 with unknown length (§5.8)."""
    return (
        b"RIFF" + struct.pack("<I", _WAV_UNKNOWN) + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data" + struct.pack("<I", _WAV_UNKNOWN)
    )  # fmt: skip
