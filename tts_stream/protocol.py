"""Client-side session state machine of the Qwen-TTS Realtime protocol (pure, sans-I/O).

Role: keep the state of one realtime session (protocol.md §5.2, §5.6) the way h11/wsproto
do for HTTP/WebSocket: the I/O layer (:mod:`tts_stream.connection`) feeds every parsed server
event into :meth:`ClientSession.receive` and gets *notifications* back; it asks
:meth:`ClientSession.update` / ``append`` / ``commit`` / ``clear`` / ``finish`` for the
client events to send, which raise :class:`~tts_stream.errors.UsageError` naming the state
when the call is illegal. Boundary: no asyncio, no sockets, no clock; base64 decoding of the
audio stays in the I/O layer (it is the hot path, done with pybase64 there).

Robustness rules taken from the protocol notes (§5.3, §5.6, §6):

* never assume the first frame after ``session.update`` is ``session.updated``
  (``session.created`` may come after it);
* ``input_text_buffer.committed`` is optional, unknown events are ignored, optional ids may
  be missing (a delta without ``response_id`` belongs to the current response);
* the terminal event is ``session.finished``, not ``response.done``;
* deltas of *retired* responses (barge-in) are dropped here, so late audio never reaches a
  sink.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import messages as m
from .errors import ClosedError, UsageError

__all__ = [
    "AudioReceived",
    "BufferCleared",
    "BufferCommitted",
    "ClientSession",
    "Configured",
    "Created",
    "Ignored",
    "Notification",
    "ResponseFinished",
    "ResponseStarted",
    "ServerFailure",
    "SessionComplete",
    "SessionLost",
    "State",
    "Tally",
]


class State(enum.Enum):
    """Where a client session is (protocol.md §5.2)."""

    CONNECTING = "connecting"  # socket opening / open, session.created not seen yet
    CREATED = "created"  # session.created seen, not configured yet
    CONFIGURING = "configuring"  # session.update sent, waiting for session.updated
    READY = "ready"  # configured, no text sent yet
    STREAMING = "streaming"  # text sent; responses may be running
    FINISHING = "finishing"  # session.finish sent, waiting for session.finished
    FINISHED = "finished"  # session.finished seen (the server closes next)
    FAILED = "failed"  # fatal error event, or the socket closed too early
    CLOSED = "closed"  # the socket is gone


# --- notifications (what the state machine tells the I/O layer) -------------------------------


@dataclass(frozen=True, slots=True)
class Notification:
    """Base of everything :meth:`ClientSession.receive` returns."""


@dataclass(frozen=True, slots=True)
class Created(Notification):
    session: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Configured(Notification):
    """``session.updated``: the session accepts text now."""

    session: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class BufferCommitted(Notification):
    pass


@dataclass(frozen=True, slots=True)
class BufferCleared(Notification):
    pass


@dataclass(frozen=True, slots=True)
class ResponseStarted(Notification):
    response_id: str


@dataclass(frozen=True, slots=True)
class AudioReceived(Notification):
    """One ``response.audio.delta`` of a live response; ``delta`` is still base64.

    ``extra`` carries unknown keys of the event (e.g. the local server's
    ``x_sent_monotonic`` stamp used by benchmarks).
    """

    response_id: str
    delta: str
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True, slots=True)
class ResponseFinished(Notification):
    """``response.done``; ``characters`` is the billed ``usage.characters`` when present."""

    response_id: str
    status: str
    characters: int | None


@dataclass(frozen=True, slots=True)
class ServerFailure(Notification):
    """An ``error`` event. ``fatal`` errors moved the session to FAILED."""

    code: str
    message: str
    fatal: bool
    error: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True, slots=True)
class SessionComplete(Notification):
    """``session.finished``: every response triggered before the finish is done."""


@dataclass(frozen=True, slots=True)
class SessionLost(Notification):
    """The socket closed before the session completed."""

    code: int | None
    reason: str
    after_finish: bool


@dataclass(frozen=True, slots=True)
class Ignored(Notification):
    """An event that changes nothing here (unknown types, per-item bookkeeping, retired audio)."""

    type: str
    why: str


@dataclass(slots=True)
class Tally:
    """What responses counted: one session's (``ClientSession.tally``) or one utterance's
    over all its sessions (``metrics.Recorder``). Billed characters are the sum of
    ``usage.characters`` of the finished responses (protocol.md §5.12)."""

    responses_started: int = 0
    responses: int = 0  # finished (response.done of a response that was not retired)
    deltas: int = 0
    billed_characters: int = 0

    def response_started(self) -> None:
        self.responses_started += 1

    def response_done(self, characters: int | None) -> None:
        self.responses += 1
        self.billed_characters += characters or 0


_TEXT_STATES = (State.READY, State.STREAMING)
_CONFIG_STATES = (State.CONNECTING, State.CREATED)
_LIVE_STATES = (
    State.CONNECTING,
    State.CREATED,
    State.CONFIGURING,
    State.READY,
    State.STREAMING,
    State.FINISHING,
)


class ClientSession:
    """The client's view of one realtime session. Not thread-safe; one I/O owner drives it.

    Typical use (the I/O layer sends what the methods return and feeds what it reads)::

        s = ClientSession(config={"voice": v, "mode": "server_commit"})
        send(s.update())
        for frame in socket: notes = s.receive(messages.parse_server_event(frame))
    """

    def __init__(self, *, config: Mapping[str, Any]) -> None:
        self.config: dict[str, Any] = dict(config)
        self.state = State.CONNECTING
        self.session_id: str | None = None
        self.effective: dict[str, Any] = {}
        self.current_response: str | None = None
        self.tally = Tally()  # this session's responses, deltas and billed characters
        self.error: ServerFailure | None = None
        self._retired: set[str] = set()
        self._anon = 0
        self._finished_seen = False

    # --- queries ------------------------------------------------------------------------------

    @property
    def responses_started(self) -> int:
        return self.tally.responses_started

    @property
    def responses_done(self) -> int:
        return self.tally.responses

    @property
    def deltas(self) -> int:
        return self.tally.deltas

    @property
    def billed_characters(self) -> int:
        return self.tally.billed_characters

    @property
    def complete(self) -> bool:
        """``session.finished`` was seen: nothing more will come for this session."""
        return self._finished_seen

    @property
    def live(self) -> bool:
        """The session can still produce events."""
        return self.state in _LIVE_STATES

    @property
    def response_active(self) -> bool:
        return self.current_response is not None

    def is_retired(self, response_id: str) -> bool:
        return response_id in self._retired

    # --- client events ------------------------------------------------------------------------

    def _require(self, what: str, allowed: tuple[State, ...]) -> None:
        if self.state not in allowed:
            names = ", ".join(s.name for s in allowed)
            cls = ClosedError if self.state is State.CLOSED else UsageError
            raise cls(f"cannot {what} in state {self.state.name} (allowed: {names})")

    def update(self, **overrides: Any) -> m.SessionUpdate:
        """``session.update`` with the configuration; legal before configuration only (§5.4).

        It may be sent before ``session.created`` was read (§5.2 step 3).
        """
        self._require("send session.update", _CONFIG_STATES)
        self.config.update(overrides)
        self.state = State.CONFIGURING
        return m.SessionUpdate(event_id=m.new_event_id(), session=dict(self.config))

    def append(self, text: str) -> m.InputTextBufferAppend:
        """``input_text_buffer.append``; moves READY → STREAMING."""
        self._require("append text", _TEXT_STATES)
        if not isinstance(text, str):
            raise UsageError(f"text must be str, got {type(text).__name__}")
        self.state = State.STREAMING
        return m.InputTextBufferAppend(event_id=m.new_event_id(), text=text)

    def commit(self) -> m.InputTextBufferCommit:
        """``input_text_buffer.commit``: synthesize what is buffered now (both modes, §5.6)."""
        self._require("commit", (State.STREAMING,))
        return m.InputTextBufferCommit(event_id=m.new_event_id())

    def clear(self) -> m.InputTextBufferClear:
        """``input_text_buffer.clear``: drop text the server has not cut yet."""
        self._require("clear the text buffer", _TEXT_STATES)
        return m.InputTextBufferClear(event_id=m.new_event_id())

    def finish(self) -> m.SessionFinish:
        """``session.finish``: the server flushes, finishes every response, then closes."""
        self._require("finish", _TEXT_STATES)
        self.state = State.FINISHING
        return m.SessionFinish(event_id=m.new_event_id())

    def retire_current(self) -> str | None:
        """Barge-in: every later delta of the current response is dropped. Returns its id."""
        rid = self.current_response
        if rid is not None:
            self._retired.add(rid)
            self.current_response = None
        return rid

    # --- server events ------------------------------------------------------------------------

    def receive(self, event: m.ServerEvent) -> list[Notification]:
        """Feed one parsed server event; return what the I/O layer should act upon."""
        if isinstance(event, m.ResponseAudioDelta):  # hot path first
            return [self._on_delta(event)]
        if not self.live:
            return [Ignored(event.type, f"session is {self.state.name}")]
        handler = _HANDLERS.get(type(event))
        if handler is None:
            return [Ignored(event.type, "no state change")]
        return [handler(self, event)]

    def _on_session_created(self, event: m.SessionCreated) -> Notification:
        sid = event.session.get("id")
        self.session_id = sid if isinstance(sid, str) else self.session_id
        if self.state is State.CONNECTING:
            self.state = State.CREATED
        return Created(event.session)

    def _on_session_updated(self, event: m.SessionUpdated) -> Notification:
        self.effective = dict(event.session)
        if self.state is State.CONFIGURING:
            self.state = State.READY
            return Configured(event.session)
        return Ignored(event.type, f"unexpected in {self.state.name}")

    def _on_response_created(self, event: m.ResponseCreated) -> Notification:
        rid = event.response_id or self._anonymous_id()
        self.current_response = rid
        self.tally.response_started()
        return ResponseStarted(rid)

    def _on_response_done(self, event: m.ResponseDone) -> Notification:
        rid = event.response_id or self.current_response or ""
        if rid == self.current_response or not event.response_id:
            self.current_response = None
        if rid in self._retired:
            return Ignored(event.type, "retired response")
        chars = event.characters
        self.tally.response_done(chars)
        return ResponseFinished(rid, event.status, chars)

    def _on_session_finished(self, event: m.SessionFinished) -> Notification:
        self.state = State.FINISHED
        self._finished_seen = True
        self.current_response = None
        return SessionComplete()

    def _anonymous_id(self) -> str:
        self._anon += 1
        return f"resp_local_{self._anon}"

    def _on_delta(self, event: m.ResponseAudioDelta) -> Notification:
        rid = self.accept_delta(event.response_id)
        if rid is None:
            why = "retired response" if self.live else f"session is {self.state.name}"
            return Ignored(event.type, why)
        return AudioReceived(rid, event.delta, event.extra)

    def accept_delta(self, response_id: str | None) -> str | None:
        """One ``response.audio.delta`` with this (optional) id: the response it belongs to,
        or ``None`` when it is to be dropped (the session is not live, or the response was
        retired). What :meth:`receive` does for a delta, without an event or notification
        object: the client's reader calls it for every delta (the hot path)."""
        if self.state not in _LIVE_STATES:  # not self.live: no property call per delta
            return None
        rid = response_id or self.current_response
        if rid is None:
            # A delta with neither a response id nor a response.created before it: tolerate
            # (optional ids, §5.5) by opening an anonymous response.
            rid = self.current_response = self._anonymous_id()
            self.tally.response_started()
        if rid in self._retired:
            return None
        self.tally.deltas += 1
        return rid

    def _on_error(self, event: m.Error) -> ServerFailure:
        # invalid_request_error is recoverable (v2 SDK, §5.9) unless it refused the
        # configuration: a session that failed session.update cannot be used at all.
        fatal = not event.recoverable or self.state in (State.CONFIGURING, *_CONFIG_STATES)
        note = ServerFailure(event.code, event.message, fatal, event.error)
        if fatal:
            self.state = State.FAILED
            self.error = note
        return note

    def connection_closed(self, code: int | None, reason: str = "") -> list[Notification]:
        """The socket is gone. Returns :class:`SessionLost` unless the session had completed."""
        was = self.state
        self.state = State.CLOSED
        self.current_response = None
        if was is State.FINISHED or was is State.CLOSED:
            return []
        return [SessionLost(code, reason, after_finish=was is State.FINISHING)]


def _constant(note: Notification) -> Callable[[ClientSession, m.ServerEvent], Notification]:
    return lambda _session, _event: note


# The server events that change something here, by class (the delta is handled first).
_HANDLERS: dict[type[m.ServerEvent], Callable[[ClientSession, Any], Notification]] = {
    m.SessionCreated: ClientSession._on_session_created,
    m.SessionUpdated: ClientSession._on_session_updated,
    m.ResponseCreated: ClientSession._on_response_created,
    m.ResponseDone: ClientSession._on_response_done,
    m.InputTextBufferCommitted: _constant(BufferCommitted()),
    m.InputTextBufferCleared: _constant(BufferCleared()),
    m.SessionFinished: ClientSession._on_session_finished,
    m.Error: ClientSession._on_error,
}
