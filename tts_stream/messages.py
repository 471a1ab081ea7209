"""Wire vocabulary of both DashScope APIs, as frozen dataclasses (pure: no I/O, no clock).

Realtime (protocol.md §5): every client and server event is a dataclass with ``TYPE`` and
``event_id``. :func:`parse_server_event` / :func:`parse_client_event` turn one JSON text frame
into an event; :func:`dumps` turns an event back into a frame. Unknown event types become
:class:`UnknownEvent` and unknown keys are kept in ``extra`` and written back out, because the
real service may send more than the documentation lists.

Enrollment (protocol.md §4): request builders and response parsers for
``qwen-voice-enrollment`` (create / list / delete); newer optional fields are optional here.

Malformed input raises :class:`~tts_stream.errors.ProtocolViolation` naming what is wrong.
"""

from __future__ import annotations

import builtins
import dataclasses
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeGuard, TypeVar

import orjson

from .errors import ProtocolViolation, redact

__all__ = [
    "ALL_EVENTS",
    "CLIENT_EVENTS",
    "ENROLLMENT_LANGUAGES",
    "ENROLLMENT_MODEL",
    "ENROLLMENT_PATH",
    "LANGUAGE_TYPES",
    "MAX_PAGE",
    "MODES",
    "PREFERRED_NAME_RE",
    "REALTIME_PATH",
    "RESPONSE_FORMATS",
    "SAMPLE_RATES",
    "SERVER_EVENTS",
    "VC_MODELS",
    "ClientEvent",
    "CreatedVoice",
    "EnrollmentError",
    "Error",
    "Event",
    "InputTextBufferAppend",
    "InputTextBufferClear",
    "InputTextBufferCleared",
    "InputTextBufferCommit",
    "InputTextBufferCommitted",
    "ResponseAudioDelta",
    "ResponseAudioDone",
    "ResponseCancel",
    "ResponseContentPartAdded",
    "ResponseContentPartDone",
    "ResponseCreated",
    "ResponseDone",
    "ResponseOutputItemAdded",
    "ResponseOutputItemDone",
    "ServerEvent",
    "SessionCreated",
    "SessionFinish",
    "SessionFinished",
    "SessionUpdate",
    "SessionUpdated",
    "UnknownEvent",
    "VoiceInfo",
    "VoicePage",
    "billable_characters",
    "create_voice_request",
    "delete_voice_request",
    "dumpb",
    "dumps",
    "is_preferred_name",
    "list_voices_request",
    "load_event_object",
    "new_event_id",
    "parse_client_event",
    "parse_created_voice",
    "parse_enrollment_error",
    "parse_server_event",
    "parse_voice_page",
    "server_event_from_dict",
    "to_dict",
]

# --- constants of protocol.md --------------------------------------------------------------

REALTIME_PATH = "/api-ws/v1/realtime"
ENROLLMENT_PATH = "/api/v1/services/audio/tts/customization"
ENROLLMENT_MODEL = "qwen-voice-enrollment"
VC_MODELS = ("qwen3-tts-vc-realtime-2026-01-15", "qwen3-tts-vc-realtime-2025-11-27")
ENROLLMENT_LANGUAGES = ("zh", "en", "de", "it", "pt", "es", "ja", "ko", "fr", "ru")  # §4.2
MODES = ("server_commit", "commit")
RESPONSE_FORMATS = ("pcm", "wav", "mp3", "opus")
SAMPLE_RATES = (8000, 16000, 24000, 48000)
LANGUAGE_TYPES = (
    "Auto", "Chinese", "English", "German", "Italian", "Portuguese",
    "Spanish", "Japanese", "Korean", "French", "Russian",
)  # fmt: skip


def new_event_id() -> str:
    """A client event id as the SDKs make them: ``event_`` + 32 hex digits (§5.3)."""
    return "event_" + uuid.uuid4().hex


def billable_characters(text: str) -> int:
    """Characters billed for ``text`` (§5.12): a Han character counts 2, anything else 1."""
    return sum(2 if _is_han(ord(c)) else 1 for c in text)


def _is_han(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF  # CJK unified ideographs
        or 0x3400 <= cp <= 0x4DBF  # extension A
        or 0xF900 <= cp <= 0xFAFF  # compatibility ideographs
        or 0x20000 <= cp <= 0x3134F  # extensions B..H
    )


# --- field validation ------------------------------------------------------------------------

_CHECKS: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "dict[str, Any]": (dict,),
    "list[Any]": (list,),
}


E = TypeVar("E", bound="Event")


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    """Base of every realtime event. ``extra`` keeps keys this version does not know."""

    TYPE: ClassVar[str] = ""
    event_id: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def type(self) -> str:
        return self.TYPE

    @classmethod
    def from_dict(cls: builtins.type[E], data: Mapping[str, Any]) -> E:
        # Field specs are computed once per class: this runs for every audio delta.
        extra = dict(data)
        extra.pop("type", None)
        kwargs: dict[str, Any] = {}
        for name, types, optional, required, no_bool, ann in _field_specs(cls):
            if name in extra:
                value = extra[name]
                if value is None:
                    if not optional:
                        what = f"{cls.TYPE or 'event'}: field {name!r} must be {ann}"
                        raise ProtocolViolation(f"{what}, got None")
                    continue  # an explicit null stays in extra: it round-trips
                if not isinstance(value, types) or (no_bool and isinstance(value, bool)):
                    what = f"{cls.TYPE or 'event'}: field {name!r} must be {ann}"
                    raise ProtocolViolation(f"{what}, got {value!r:.80}")
                kwargs[name] = extra.pop(name)
            elif required:
                raise ProtocolViolation(f"{cls.TYPE}: missing required field {name!r}")
        return cls(extra=extra, **kwargs)


_Spec = tuple[str, tuple[type, ...], bool, bool, bool, str]
_SPECS: dict[builtins.type[Event], tuple[_Spec, ...]] = {}


def _field_specs(cls: builtins.type[Event]) -> tuple[_Spec, ...]:
    """(name, types, optional, required, no_bool, annotation) per field, cached per class."""
    specs = _SPECS.get(cls)
    if specs is None:
        out = []
        for f in _payload_fields(cls):
            ann = str(f.type)
            types = _CHECKS[ann.removesuffix(" | None")]
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            out.append((f.name, types, ann.endswith(" | None"), required, types == (int,), ann))
        specs = _SPECS[cls] = tuple(out)
    return specs


def _payload_fields(cls: builtins.type[Event]) -> tuple[dataclasses.Field[Any], ...]:
    return tuple(f for f in dataclasses.fields(cls) if f.name != "extra")


def to_dict(event: Event) -> dict[str, Any]:
    """The JSON object of ``event``: ``type``, ``event_id``, the fields, then ``extra``."""
    out: dict[str, Any] = {"event_id": event.event_id, "type": event.type}
    for spec in _field_specs(type(event)):  # cached per class: the server encodes every event
        name = spec[0]
        if name not in ("event_id", "type_name"):
            value = getattr(event, name)
            if value is not None:
                out[name] = value
    if event.extra:
        out.update(event.extra)
    return out


def dumps(event: Event) -> str:
    """Serialize one event into the text of one WebSocket frame."""
    return orjson.dumps(to_dict(event)).decode()


# --- client events (§5.4) ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientEvent(Event):
    """An event the client sends."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SessionUpdate(ClientEvent):
    TYPE: ClassVar[str] = "session.update"
    session: dict[str, Any]


@dataclass(frozen=True, kw_only=True, slots=True)
class InputTextBufferAppend(ClientEvent):
    TYPE: ClassVar[str] = "input_text_buffer.append"
    text: str


@dataclass(frozen=True, kw_only=True, slots=True)
class InputTextBufferCommit(ClientEvent):
    TYPE: ClassVar[str] = "input_text_buffer.commit"


@dataclass(frozen=True, kw_only=True, slots=True)
class InputTextBufferClear(ClientEvent):
    TYPE: ClassVar[str] = "input_text_buffer.clear"


@dataclass(frozen=True, kw_only=True, slots=True)
class SessionFinish(ClientEvent):
    TYPE: ClassVar[str] = "session.finish"


@dataclass(frozen=True, kw_only=True, slots=True)
class ResponseCancel(ClientEvent):
    """Sent by both SDKs but absent from every doc version (§5.4): never relied upon."""

    TYPE: ClassVar[str] = "response.cancel"


# --- server events (§5.5) ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerEvent(Event):
    """An event the server sends."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Error(ServerEvent):
    """``error``: the client reads ``code`` and ``message`` only; the rest is optional (§5.5)."""

    TYPE: ClassVar[str] = "error"
    error: dict[str, Any]

    @property
    def code(self) -> str:
        return str(self.error.get("code") or "")

    @property
    def message(self) -> str:
        return str(self.error.get("message") or self.error.get("msg") or "")

    @property
    def recoverable(self) -> bool:
        """The v2 SDK keeps the session open after ``invalid_request_error`` errors."""
        return self.error.get("type") == "invalid_request_error"


@dataclass(frozen=True, kw_only=True, slots=True)
class SessionCreated(ServerEvent):
    TYPE: ClassVar[str] = "session.created"
    session: dict[str, Any]


@dataclass(frozen=True, kw_only=True, slots=True)
class SessionUpdated(ServerEvent):
    TYPE: ClassVar[str] = "session.updated"
    session: dict[str, Any]


@dataclass(frozen=True, kw_only=True, slots=True)
class InputTextBufferCommitted(ServerEvent):
    TYPE: ClassVar[str] = "input_text_buffer.committed"
    item_id: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class InputTextBufferCleared(ServerEvent):
    TYPE: ClassVar[str] = "input_text_buffer.cleared"


@dataclass(frozen=True, kw_only=True, slots=True)
class ResponseCreated(ServerEvent):
    TYPE: ClassVar[str] = "response.created"
    response: dict[str, Any]

    @property
    def response_id(self) -> str:
        return str(self.response.get("id") or "")


@dataclass(frozen=True, kw_only=True, slots=True)
class ResponseOutputItemAdded(ServerEvent):
    TYPE: ClassVar[str] = "response.output_item.added"
    response_id: str | None = None
    output_index: int | None = None
    item: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ResponseContentPartAdded(ServerEvent):
    TYPE: ClassVar[str] = "response.content_part.added"
    response_id: str | None = None
    item_id: str | None = None
    output_index: int | None = None
    content_index: int | None = None
    part: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ResponseAudioDelta(ServerEvent):
    """One base64 slice of the output audio stream (§5.8)."""

    TYPE: ClassVar[str] = "response.audio.delta"
    delta: str
    response_id: str | None = None
    item_id: str | None = None
    output_index: int | None = None
    content_index: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ResponseAudioDone(ServerEvent):
    TYPE: ClassVar[str] = "response.audio.done"
    response_id: str | None = None
    item_id: str | None = None
    output_index: int | None = None
    content_index: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ResponseContentPartDone(ServerEvent):
    TYPE: ClassVar[str] = "response.content_part.done"
    response_id: str | None = None
    item_id: str | None = None
    output_index: int | None = None
    content_index: int | None = None
    part: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ResponseOutputItemDone(ServerEvent):
    TYPE: ClassVar[str] = "response.output_item.done"
    response_id: str | None = None
    output_index: int | None = None
    item: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ResponseDone(ServerEvent):
    """End of one response; carries billing usage (§5.5, §5.12)."""

    TYPE: ClassVar[str] = "response.done"
    response: dict[str, Any]

    @property
    def response_id(self) -> str:
        return str(self.response.get("id") or "")

    @property
    def status(self) -> str:
        return str(self.response.get("status") or "")

    @property
    def characters(self) -> int | None:
        """``usage.characters`` (Qwen3 families); ``None`` when absent (legacy token usage)."""
        usage = self.response.get("usage")
        value = usage.get("characters") if isinstance(usage, dict) else None
        return value if isinstance(value, int) else None


@dataclass(frozen=True, kw_only=True, slots=True)
class SessionFinished(ServerEvent):
    """The terminal event; the server closes the socket after it."""

    TYPE: ClassVar[str] = "session.finished"


@dataclass(frozen=True, kw_only=True, slots=True)
class UnknownEvent(ServerEvent):
    """An event type this version does not know; ``type_name`` and ``extra`` keep it whole."""

    type_name: str

    @property
    def type(self) -> str:
        return self.type_name


CLIENT_EVENTS: dict[str, type[ClientEvent]] = {
    c.TYPE: c
    for c in (
        SessionUpdate, InputTextBufferAppend, InputTextBufferCommit,
        InputTextBufferClear, SessionFinish, ResponseCancel,
    )
}  # fmt: skip
SERVER_EVENTS: dict[str, type[ServerEvent]] = {
    c.TYPE: c
    for c in (
        Error, SessionCreated, SessionUpdated, InputTextBufferCommitted, InputTextBufferCleared,
        ResponseCreated, ResponseOutputItemAdded, ResponseContentPartAdded, ResponseAudioDelta,
        ResponseAudioDone, ResponseContentPartDone, ResponseOutputItemDone, ResponseDone,
        SessionFinished,
    )
}  # fmt: skip
ALL_EVENTS: dict[str, type[Event]] = {**CLIENT_EVENTS, **SERVER_EVENTS}


def load_event_object(frame: str | bytes | bytearray | memoryview) -> dict[str, Any]:
    """The JSON object of one frame, checked to be an event (a string ``type`` and
    ``event_id``): the first half of :func:`parse_server_event`, for a reader that looks at
    the object before it becomes an event (the client redacts an echoed key there)."""
    try:
        data = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise ProtocolViolation(f"frame is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolViolation(f"frame must be a JSON object, got {type(data).__name__}")
    if not isinstance(data.get("type"), str):
        raise ProtocolViolation("event has no string 'type'")
    if not isinstance(data.get("event_id", ""), str):
        raise ProtocolViolation("event_id must be a string")
    return data


def parse_server_event(frame: str | bytes) -> ServerEvent:
    """Parse one server frame. Unknown types give :class:`UnknownEvent`."""
    return server_event_from_dict(load_event_object(frame))


def server_event_from_dict(data: Mapping[str, Any]) -> ServerEvent:
    """The second half of :func:`parse_server_event`: the event of a loaded object."""
    cls = SERVER_EVENTS.get(data["type"])
    return _unknown(data) if cls is None else cls.from_dict(data)


def _unknown(data: Mapping[str, Any]) -> UnknownEvent:
    """An event of a type we do not know, its fields kept in ``extra``."""
    extra = {k: v for k, v in data.items() if k not in ("type", "event_id")}
    return UnknownEvent(type_name=data["type"], event_id=data.get("event_id", ""), extra=extra)


def parse_client_event(frame: str | bytes) -> ClientEvent | UnknownEvent:
    """Parse one client frame (server side). A missing ``event_id`` is tolerated (§5.3)."""
    data = load_event_object(frame)
    cls = CLIENT_EVENTS.get(data["type"])
    return _unknown(data) if cls is None else cls.from_dict(data)


# --- enrollment (§4) ---------------------------------------------------------------------------

#: §4.2: ``preferred_name`` is 1-16 ASCII letters, digits or underscores (use ``fullmatch``).
PREFERRED_NAME_RE = re.compile(r"[A-Za-z0-9_]{1,16}")
#: §4.3: the largest ``page_index`` / ``page_size`` of a list request.
MAX_PAGE = 1_000_000


def is_preferred_name(name: object) -> TypeGuard[str]:
    """Whether ``name`` is a valid ``preferred_name`` (§4.2), for the client and the server."""
    return isinstance(name, str) and PREFERRED_NAME_RE.fullmatch(name) is not None


def create_voice_request(
    *,
    target_model: str,
    preferred_name: str,
    audio_data: str,
    text: str | None = None,
    language: str | None = None,
) -> dict[str, Any]:
    """Body of ``action: create``; ``audio_data`` is a data URI or an http(s) URL."""
    inp: dict[str, Any] = {
        "action": "create",
        "target_model": target_model,
        "preferred_name": preferred_name,
        "audio": {"data": audio_data},
    }
    if text is not None:
        inp["text"] = text
    if language is not None:
        inp["language"] = language
    return {"model": ENROLLMENT_MODEL, "input": inp}


def list_voices_request(*, page_index: int = 0, page_size: int = 10) -> dict[str, Any]:
    """Body of ``action: list`` (page_size ≥ 1: the newer range, §8)."""
    return {
        "model": ENROLLMENT_MODEL,
        "input": {"action": "list", "page_index": page_index, "page_size": page_size},
    }


def delete_voice_request(voice: str) -> dict[str, Any]:
    """Body of ``action: delete``."""
    return {"model": ENROLLMENT_MODEL, "input": {"action": "delete", "voice": voice}}


@dataclass(frozen=True)
class CreatedVoice:
    """``output`` of a successful create. ``fallback_mode`` absent means ``False``."""

    voice: str
    target_model: str
    fallback_mode: bool = False
    fallback_reason: str | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class VoiceInfo:
    """One item of ``voice_list``; only ``voice`` is guaranteed."""

    voice: str
    target_model: str | None = None
    gmt_create: str | None = None
    gmt_modified: str | None = None
    language: str | None = None


_V = TypeVar("_V")
_W = TypeVar("_W")


@dataclass(frozen=True)
class VoicePage(Generic[_V]):
    """One page of ``list``: its voices and the paging fields, ``None`` when the server omits
    them (they exist only in the newer shape). Iterating a page iterates its voices.

    :func:`parse_voice_page` gives a page of :class:`VoiceInfo`; the enrollment client maps
    it to its own voices with :meth:`map` (``enrollment.Page`` is this class).
    """

    voices: tuple[_V, ...]
    page_index: int | None = None
    page_size: int | None = None
    total_count: int | None = None
    request_id: str | None = None

    def __iter__(self) -> Iterator[_V]:
        return iter(self.voices)

    def __len__(self) -> int:
        return len(self.voices)

    def map(self, convert: Callable[[_V], _W]) -> VoicePage[_W]:
        """The same page with each voice converted."""
        return VoicePage(
            tuple(convert(v) for v in self.voices),
            self.page_index, self.page_size, self.total_count, self.request_id,
        )  # fmt: skip


@dataclass(frozen=True)
class EnrollmentError:
    """A non-2xx enrollment body: ``code``, ``message`` (or ``msg``), ``request_id``.

    The body of an HTTP status refusing the realtime WebSocket upgrade has the same shape.
    """

    code: str | None
    message: str
    request_id: str | None

    def redacted(self, *secrets: str | None) -> EnrollmentError:
        """The same error with every secret replaced in each field (a server may echo the
        key back in any of them)."""
        return EnrollmentError(
            code=None if self.code is None else redact(self.code, *secrets),
            message=redact(self.message, *secrets),
            request_id=None if self.request_id is None else redact(self.request_id, *secrets),
        )


def _output(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ProtocolViolation("enrollment response is not a JSON object")
    out = body.get("output")
    if not isinstance(out, dict):
        raise ProtocolViolation("enrollment response has no 'output' object")
    return out


def _opt(d: Mapping[str, Any], key: str, typ: type) -> Any:
    v = d.get(key)
    return v if isinstance(v, typ) and not (typ is int and isinstance(v, bool)) else None


def parse_created_voice(body: Any) -> CreatedVoice:
    out = _output(body)
    voice = out.get("voice")
    if not isinstance(voice, str) or not voice:
        raise ProtocolViolation("create response has no 'output.voice'")
    return CreatedVoice(
        voice=voice,
        target_model=str(out.get("target_model") or ""),
        fallback_mode=bool(out.get("fallback_mode", False)),
        fallback_reason=_opt(out, "fallback_reason", str),
        request_id=_opt(body, "request_id", str),
    )


def parse_voice_page(body: Any) -> VoicePage[VoiceInfo]:
    out = _output(body)
    items = out.get("voice_list", [])
    if not isinstance(items, list):
        raise ProtocolViolation("list response 'voice_list' is not an array")
    voices = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("voice"), str):
            raise ProtocolViolation(f"list response item without 'voice': {item!r:.80}")
        voices.append(
            VoiceInfo(
                voice=item["voice"],
                target_model=_opt(item, "target_model", str),
                gmt_create=_opt(item, "gmt_create", str),
                gmt_modified=_opt(item, "gmt_modified", str),
                language=_opt(item, "language", str),
            )
        )
    return VoicePage(
        voices=tuple(voices),
        page_index=_opt(out, "page_index", int),
        page_size=_opt(out, "page_size", int),
        total_count=_opt(out, "total_count", int),
        request_id=_opt(body, "request_id", str),
    )


def parse_enrollment_error(body: Any, *, request_id: str | None = None) -> EnrollmentError:
    """Liberal: an empty or non-JSON body (seen on workspace hosts) still gives an error."""
    if not isinstance(body, dict):
        return EnrollmentError(code=None, message="", request_id=request_id)
    message = body.get("message") or body.get("msg") or ""
    return EnrollmentError(
        code=_opt(body, "code", str),
        message=str(message),
        request_id=_opt(body, "request_id", str) or request_id,
    )


# --- the server's side (server/session.py) ------------------------------------------------------


def dumpb(event: Event) -> bytes:
    """:func:`dumps` as the bytes of the frame (what a server writes to its socket)."""
    return orjson.dumps(to_dict(event))
