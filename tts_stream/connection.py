"""One realtime WebSocket session, driving the pure state machine of :mod:`.protocol`.

Role: the thin I/O shell around :class:`~tts_stream.protocol.ClientSession`. It opens
``wss://…/api-ws/v1/realtime?model=…`` with the headers of protocol.md §3.2 (picows: a
Cython frame parser on asyncio's buffered-protocol callbacks, 0.58x the CPU of
``websockets`` per delta, bench/README.md; no compression, which picows does not offer and
which would cost ~8x CPU on base64 audio; a message limit that fits large audio deltas),
sends ``session.update`` and waits for ``session.updated`` (§6.4).

There is no reader task. picows calls the frame callback from the transport's read
callback; it does all the per-frame work (reassembly of fragmented messages, JSON, the
state machine, base64 with ``validate=True``) and hands the result on at once: an audio
delta straight to the consumer's :attr:`Connection.deliver_nowait` when that can take it
without waiting and nothing is queued before it (the speech writes it into the fan-out
from there: one loop pass per delta from the socket to the sink), anything else into a
*bounded* :class:`~tts_stream.channel.Channel` (``events``). When that channel is full the
callback pauses reading on the transport until the consumer has taken half of it; TCP flow
control then pushes back on the server.

Keepalive is ours, on loop timers (no task per connection: a pool holds hundreds of
spares). A ping goes out only after the connection has *waited on the network* for
``ping_interval`` s with nothing arriving; the peer is declared dead (close 1011) when,
after that ping, another ``ping_timeout`` s of such waiting passed with neither a pong nor
any frame. Time with reading paused by a slow consumer never counts: the server is then
blocked on us, not silent, and its pong may sit unread behind audio (issue 9: websockets'
own keepalive closed healthy sessions that way).

Boundary: third-party exceptions (picows, OSError, ssl) are translated here into the
:mod:`~tts_stream.errors` tree; this module knows nothing about sinks, pools or retries.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import anyio
import numpy as np
import orjson
import pybase64
from picows import (
    WSCloseCode,
    WSFrame,
    WSHandshakeError,
    WSInvalidStatusError,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)

from . import messages as m
from . import protocol as p
from .audio import PCM16, Frame
from .channel import Channel
from .config import Endpoint
from .decode import ResponseDecoders
from .errors import (
    ClosedError,
    ConnectionFailed,
    ConnectionLost,
    HandshakeRejected,
    ProtocolViolation,
    ServerError,
    Timeout,
    UsageError,
    redact,
    server_error,
)

__all__ = ["MAX_MESSAGE_BYTES", "Audio", "Connection", "Item", "ResponseBegan"]

log = logging.getLogger(__name__)
_ws_log = logging.getLogger(__name__ + ".ws")  # picows' own connection/handshake trace

# 16 MiB: a whole second of 48 kHz PCM is 128 kB of base64; a 1 MiB limit would refuse a
# long delta from a server that sends big chunks (research/feasibility.md §7).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_ABORT_CLOSE_TIMEOUT_S = 0.25
_DELTA_TYPE = m.ResponseAudioDelta.TYPE
_TEXT, _CONT, _BINARY = WSMsgType.TEXT, WSMsgType.CONTINUATION, WSMsgType.BINARY
_PONG, _CLOSE = WSMsgType.PONG, WSMsgType.CLOSE
_monotonic = time.monotonic

#: The consumer's synchronous fast path for one decoded delta: ``(samples, response_id,
#: received_at, server_sent_at) -> bool``, True when it took the audio without waiting.
DeliverNowait = Callable[[PCM16, str, float, "float | None"], bool]


@dataclass(frozen=True, eq=False, slots=True)
class Audio(p.Notification):
    """A decoded audio delta that went through the channel: its samples, their offset in
    this connection's audio, the response, the monotonic time it arrived, and the server's
    send stamp when it adds one (the local server's ``x_sent_monotonic`` fault knob for
    benchmarks; same host, same monotonic clock), else ``None``.
    """

    samples: PCM16
    offset: int
    response_id: str
    received_at: float
    server_sent_at: float | None = None

    @property
    def frame(self) -> Frame:
        """The delta as a :class:`~tts_stream.audio.Frame` (built on each access)."""
        return Frame(self.samples, self.offset, self.response_id, self.received_at)


@dataclass(frozen=True, slots=True)
class ResponseBegan(p.Notification):
    """``response.created``, stamped with the monotonic time it was received."""

    response_id: str
    received_at: float


Item = p.Notification  # what comes out of Connection.events: Audio or another notification


class _Listener(WSListener):
    """picows' callbacks, forwarded to the connection (which stays a plain class)."""

    def __init__(self, conn: Connection) -> None:
        super().__init__()
        self._conn = conn

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._conn._transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self._conn._on_frame(frame)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._conn._on_disconnected()

    def pause_writing(self) -> None:
        pass  # text events are small and bounded by the speech's text budget

    def resume_writing(self) -> None:
        pass


class Connection:
    """One realtime session over one WebSocket (single use: the server closes it at the end).

    ``async with Connection(endpoint, model=..., session={...}) as conn`` connects, configures
    and returns once ``session.updated`` arrived; then ``append``/``commit``/``clear``/
    ``finish`` send text events and ``events`` yields :class:`Audio` and the other
    :mod:`~tts_stream.protocol` notifications, ending when the socket closes.

    ``deliver_nowait`` (settable, default ``None``): the consumer's synchronous fast path
    for audio (:data:`DeliverNowait`). It is called from the frame callback, only while
    ``events`` is empty (so order is kept); when it returns False the delta goes into
    ``events`` as an :class:`Audio`. It must not raise.

    Raises on enter: :class:`~tts_stream.errors.AuthenticationError` (HTTP 401/403),
    :class:`~tts_stream.errors.RateLimited` (429), :class:`HandshakeRejected` (other
    statuses), :class:`Timeout`, :class:`ConnectionFailed`, or the
    :class:`~tts_stream.errors.ServerError` that refused the configuration.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        model: str,
        session: Mapping[str, Any],
        open_timeout: float = 10.0,
        configure_timeout: float = 10.0,
        close_timeout: float = 2.0,
        max_size: int = MAX_MESSAGE_BYTES,
        channel_size: int = 64,
        ping_interval: float | None = 20.0,
        ping_timeout: float = 20.0,
    ) -> None:
        if ping_interval is not None and (ping_interval <= 0 or ping_timeout <= 0):
            raise UsageError("ping_interval and ping_timeout must be positive (or None)")
        self.endpoint = endpoint
        self.model = model
        self.protocol = p.ClientSession(config=session)
        fmt = str(session.get("response_format", "pcm"))
        rate = int(session.get("sample_rate", 24000))
        # wav/mp3/opus: one incremental decoder per response (decode.py); pcm: none.
        self._decoders = None if fmt == "pcm" else ResponseDecoders(fmt, rate)
        self._secret = endpoint.api_key or None
        self._open_timeout = open_timeout
        self._configure_timeout = configure_timeout
        self._close_timeout = close_timeout
        self._max_size = max_size
        self._channel_size = channel_size
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self.deliver_nowait: DeliverNowait | None = None
        self._transport: WSTransport | None = None
        self._channel: Channel[Item] | None = None
        self._entered = False
        self._ready = asyncio.Event()
        self._closed = asyncio.Event()
        self._setup_error: BaseException | None = None
        self._samples, self._closing = 0, False
        self._backlog: collections.deque[Item] = collections.deque()  # the channel is full
        self._paused = False  # reading paused: the backlog waits for room in the channel
        self._room_wanted = False  # _on_room is registered with the channel
        self._ended = False  # the socket closed with items still in the backlog
        self._stopped = False  # a protocol violation or a failure: no more frames are handled
        self._fragments: bytearray | None = None  # a fragmented message being reassembled
        self._fragment_type, self._fragment_size = _TEXT, 0
        self._failure: tuple[int, str] | None = None  # (code, reason) of our own close
        # Keepalive (module docstring): when the connection last started waiting on the
        # network (None while reading is paused), the ping in flight, the timer.
        self._rx_since: float | None = None
        self._ping_at: float | None = None
        self._ka_timer: asyncio.TimerHandle | None = None
        self._dead_cause: str | None = None  # set by the keepalive when it gives up
        self._latency = 0.0
        # Called (synchronously, from the transport's callback) when the socket has closed;
        # the pool uses it to wake the keeper of an idle spare the server closed.
        self.on_closed: Callable[[], None] | None = None
        self.close_code: int | None = None
        self.close_reason = ""

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Connection:
        if self._entered:
            raise ClosedError("a Connection is single-use")
        self._entered = True
        # Before the dial: frames in the same read as the 101 answer are handled at once.
        self._channel = Channel[Item](self._channel_size)
        await self._connect()
        try:
            if self._ping_interval is not None:
                self._arm(self._ping_interval)
            # Closed first (an unknown model, maybe in the very read of the 101 answer):
            # the close tells why, raised below.
            if not self._closed.is_set():
                with contextlib.suppress(ConnectionLost):
                    await self._send(self.protocol.update())
            await self._wait_configured()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the socket (code 1000) without finishing the session. Idempotent."""
        if not self._closing:
            self._closing = True
            if self._channel is not None:
                # Nobody reads any more: what arrives is dropped, reading resumes (the
                # channel's wake-up), so the server's close frame is read.
                self._channel.close()
            transport = self._transport
            if transport is not None and not self._closed.is_set():
                with contextlib.suppress(Exception):
                    transport.send_close(WSCloseCode.OK, b"bye")
        await self._wait_disconnected()

    async def _wait_disconnected(self) -> None:
        transport = self._transport
        if transport is None or self._closed.is_set():
            self._cancel_timer()
            return
        # Retiring a live session (barge-in, abort): audio may be queued unread, so the
        # server's close frame can sit behind it; do not wait long for it.
        limit = self._close_timeout if self.protocol.complete else min(
            self._close_timeout, _ABORT_CLOSE_TIMEOUT_S)  # fmt: skip
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await self._closed.wait()
        if not self._closed.is_set():
            transport.disconnect(graceful=False)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # connection_lost is a loop pass away
                    await self._closed.wait()

    # --- state --------------------------------------------------------------------------------

    @property
    def state(self) -> p.State:
        return self.protocol.state

    @property
    def is_usable(self) -> bool:
        """Configured, no text sent yet and the socket still open: fit to be handed out."""
        return self.state is p.State.READY and not self._closed.is_set() and not self._closing

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def latency(self) -> float:
        """Round-trip time (s) of the last keepalive ping answered; 0.0 before any."""
        return self._latency

    @property
    def extensions(self) -> tuple[str, ...]:
        """The WebSocket extensions the server agreed to (none: we offer none)."""
        transport = self._transport
        if transport is None or transport.response is None:
            return ()
        value = transport.response.headers.get("Sec-WebSocket-Extensions", "")
        return tuple(e.strip() for e in value.split(",") if e.strip())

    def close_cause(self) -> str:
        """Why the socket closed, in words: the keepalive gave up, the server closed it
        (with its code and reason), or the TCP connection dropped without a close frame."""
        if self._dead_cause is not None:
            return self._dead_cause
        if self.close_code is None:
            return "still open"
        return _describe_close(self.close_code, self.close_reason)

    async def wait_closed(self) -> None:
        """Return when the socket has closed."""
        await self._closed.wait()

    @property
    def events(self) -> Channel[Item]:
        """The bounded stream of :class:`Audio` and protocol notifications."""
        if self._channel is None:
            raise ClosedError("connection not open")
        return self._channel

    # --- client events ------------------------------------------------------------------------

    async def append(self, text: str) -> None:
        await self._send(self.protocol.append(text))

    async def commit(self) -> None:
        await self._send(self.protocol.commit())

    async def clear(self) -> None:
        await self._send(self.protocol.clear())

    async def finish(self) -> None:
        await self._send(self.protocol.finish())

    def retire_current(self) -> str | None:
        """Drop every later delta of the response in progress (barge-in)."""
        return self.protocol.retire_current()

    async def _send(self, event: m.ClientEvent) -> None:
        transport = self._transport
        if transport is None or self._closing:
            raise ClosedError("connection is closed")
        received = transport.close_handshake.recv if transport.close_handshake else None
        if self._closed.is_set() or received is not None or transport.is_close_frame_sent:
            code, reason = self._close_info(transport)
            raise ConnectionLost(
                f"connection {_describe_close(code, reason)} while sending {event.type}",
                code=code,
                reason=reason,
            )
        transport.send(_TEXT, orjson.dumps(m.to_dict(event)))

    # --- connect + configure ------------------------------------------------------------------

    async def _connect(self) -> None:
        url = self.endpoint.ws_url(self.model)
        secure = url.startswith("wss:")
        headers = self.endpoint.headers()
        trace = _RedactingLogger(_ws_log, self._secret)
        if trace.isEnabledFor(logging.DEBUG):  # the upgrade request, as websockets traced it
            parts = urlsplit(url)
            trace.debug("> GET %s?%s HTTP/1.1", parts.path, parts.query)
            for name, value in headers.items():
                trace.debug("> %s: %s", name, value)
        try:
            async with asyncio.timeout(self._open_timeout):
                await ws_connect(
                    lambda: _Listener(self),
                    url,
                    ssl_context=_default_ssl_context() if secure else None,
                    websocket_handshake_timeout=self._open_timeout,
                    logger_name=trace,
                    enable_auto_ping=False,  # our own keepalive: see the module docstring
                    enable_auto_pong=True,
                    max_frame_size=self._max_size,
                    extra_headers=headers,
                    max_redirects=0,  # never carry the Authorization header elsewhere
                )
        except WSInvalidStatusError as exc:
            # Not chained: the picows exception holds the server's raw response.
            raise _handshake_error(exc, self._secret) from None
        except TimeoutError as exc:
            raise Timeout("the WebSocket handshake", self._open_timeout) from exc
        except OSError as exc:  # ssl.SSLError included
            raise ConnectionFailed(f"cannot connect to {self.endpoint.ws_base}: {exc}") from exc
        except WSHandshakeError as exc:  # its text may quote the server's headers
            raise ConnectionFailed(
                f"cannot connect to {self.endpoint.ws_base}: {self._redact(str(exc))}"
            ) from None
        self._rx_since = _monotonic()

    def _redact(self, text: str) -> str:
        return redact(text, self._secret)

    async def _wait_configured(self) -> None:
        try:
            async with asyncio.timeout(self._configure_timeout):
                await self._ready.wait()
        except TimeoutError as exc:
            raise Timeout("session.updated", self._configure_timeout) from exc
        if self._setup_error is not None:
            raise self._setup_error

    # --- frames (picows' read callback) -------------------------------------------------------

    def _on_frame(self, frame: WSFrame) -> None:
        """One frame from picows: never raises (a violation closes the connection)."""
        if self._stopped:
            return
        kind = frame.msg_type
        try:
            if kind is _TEXT and frame.fin and self._fragments is None:
                self._handle(frame.get_payload_as_memoryview())  # the hot path
            elif kind is _TEXT or kind is _CONT or kind is _BINARY:
                self._on_fragment(frame)
            elif kind is _PONG:
                self._on_pong()
            elif kind is _CLOSE:
                self._on_close_frame(frame)
        except ProtocolViolation as exc:
            log.warning("protocol violation, closing: %s", exc)
            self._fail_setup(exc)
            self._abort(1002, str(exc), WSCloseCode.PROTOCOL_ERROR, "protocol violation")
        except Exception as exc:  # never into picows: it would close with its own words
            log.exception("realtime reader failed")
            self._fail_setup(ConnectionFailed(f"reader failed: {exc!r}"))
            self._abort(1011, repr(exc), WSCloseCode.INTERNAL_ERROR, "client failure")
        if not self._paused:
            self._rx_since = _monotonic()  # waiting on the network again

    def _on_fragment(self, frame: WSFrame) -> None:
        """A data frame of a fragmented message (or a binary one): reassemble, then handle."""
        kind = frame.msg_type
        if kind is not _CONT:
            if self._fragments is not None:
                raise ProtocolViolation("a new message began inside a fragmented one")
            self._fragments, self._fragment_type = bytearray(), kind
        elif self._fragments is None:
            raise ProtocolViolation("a continuation frame without a message to continue")
        buf = self._fragments
        self._fragment_size += frame.payload_size
        if self._fragment_type is _TEXT:  # binary: only its size is kept (it is ignored)
            buf += frame.get_payload_as_memoryview()
            if len(buf) > self._max_size:
                raise ProtocolViolation(f"message over {self._max_size} bytes")
        if not frame.fin:
            return
        size, self._fragments, self._fragment_size = self._fragment_size, None, 0
        if self._fragment_type is _TEXT:
            self._handle(buf)
        else:
            log.warning("ignoring a binary frame (%d bytes): text only", size)

    def _on_pong(self) -> None:
        if self._ping_at is not None:
            self._latency = _monotonic() - self._ping_at
            self._ping_at = None  # answered: the peer is alive

    def _on_close_frame(self, frame: WSFrame) -> None:
        transport = self._transport
        assert transport is not None
        if not transport.is_close_frame_sent:
            code = frame.get_close_code()
            transport.send_close(WSCloseCode.OK if code is WSCloseCode.NO_INFO else code)
        transport.disconnect()

    def _abort(self, code: int, reason: str, wire: WSCloseCode, wire_reason: str) -> None:
        """Close after a failure of ours: no more frames are handled."""
        self._stopped = True
        self._failure = (code, reason)
        transport = self._transport
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.send_close(wire, wire_reason.encode())
            transport.disconnect()

    def _handle(self, payload: memoryview | bytearray) -> None:
        """One text message: parse it, run it through the state machine, hand it on."""
        secret = self._secret
        split = _split_delta(payload)
        if split is not None:  # the hot path: a delta, its base64 never a str
            head, b64 = split
            rid = head.get("response_id")
            try:
                pcm = pybase64.b64decode(b64, None, True)  # (altchars, validate=True)
            except ValueError:
                pcm = None  # not base64 as it stands (a JSON escape?): the whole frame decides
            if pcm is not None and (rid is None or type(rid) is str):
                if secret:
                    rid = _redact_id(rid, secret)
                rid = self.protocol.accept_delta(rid)
                if rid is not None:  # else not live, or a retired response (barge-in)
                    self._on_pcm(pcm, rid, head.get("x_sent_monotonic"))
                return
        data = m.load_event_object(payload)
        if data["type"] == _DELTA_TYPE:
            delta, rid = data.get("delta"), data.get("response_id")
            if type(delta) is str and (rid is None or type(rid) is str):
                if secret:
                    rid = _redact_id(rid, secret)
                self._on_delta(delta, rid, data.get("x_sent_monotonic"))
                return
        if secret:  # a server echoing the key: no field of its events may carry it on
            data = _redact_event(data, payload, secret)
        for note in self.protocol.receive(m.server_event_from_dict(data)):
            if isinstance(note, p.AudioReceived):  # a delta the fast test above refused
                self._on_delta(note.delta, note.response_id, note.extra.get("x_sent_monotonic"))
            else:
                self._on_note(note)

    def _on_delta(self, delta: str, response_id: str | None, stamp: object) -> None:
        """One audio delta whose frame was parsed whole (no event or notification object)."""
        rid = self.protocol.accept_delta(response_id)
        if rid is None:
            return  # not live, or a retired response (barge-in)
        try:
            data = pybase64.b64decode(delta, None, True)  # altchars=None, validate=True
        except ValueError as exc:
            raise ProtocolViolation(f"audio delta is not valid base64: {exc}") from exc
        self._on_pcm(data, rid, stamp)

    def _on_pcm(self, data: bytes, rid: str, stamp: object) -> None:
        """The decoded bytes of an accepted delta: samples, then to the consumer."""
        if self._decoders is not None:
            samples = self._decoders.feed(rid, data)
            if not samples.size:
                return
        elif len(data) % 2:
            raise ProtocolViolation(f"PCM16 delta has an odd number of bytes ({len(data)})")
        else:
            samples = np.frombuffer(data, _PCM16)  # a view of the decoded bytes: no copy
        self._audio(samples, rid, stamp)

    def _audio(self, samples: PCM16, rid: str, stamp: object) -> None:
        now = _monotonic()  # the delta's one clock reading, passed on to every consumer
        sent_at = stamp if stamp is None or type(stamp) is float else _stamp(stamp)
        offset = self._samples
        self._samples = offset + len(samples)  # len: no shape tuple per delta
        deliver = self.deliver_nowait
        channel = self._channel
        assert channel is not None
        if (
            deliver is not None
            and not channel.queued
            and not self._backlog
            and deliver(samples, rid, now, sent_at)
        ):
            return
        self._queue(Audio(samples, offset, rid, now, sent_at))

    def _on_note(self, note: p.Notification) -> None:
        """Every notification but audio: what the consumer gets of it."""
        if isinstance(note, p.ResponseFinished) and self._decoders is not None:
            tail = self._decoders.finish()  # what the decoder held back to the end
            if tail.size:
                self._audio(tail, note.response_id, None)
            self._queue(note)
        elif isinstance(note, p.ResponseStarted):
            self._queue(ResponseBegan(note.response_id, _monotonic()))
        elif isinstance(note, p.Configured):
            self._ready.set()
        elif isinstance(note, p.ServerFailure):
            if note.fatal and not self._ready.is_set():
                msg = note.message or "session refused"
                self._fail_setup(server_error(msg, code=note.code))
            self._queue(note)
        elif isinstance(note, p.Ignored):
            log.debug("ignored %s: %s", note.type, note.why)
        elif not isinstance(note, p.Created):
            self._queue(note)

    # --- back-pressure ------------------------------------------------------------------------

    def _queue(self, item: Item) -> None:
        """Into the channel, in order; when it is full the item waits in the backlog and
        reading pauses until the consumer made room (the channel never holds more than its
        capacity; the backlog at most what one socket read brought)."""
        if self._backlog or not self._put(item):
            self._backlog.append(item)
            self._hold()

    def _put(self, item: Item) -> bool:
        """True when ``item`` is in the channel, or dropped because the consumer is gone."""
        channel = self._channel
        assert channel is not None
        try:
            channel.send_nowait(item)
        except anyio.WouldBlock:
            return False
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the consumer went away (aclose): nothing to deliver
        return True

    def _hold(self) -> None:
        transport, channel = self._transport, self._channel
        assert channel is not None
        if not self._paused and transport is not None and not transport.is_disconnected:
            self._paused = True
            self._rx_since = None  # held by the consumer: silence does not count
            transport.underlying_transport.pause_reading()
        if not self._room_wanted:
            self._room_wanted = True
            channel.on_room(self._on_room)

    def _on_room(self) -> None:
        """The consumer made room: move the backlog on, then read again."""
        self._room_wanted = False
        backlog = self._backlog
        while backlog:
            if not self._put(backlog[0]):
                self._hold()
                return
            backlog.popleft()
        if self._ended:
            assert self._channel is not None
            self._channel.close_send()
        if self._paused:
            self._paused = False
            self._rx_since = _monotonic()
            transport = self._transport
            if transport is not None and not transport.is_disconnected:
                transport.underlying_transport.resume_reading()

    # --- keepalive (loop timers) --------------------------------------------------------------

    def _arm(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._ka_timer = loop.call_later(max(delay, 0.001), self._keepalive)

    def _cancel_timer(self) -> None:
        if self._ka_timer is not None:
            self._ka_timer.cancel()
            self._ka_timer = None

    def _keepalive(self) -> None:
        """Ping after ``ping_interval`` s of network silence; give up ``ping_timeout`` s later.

        Frames only stamp ``_rx_since``; this timer looks at it when it fires and re-arms
        itself for the time left, so no frame ever touches a timer.
        """
        self._ka_timer = None
        transport = self._transport
        interval, pong_within = self._ping_interval, self._ping_timeout
        if self._closed.is_set() or transport is None or interval is None:
            return
        since, now, ping_at = self._rx_since, _monotonic(), self._ping_at
        if ping_at is None:
            if since is not None and now - since >= interval:
                transport.send_ping()
                self._ping_at = now
                self._arm(pong_within)
            else:
                self._arm(interval if since is None else interval - (now - since))
            return
        if since is None:
            self._arm(pong_within)  # reading is paused: the pong may sit behind audio
            return
        # Counted from the ping, or from the last frame after it (the peer lives).
        wait = max(since, ping_at) + pong_within - now
        if wait > 0:
            self._arm(wait)
            return
        self._dead_cause = (
            f"keepalive timeout: no pong within {pong_within:g} s "
            f"(and nothing received for {now - since:.1f} s)"
        )
        log.warning("%s; closing the connection", self._dead_cause)
        self._stopped = True
        with contextlib.suppress(Exception):
            transport.send_close(WSCloseCode.INTERNAL_ERROR, b"keepalive ping timeout")
        transport.disconnect()

    # --- the end ------------------------------------------------------------------------------

    def _close_info(self, transport: WSTransport) -> tuple[int, str]:
        """(code, reason) of the close, redacted: ours after a failure, the keepalive's, the
        server's close frame, or 1006."""
        if self._dead_cause is not None:
            return 1011, self._dead_cause
        if self._failure is not None:
            return self._failure
        hs = transport.close_handshake
        if hs is not None and hs.recv is not None:
            code = hs.recv.code.value
            return (1005 if code == 0 else code), self._redact(hs.recv.reason or "")
        if hs is not None and hs.sent is not None and hs.sent.code.value in _PARSER_CODES:
            # picows' own parser refused a frame (bad opcode, masked, too big): it sent the
            # close and logged why.
            return hs.sent.code.value, f"invalid frame ({hs.sent.reason or hs.sent.code.value})"
        return 1006, "connection dropped without a close frame"

    def _on_disconnected(self) -> None:
        """The socket has closed: tell the state machine and the consumer."""
        self._cancel_timer()
        self._rx_since = None
        self._stopped = True
        transport, send = self._transport, self._channel
        assert transport is not None and send is not None
        code, reason = self._close_info(transport)
        if code in _PARSER_CODES and self._failure is None and self._dead_cause is None:
            hs = transport.close_handshake
            if hs is None or hs.recv is None:
                self._fail_setup(ProtocolViolation(reason))
        self.close_code, self.close_reason = code, reason
        self._closed.set()
        if self.on_closed is not None:
            self.on_closed()
        notes = self.protocol.connection_closed(code, reason)
        if not self._ready.is_set():
            self._fail_setup(
                ConnectionLost(
                    f"connection {self.close_cause()} before session.updated "
                    f"(model {self.model!r}: the service closes the session of a model "
                    "it does not know this way)",
                    code=code,
                    reason=reason,
                )
            )
        for note in notes:
            self._queue(note)  # behind the backlog: the end is never dropped
        if self._backlog:
            self._ended = True  # closed once the backlog is in (_on_room)
        else:
            send.close_send()

    def _fail_setup(self, exc: BaseException) -> None:
        if not self._ready.is_set():
            self._setup_error = exc
            self._ready.set()


_PARSER_CODES = (1002, 1007, 1009)  # what picows' frame parser closes with
_PCM16 = np.dtype("<i2")  # a dtype object: frombuffer would parse the string every delta


_DELTA_KEY = b',"delta":"'
_KEY_LEN = len(_DELTA_KEY)
_HEAD_MAX = 512  # where a delta's "delta" key is looked for (the fields before it are short)


def _split_delta(payload: memoryview | bytearray) -> tuple[dict[str, Any], memoryview] | None:
    """A delta frame as the service and the local server send it, compact JSON with
    ``delta`` last, split without parsing its base64 as JSON: (the event without ``delta``,
    a view of the base64); None for any other frame, which is parsed whole.

    The frame is ``H + ,"delta":" + B + "}``. When ``H + }`` parses to a delta event and B
    is base64 (the caller decodes it and parses the frame whole if it is not), that frame
    is the same JSON object with ``"delta": B``: a quote never stands unescaped inside a
    JSON string, so the key found is a key, and B, base64 alone, is a string's content.
    It spares the JSON parser the whole base64 (a str of 6.4 kB per 100 ms at 24 kHz).
    """
    n = len(payload)
    if n < 2 or payload[n - 1] != 0x7D or payload[n - 2] != 0x22:  # not ending in "}
        return None
    head = bytes(payload[:_HEAD_MAX])
    i = head.find(_DELTA_KEY)
    if i < 0:
        return None
    try:
        data = orjson.loads(head[:i] + b"}")
    except orjson.JSONDecodeError:
        return None
    if (
        type(data) is not dict
        or data.get("type") != _DELTA_TYPE
        or type(data.get("event_id", "")) is not str
    ):
        return None
    return data, memoryview(payload)[i + _KEY_LEN : n - 2]


def _redact_id(rid: str | None, secret: str) -> str | None:
    """A delta's response id without the key: the one text field a delta carries on."""
    return rid.replace(secret, "sk-***") if rid and secret in rid else rid


def _stamp(value: object) -> float | None:
    """The server's send stamp as a float (an int is one too), else None."""
    return float(value) if isinstance(value, int | float) else None


@cache
def _default_ssl_context() -> ssl.SSLContext:
    """One default client context (certificate and host name checks, SNI) for every dial:
    building one loads the CA store, milliseconds a spare otherwise."""
    return ssl.create_default_context()


class _RedactingLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger handed to picows: its trace (level 9) prints the upgrade request, whose
    ``Authorization: Bearer sk-...`` header is the key; it is replaced before logging."""

    def __init__(self, logger: logging.Logger, secret: str | None) -> None:
        super().__init__(logger, {})
        self._secret = secret

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if level == logging.INFO:
            level = logging.DEBUG  # picows' per-connection lines: a pool dials hundreds
        if self.isEnabledFor(level):
            text = str(msg) % args if args else str(msg)
            self.logger.log(level, "%s", _redact_fragments(text, self._secret), **kwargs)


def _redact_fragments(text: str, secret: str | None, shortest: int = 6) -> str:
    """Redact ``secret`` and any piece of it of ``shortest`` characters or more.

    A trace that shortens a long frame to its head and tail ("...") can cut an echoed key
    in two; each part is still a secret. Only for DEBUG traces: it is
    quadratic in the key's length.
    """
    if not secret:
        return text
    text = text.replace(secret, "sk-***")
    n = len(secret)
    for size in range(n - 1, shortest - 1, -1):
        for i in range(n - size + 1):
            piece = secret[i : i + size]
            if piece in text:
                text = text.replace(piece, "sk-***")
    return text


def _describe_close(code: int | None, reason: str) -> str:
    if code == 1006:
        return "dropped by the server without a close frame (1006)"
    return f"closed by the server with code {code}" + (f" ({reason!r})" if reason else "")


def _redact_event(
    data: dict[str, Any], raw: memoryview | bytearray, secret: str
) -> dict[str, Any]:
    """``data`` with ``secret`` replaced in every field (a server echoing the key)."""
    if data["type"] != _DELTA_TYPE:
        text, key = bytes(raw), secret.encode()
        if key not in text:
            return data
        redacted: dict[str, Any] = orjson.loads(text.replace(key, b"sk-***"))
        return redacted
    # A delta: only the short fields; searching 100 ms of base64 costs ~2 us a delta.
    for k, v in data.items():
        if k != "delta" and isinstance(v, str) and secret in v:
            data[k] = v.replace(secret, "sk-***")
    return data


def _handshake_error(
    exc: WSInvalidStatusError, secret: str | None
) -> ServerError | HandshakeRejected:
    """Our error for an HTTP answer to the upgrade; every field from the body is redacted.

    The body has the enrollment API's error shape (``messages.parse_enrollment_error``);
    picows hands over what arrived with the status line (``raw_body``).
    """
    status = int(exc.response.status) if exc.response is not None else 0
    try:
        body = orjson.loads(exc.raw_body or b"")
    except orjson.JSONDecodeError:
        body = None
    info = m.parse_enrollment_error(body).redacted(secret)
    if status in (401, 403, 429):
        return server_error(
            info.message or f"WebSocket handshake rejected with HTTP {status}",
            code=info.code,
            status=status,
            request_id=info.request_id,
        )
    return HandshakeRejected(status, info.message, code=info.code)
