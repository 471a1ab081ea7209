"""The local server's realtime session rules, as a pure machine (protocol.md §5.4–§5.9).

Role: what the server answers to each client event, in which order, and when a segment of
text becomes a response, the way :mod:`tts_stream.protocol` keeps the client's side. One
:class:`ServerSession` per WebSocket. :meth:`ServerSession.receive` takes one parsed client
event and the time; it returns server events (the :mod:`tts_stream.messages` dataclasses) to
send now, and commands for the driver (:class:`Synthesize`, :class:`LookUpVoice`,
:class:`StopAudio`, :class:`Finish`, :class:`Close`). The driver runs one response at a
time: :meth:`~ServerSession.start_response` gives the events before the audio,
:meth:`~ServerSession.end_response` those after it; :class:`DeltaFrames` builds the audio
deltas' bytes in between.

Boundary: pure. No asyncio, sockets or clock (time is an argument); no voice store (a
:class:`LookUpVoice` command asks the driver, :meth:`~ServerSession.voice_found` takes the
answer); no fault knobs (the driver in :mod:`~tts_stream.server.realtime` applies them around
these calls). The choices where protocol.md leaves the behaviour open are listed in
``realtime.py``'s docstring; :class:`RealtimeConfig` holds their knobs.
"""

from __future__ import annotations

import enum
import secrets
import string
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

from ..messages import (
    LANGUAGE_TYPES,
    MODES,
    RESPONSE_FORMATS,
    SAMPLE_RATES,
    VC_MODELS,
    ClientEvent,
    Error,
    InputTextBufferAppend,
    InputTextBufferClear,
    InputTextBufferCleared,
    InputTextBufferCommit,
    InputTextBufferCommitted,
    ResponseAudioDelta,
    ResponseAudioDone,
    ResponseCancel,
    ResponseContentPartAdded,
    ResponseContentPartDone,
    ResponseCreated,
    ResponseDone,
    ResponseOutputItemAdded,
    ResponseOutputItemDone,
    ServerEvent,
    SessionCreated,
    SessionFinish,
    SessionFinished,
    SessionUpdate,
    SessionUpdated,
    UnknownEvent,
    billable_characters,
)

__all__ = [
    "SYSTEM_VOICES",
    "Close",
    "Command",
    "DeltaFrames",
    "Failure",
    "Finish",
    "Ids",
    "KnownVoice",
    "LookUpVoice",
    "Output",
    "RealtimeConfig",
    "Response",
    "ServerSession",
    "SessionState",
    "StopAudio",
    "Synthesize",
    "check_setting",
    "ws_text_header",
]

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

# The documented error texts (§5.4, §5.9) and ours where protocol.md has none.
MSG_NOT_SUPPORTED = "The requested voice '{}' is not supported."
MSG_ENGINE_411 = "[qwen-tts:]Engine return error code: 411"
MSG_STARTED = "Session update error: session already started or finished or failed."
MSG_EMPTY = "Input text buffer is empty."
MSG_FULL = "Input text buffer is full ({} characters)."
MSG_UNSUPPORTED = "Unsupported event type: '{}'."
MSG_FINISHING = "Session is finishing: no more events accepted."
MSG_NO_RESPONSE = "Cancellation failed: no active response found."
MSG_BINARY = "Binary frames are not supported."
INVALID = "invalid_value"

_CANONICAL_LANG = {t.lower(): t for t in LANGUAGE_TYPES}
_DOCUMENTED_KEYS = ("voice", "language_type", "mode", "response_format", "sample_rate")
_RANGES: dict[str, tuple[float, float, bool]] = {
    "speech_rate": (0.5, 2.0, False),
    "pitch_rate": (0.5, 2.0, False),
    "volume": (0, 100, True),
    "bit_rate": (6, 510, True),
}


@dataclass(frozen=True, kw_only=True)
class RealtimeConfig:
    """Behaviour knobs of the realtime endpoint (see ``realtime.py``'s docstring).

    The machine reads the cut rule, ``cancel``, ``max_buffer_chars``, ``default_voice`` and
    ``models``; the driver the rest (pacing, delta size, timeouts, queue bound).
    """

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


# --- ids -----------------------------------------------------------------------------------------

_B62 = (string.digits + string.ascii_letters).encode()
_PAIRS = tuple(bytes((a, b)) for a in _B62 for b in _B62)  # "00", "01", ... "ZZ": 62**2


class Ids:
    """OpenAI-style ids: ``prefix_`` + 21 base62 characters (§5.3).

    13 random characters per session plus an 8-character counter: unique within the session,
    opaque, and a few hundred nanoseconds per id on the delta hot path. ``stem`` and ``start``
    fix them (tests).
    """

    __slots__ = ("_n", "_stem")

    def __init__(self, stem: bytes | None = None, start: int | None = None) -> None:
        self._stem = stem if stem is not None else _base62(secrets.randbelow(62**13), 13)
        self._n = start if start is not None else secrets.randbelow(62**7)

    def next(self) -> bytes:
        self._n += 1
        n, d4 = divmod(self._n, 3844)  # two base62 digits at a time (every delta takes an id)
        n, d3 = divmod(n, 3844)
        n, d2 = divmod(n, 3844)
        return b"".join((self._stem, _PAIRS[n % 3844], _PAIRS[d2], _PAIRS[d3], _PAIRS[d4]))

    def make(self, prefix: str) -> str:
        return prefix + self.next().decode()


def _base62(n: int, digits: int) -> bytes:
    out = bytearray(digits)
    for i in range(digits - 1, -1, -1):
        n, r = divmod(n, 62)
        out[i] = _B62[r]
    return bytes(out)


# --- commands ------------------------------------------------------------------------------------


class KnownVoice(Protocol):
    """What the machine reads of a stored voice (``voices.StoredVoice`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def target_model(self) -> str: ...


V = TypeVar("V", bound=KnownVoice)


@dataclass(frozen=True)
class Synthesize(Generic[V]):
    """Queue one response for ``text`` (a segment cut from the buffer)."""

    text: str
    voice: V
    settings: Mapping[str, Any]


@dataclass(frozen=True)
class LookUpVoice:
    """Find the client's voice ``name``; answer with :meth:`ServerSession.voice_found`."""

    name: str


@dataclass(frozen=True)
class StopAudio:
    """Stop the audio of response ``response_id`` (``response.cancel`` in truncate mode)."""

    response_id: str


@dataclass(frozen=True)
class Finish:
    """After the responses already queued: :meth:`ServerSession.finished`."""


@dataclass(frozen=True)
class Close:
    """Close the WebSocket with ``code`` (after the events before it were sent)."""

    code: int
    reason: str = ""


Command = Synthesize[Any] | LookUpVoice | StopAudio | Finish | Close
Output = ServerEvent | Command


@dataclass(frozen=True)
class Failure:
    """Synthesis failed: the ``error`` code and message, and the close code that follows."""

    code: str
    message: str
    close_code: int


@dataclass(frozen=True)
class Response(Generic[V]):
    """One response being generated: its ids, its job, and the events before its audio."""

    response_id: str
    item_id: str
    job: Synthesize[V]
    events: list[ServerEvent] = field(default_factory=list)


# --- validation of session.update ----------------------------------------------------------------


def _fmt_values(values: tuple[Any, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def _one_of(allowed: tuple[Any, ...], *, fold: bool = False) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if fold:
            ok = isinstance(value, str) and value.lower() in _CANONICAL_LANG
        else:
            ok = not isinstance(value, bool) and value in allowed
        if ok:
            return None
        return f"Invalid value: '{value}'. Supported values are: {_fmt_values(allowed)}."

    return check


def _in_range(lo: float, hi: float, integral: bool) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        ok_type = isinstance(value, int) if integral else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type or not lo <= value <= hi:
            return f"Invalid value: {value!r}. Supported range is [{lo:g}, {hi:g}]."
        return None

    return check


def _of_type(kind: type, what: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if isinstance(value, kind) else f"Invalid value: {value!r}. Expected {what}."

    return check


def _voice_name(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return None
    return "Invalid value: voice must be a non-empty string."


_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "voice": _voice_name,
    "mode": _one_of(MODES),
    "language_type": _one_of(LANGUAGE_TYPES, fold=True),
    "response_format": _one_of(RESPONSE_FORMATS),
    "sample_rate": _one_of(SAMPLE_RATES),
    **{key: _in_range(*bounds) for key, bounds in _RANGES.items()},
    "enable_tn": _of_type(bool, "a boolean"),
    "optimize_instructions": _of_type(bool, "a boolean"),
    "instructions": _of_type(str, "a string"),
}


def check_setting(key: str, value: Any) -> tuple[str, str] | None:
    """``(message, param)`` when ``session.<key> = value`` is not acceptable, else None.

    Keys without a rule (``model``, keys of other model families) are accepted as they are.
    """
    check = _CHECKS.get(key)
    message = check(value) if check is not None else None
    return None if message is None else (message, f"session.{key}")


# --- the machine ---------------------------------------------------------------------------------


@dataclass
class _PendingUpdate:
    settings: dict[str, Any]
    keys: tuple[str, ...]
    event_id: str


class ServerSession(Generic[V]):
    """The rules of one realtime session, fed by its driver (see the module docstring).

    Not thread-safe; the driver's reader and response worker call it from one event loop,
    never across an ``await``.
    """

    def __init__(self, *, model: str, config: RealtimeConfig, ids: Ids | None = None) -> None:
        self.model = model
        self.cfg = config
        self.ids = ids if ids is not None else Ids()
        self.session_id = self.ids.make("sess_")
        self.state = SessionState.OPEN
        self.settings: dict[str, Any] = {
            "voice": config.default_voice,
            "mode": "server_commit",
            "language_type": "Auto",
            "response_format": "pcm",
            "sample_rate": 24000,
        }
        self.extra_keys: list[str] = []  # keys the client set beyond the documented ones
        self.voice: V | None = None
        self.response: Response[V] | None = None  # the one being generated
        self._parts: list[str] = []
        self._buffered = 0
        self._last_append = 0.0
        self._pending: _PendingUpdate | None = None

    # --- reading ---------------------------------------------------------------------------------

    @property
    def model_known(self) -> bool:
        """False for a model this server does not serve: close after ``session.created``."""
        return self.model in self.cfg.models

    @property
    def buffered(self) -> int:
        """Characters in the input buffer (appended, not yet cut)."""
        return self._buffered

    @property
    def responding(self) -> bool:
        """True between :meth:`start_response` and :meth:`end_response`."""
        return self.response is not None

    def idle_cut_at(self) -> float | None:
        """When the buffer is cut for want of appends (``server_commit``), else None."""
        idle = self.cfg.cut_idle_s
        if (
            idle is None
            or not self._buffered
            or self.settings["mode"] != "server_commit"
            or self.state is SessionState.FINISHING
        ):
            return None
        return self._last_append + idle

    def refusal(self, event: ClientEvent | UnknownEvent) -> Error | None:
        """The ``error`` that answers ``event`` before any of its rules run, else None."""
        eid, kind = event.event_id, event.type
        if isinstance(event, UnknownEvent) or (
            isinstance(event, ResponseCancel) and self.cfg.cancel == "error"
        ):
            return self.error(INVALID, MSG_UNSUPPORTED.format(kind), client_event_id=eid)
        if self.state is SessionState.FINISHING:
            return self.error(INVALID, MSG_FINISHING, client_event_id=eid)
        return None

    # --- client events ---------------------------------------------------------------------------

    def created(self) -> SessionCreated:
        """The first event of the session."""
        s = self.settings
        return SessionCreated(event_id=self._eid(), session={
            "object": "realtime.session", "mode": s["mode"], "model": self.model,
            "voice": s["voice"], "response_format": s["response_format"],
            "sample_rate": s["sample_rate"], "id": self.session_id,
        })  # fmt: skip

    def receive(self, event: ClientEvent | UnknownEvent, now: float) -> list[Output]:
        """What answers one client event received at ``now`` (seconds, any fixed origin)."""
        refused = self.refusal(event)
        if refused is not None:
            return [refused]
        if isinstance(event, SessionUpdate):
            return self._update(event.session, event.event_id)
        if isinstance(event, InputTextBufferAppend):
            return self._append(event.text, event.event_id, now)
        return self._control(event)

    def idle(self) -> list[Output]:
        """The cut for want of appends, due at :meth:`idle_cut_at`."""
        return self._cut() if self.idle_cut_at() is not None else []

    def malformed(self, reason: str) -> Error:
        """The answer to a text frame that is no valid client event."""
        return self.error(INVALID, f"Invalid event: {reason}")

    def binary_frame(self) -> Error:
        """The answer to a binary frame."""
        return self.error(INVALID, MSG_BINARY)

    def error(
        self,
        code: str,
        message: str,
        *,
        param: str | None = None,
        client_event_id: str | None = None,
        typed: bool = True,
    ) -> Error:
        """An ``error`` event in the older, richer shape (§5.5); ``typed`` adds
        ``type: invalid_request_error`` (the v2 SDK then keeps the session open)."""
        err: dict[str, Any] = {"type": "invalid_request_error"} if typed else {}
        err["code"] = code
        err["message"] = message
        if param is not None:
            err["param"] = param
        if client_event_id:
            err["event_id"] = client_event_id
        return Error(event_id=self._eid(), error=err)

    def _append(self, text: str, eid: str, now: float) -> list[Output]:
        if not text:
            return []
        limit = self.cfg.max_buffer_chars
        if self._buffered + len(text) > limit:
            return [self.error(INVALID, MSG_FULL.format(limit), client_event_id=eid)]
        self._parts.append(text)
        self._buffered += len(text)
        self._last_append = now
        if self.settings["mode"] == "server_commit" and (
            text[-1] in self.cfg.cut_punctuation or self._buffered >= self.cfg.cut_max_chars
        ):
            return self._cut()
        return []

    def _cut(self) -> list[Output]:
        """Turn the buffer into a segment (or the engine-411 error without a cloned voice)."""
        text = "".join(self._parts)
        self._parts.clear()
        self._buffered = 0
        if self.voice is None:  # what the VC models answer for a system voice (§5.9)
            return [self.error(INVALID, MSG_ENGINE_411, param="session.voice")]
        self.state = SessionState.STARTED
        return [Synthesize(text, self.voice, self.settings)]

    def _control(self, event: ClientEvent | UnknownEvent) -> list[Output]:
        """``commit``, ``clear``, ``session.finish`` and ``response.cancel``."""
        eid = event.event_id
        if isinstance(event, InputTextBufferCommit):
            return self._cut() if self._buffered else [self.error(INVALID, MSG_EMPTY,
                                                                  client_event_id=eid)]  # fmt: skip
        if isinstance(event, InputTextBufferClear):
            self._parts.clear()
            self._buffered = 0
            return [InputTextBufferCleared(event_id=self._eid())]
        if isinstance(event, SessionFinish):
            out = self._cut() if self._buffered else []
            self.state = SessionState.FINISHING
            return [*out, Finish()]
        if self.response is None:  # response.cancel, with cancel="truncate"
            return [self.error(INVALID, MSG_NO_RESPONSE, client_event_id=eid)]
        return [StopAudio(self.response.response_id)]

    # --- session.update --------------------------------------------------------------------------

    def _update(self, upd: dict[str, Any], eid: str) -> list[Output]:
        """Atomic (one bad key refuses all) and partial (keys not sent keep their value)."""
        if self.state is not SessionState.OPEN:
            return [self.error(INVALID, MSG_STARTED, client_event_id=eid)]
        new = dict(self.settings)
        for key, value in upd.items():
            problem = check_setting(key, value)
            if problem is not None:
                message, param = problem
                return [self.error(INVALID, message, param=param, client_event_id=eid)]
            if key != "model":  # sent by some clients; the URL's model rules
                new[key] = _CANONICAL_LANG[value.lower()] if key == "language_type" else value
        pending = _PendingUpdate(new, tuple(upd), eid)
        if "voice" not in upd:
            return self._apply_update(pending, self.voice)
        name = upd["voice"]
        if name.lower() in SYSTEM_VOICES:
            return [self.error(INVALID, MSG_ENGINE_411, param="session.voice",
                               client_event_id=eid)]  # fmt: skip
        self._pending = pending
        return [LookUpVoice(name)]

    def voice_found(self, voice: V | None) -> list[Output]:
        """The answer to :class:`LookUpVoice`: the voice the driver found, or None."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("voice_found() without a LookUpVoice pending")
        if voice is None or voice.target_model != self.model:
            name = pending.settings["voice"]
            return [self.error(INVALID, MSG_NOT_SUPPORTED.format(name), param="session.voice",
                               client_event_id=pending.event_id)]  # fmt: skip
        return self._apply_update(pending, voice)

    def _apply_update(self, pending: _PendingUpdate, voice: V | None) -> list[Output]:
        self.voice = voice
        for key in pending.keys:
            if key not in _DOCUMENTED_KEYS and key != "model" and key not in self.extra_keys:
                self.extra_keys.append(key)
        self.settings = pending.settings
        view: dict[str, Any] = {"id": self.session_id, "object": "realtime.session",
                                "model": self.model}  # fmt: skip
        for key in (*_DOCUMENTED_KEYS, *self.extra_keys):
            view[key] = self.settings[key]
        return [SessionUpdated(event_id=self._eid(), session=view)]

    # --- responses -------------------------------------------------------------------------------

    def start_response(self, job: Synthesize[V]) -> Response[V]:
        """Begin the response for ``job``; its ``events`` go out before the audio (§5.6)."""
        rid, iid = self.ids.make("resp_"), self.ids.make("item_")
        e = self._eid
        events: list[ServerEvent] = [
            InputTextBufferCommitted(event_id=e(), item_id=""),
            ResponseCreated(event_id=e(), response={
                "id": rid, "object": "realtime.response", "conversation_id": "",
                "status": "in_progress", "voice": job.voice.name, "output": []}),
            ResponseOutputItemAdded(event_id=e(), response_id=rid, output_index=0,
                                    item=_item(iid, "in_progress", [])),
            ResponseContentPartAdded(event_id=e(), response_id=rid, item_id=iid, output_index=0,
                                     content_index=0, part=_part()),
        ]  # fmt: skip
        self.response = Response(rid, iid, job, events)
        return self.response

    def end_response(self, *, completed: bool, failure: Failure | None = None) -> list[Output]:
        """The events after the audio: completed, cut short by :class:`StopAudio`, or failed
        (then an ``error`` first and a :class:`Close` last)."""
        r = self.response
        if r is None:
            raise RuntimeError("end_response() without a response in progress")
        self.response = None
        status = "failed" if failure else "completed" if completed else "incomplete"
        rid, iid, e = r.response_id, r.item_id, self._eid
        refs: dict[str, Any] = {"response_id": rid, "item_id": iid, "output_index": 0,
                                "content_index": 0}  # fmt: skip
        body: dict[str, Any] = {
            "id": rid, "object": "realtime.response", "conversation_id": "", "status": status,
            "modalities": ["text", "audio"], "voice": r.job.voice.name,
            "output": [_item(iid, status, [{"type": "audio", "transcript": ""}])],
            "usage": {"characters": billable_characters(r.job.text)},
        }  # fmt: skip
        if failure is not None:
            body["status_details"] = {"type": "failed", "error": {"code": failure.code}}
        elif not completed:
            body["status_details"] = {"type": "incomplete", "reason": "client_cancelled"}
        out: list[Output] = []
        if failure is not None:
            out.append(self.error(failure.code, failure.message, typed=False))
        out += [
            ResponseAudioDone(event_id=e(), **refs),
            ResponseContentPartDone(event_id=e(), **refs, part=_part()),
            ResponseOutputItemDone(event_id=e(), response_id=rid, output_index=0,
                                   item=_item(iid, status, [_part()])),
            ResponseDone(event_id=e(), response=body),
        ]  # fmt: skip
        if failure is not None:
            out.append(Close(failure.close_code, "synthesis"))
        return out

    def abandon_response(self) -> None:
        """The response in progress ends without its closing events (the session is over)."""
        self.response = None

    def finished(self) -> list[Output]:
        """After the last queued response of a finished session: the terminal event."""
        self.close()
        return [SessionFinished(event_id=self._eid()), Close(1000)]

    def close(self) -> None:
        """The socket is gone (any reason): nothing more happens in this session."""
        self.state = SessionState.CLOSED
        self.response = None

    def _eid(self) -> str:
        return "event_" + self.ids.next().decode()


def _part() -> dict[str, Any]:
    return {"type": "audio", "text": ""}


def _item(iid: str, status: str, content: list[Any]) -> dict[str, Any]:
    return {"id": iid, "object": "realtime.item", "type": "message", "status": status,
            "role": "assistant", "content": content}  # fmt: skip


# --- the audio hot path --------------------------------------------------------------------------


_DELTA_FIXED = len(b'{"event_id":"event_') + len(b'"delta":"') + len(b'"}')
_WS_TEXT = 0x81  # FIN + opcode 1 (text)
_WS_LEN16 = struct.Struct("!BBH")
_WS_LEN64 = struct.Struct("!BBQ")


def ws_text_header(size: int) -> bytes:
    """The header of a final, unmasked text frame of ``size`` payload bytes (RFC 6455 §5.2)."""
    if size < 126:
        return bytes((_WS_TEXT, size))
    if size < 65536:
        return _WS_LEN16.pack(_WS_TEXT, 126, size)
    return _WS_LEN64.pack(_WS_TEXT, 127, size)


class DeltaFrames:
    """The ``response.audio.delta`` frames of one response, as bytes built by hand.

    Deltas are most of the traffic, so no event object and no dict per delta: one pre-built
    head, the base64 and an optional ``x_sent_monotonic`` stamp joined into the frame.
    :meth:`event` is the same delta as a :class:`~tts_stream.messages.ResponseAudioDelta`;
    tests/test_server_session.py checks that the two encode to the same JSON. The key order
    is the live service's (``delta`` last, protocol.md §5.7).
    """

    __slots__ = ("_head", "_ids", "item_id", "response_id")

    def __init__(self, ids: Ids, response_id: str, item_id: str) -> None:
        self._ids = ids
        self.response_id, self.item_id = response_id, item_id
        self._head = (
            f'","type":"response.audio.delta","response_id":"{response_id}",'
            f'"item_id":"{item_id}","output_index":0,"content_index":0,'
        ).encode()

    def frame(self, b64: bytes, stamp: float | None = None) -> bytes:
        """One delta carrying ``b64`` (base64 audio), with a fresh event id."""
        extra = b'"x_sent_monotonic":' + repr(stamp).encode() + b"," if stamp is not None else b""
        return b"".join((b'{"event_id":"event_', self._ids.next(), self._head, extra,
                         b'"delta":"', b64, b'"}'))  # fmt: skip

    def ws_frame(self, b64: bytes, stamp: float | None = None) -> bytes:
        """:meth:`frame` inside its WebSocket frame (RFC 6455 §5.2: a final, unmasked,
        uncompressed text frame, as a server sends it), built with one copy of the audio.

        The driver writes it straight to the transport: no header + payload concatenation
        and no coroutine layers of the WebSocket library per delta.
        """
        extra = b'"x_sent_monotonic":' + repr(stamp).encode() + b"," if stamp is not None else b""
        eid = self._ids.next()
        size = _DELTA_FIXED + len(eid) + len(self._head) + len(extra) + len(b64)
        return b"".join((ws_text_header(size), b'{"event_id":"event_', eid, self._head, extra,
                         b'"delta":"', b64, b'"}'))  # fmt: skip

    def event(self, event_id: str, b64: str, stamp: float | None = None) -> ResponseAudioDelta:
        """The delta :meth:`frame` builds, as the dataclass (for tests and tools)."""
        extra = {"x_sent_monotonic": stamp} if stamp is not None else {}
        return ResponseAudioDelta(event_id=event_id, delta=b64, response_id=self.response_id,
                                  item_id=self.item_id, output_index=0, content_index=0,
                                  extra=extra)  # fmt: skip
