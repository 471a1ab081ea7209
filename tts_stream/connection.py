"""One realtime WebSocket session, driving the pure state machine of :mod:`.protocol`.

Role: the thin I/O shell around :class:`~tts_stream.protocol.ClientSession`. It opens
``wss://…/api-ws/v1/realtime?model=…`` with the headers of protocol.md §3.2
(``websockets``, ``compression=None`` because deflate costs ~8x CPU on base64 audio, and a
``max_size`` that fits large audio deltas), sends ``session.update`` and waits for
``session.updated`` (§6.4). One reader task, inside a TaskGroup owned by this object's async
context manager, feeds every frame to the state machine, decodes audio deltas on the hot path
(orjson + pybase64 with ``validate=True``) into :class:`~tts_stream.audio.Frame` objects and
hands them, with the other notifications, to the consumer through a *bounded*
:class:`~tts_stream.channel.Channel`: when the consumer is slow, the reader stops reading
and TCP flow control pushes back on the server.

Keepalive is ours, not websockets' (whose pong waits behind unread audio: while
back-pressure holds the reader, websockets pauses the transport, the pong is never parsed
and its keepalive closed healthy sessions with 1011 after ``ping_interval + ping_timeout``,
issue 9). A ping goes out only after the reader has *waited on the network* for
``ping_interval`` s with nothing arriving; the peer is declared dead when, after that ping,
the reader waited another ``ping_timeout`` s with neither a pong nor any frame. Time spent
held by a slow consumer never counts: the server is then blocked on us, not silent.

Boundary: third-party exceptions (websockets, OSError) are translated here into the
:mod:`~tts_stream.errors` tree; this module knows nothing about sinks, pools or retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import anyio
import numpy as np
import orjson
import pybase64
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

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
_ws_log = logging.getLogger(__name__ + ".ws")  # websockets' own frame/handshake trace

# 16 MiB: a whole second of 48 kHz PCM is 128 kB of base64; the default 1 MiB would refuse a
# long delta from a server that sends big chunks (research/feasibility.md §7).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_ABORT_CLOSE_TIMEOUT_S = 0.25
_DELTA_TYPE = m.ResponseAudioDelta.TYPE


@dataclass(frozen=True, eq=False, slots=True)
class Audio(p.Notification):
    """A decoded audio delta: the frame, plus the server's send stamp when it adds one.

    ``server_sent_at`` is the delta's ``x_sent_monotonic`` key (a local-server fault knob for
    benchmarks; same host, same monotonic clock), else ``None``.
    """

    frame: Frame
    server_sent_at: float | None = None


@dataclass(frozen=True, slots=True)
class ResponseBegan(p.Notification):
    """``response.created``, stamped with the monotonic time the reader received it."""

    response_id: str
    received_at: float


Item = p.Notification  # what comes out of Connection.events: Audio or another notification


class Connection:
    """One realtime session over one WebSocket (single use: the server closes it at the end).

    ``async with Connection(endpoint, model=..., session={...}) as conn`` connects, configures
    and returns once ``session.updated`` arrived; then ``append``/``commit``/``clear``/
    ``finish`` send text events and ``events`` yields :class:`Audio` and the other
    :mod:`~tts_stream.protocol` notifications, ending when the socket closes.

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
        self._open_timeout = open_timeout
        self._configure_timeout = configure_timeout
        self._close_timeout = close_timeout
        self._max_size = max_size
        self._channel_size = channel_size
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        # Monotonic time the reader started waiting on the socket; None while it is busy
        # (handling a frame, or held by the consumer). The keepalive measures silence with it.
        self._rx_waiting_since: float | None = None
        self._dead_cause: str | None = None  # set by the keepalive when it gives up
        self._keepalive_wake: asyncio.Future[None] | None = None  # the keepalive's sleep
        self._ws: ClientConnection | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._channel: Channel[Item] | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._closed = asyncio.Event()
        self._setup_error: BaseException | None = None
        self._samples = 0
        self._closing = False
        # Called (synchronously, from the reader) when the socket has closed; the pool uses
        # it to wake the keeper of an idle spare the server closed.
        self.on_closed: Callable[[], None] | None = None
        self.close_code: int | None = None
        self.close_reason = ""

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Connection:
        if self._stack is not None:
            raise ClosedError("a Connection is single-use")
        stack = self._stack = contextlib.AsyncExitStack()
        try:
            self._ws = await self._connect()
            self._channel = Channel[Item](self._channel_size)
            tg = await stack.enter_async_context(asyncio.TaskGroup())
            # LIFO: on exit the socket closes first, so the reader ends and the group exits.
            stack.push_async_callback(self.aclose)
            self._reader_task = tg.create_task(self._reader(), name="tts-stream-ws-reader")
            if self._ping_interval is not None:
                tg.create_task(self._keepalive(self._ping_interval, self._ping_timeout),
                               name="tts-stream-ws-keepalive")  # fmt: skip
            try:
                await self._send(self.protocol.update())
            except ConnectionLost:
                pass  # closed first (an unknown model): the reader tells why, raised below
            await self._wait_configured()
        except BaseException:
            await stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stack is not None:
            await self._stack.aclose()

    async def aclose(self) -> None:
        """Close the socket (code 1000) without finishing the session. Idempotent."""
        if self._closing:
            await self._wait_reader()
            return
        self._closing = True
        if self._channel is not None:
            # Nobody reads any more: a reader blocked on a full channel must not hold the close.
            self._channel.close()
        ws = self._ws
        if ws is not None:
            if not self.protocol.complete:
                # Retiring a live session (barge-in, abort): audio may be queued unread, so
                # the server's close frame can sit behind it; do not wait long for it.
                ws.close_timeout = min(self._close_timeout, _ABORT_CLOSE_TIMEOUT_S)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(1000, "bye"), self._close_timeout + 1.0)
        await self._wait_reader()

    async def _wait_reader(self) -> None:
        task = self._reader_task
        if task is None or task.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), self._close_timeout + 1.0)
        except TimeoutError:
            # The reader is stuck handing an item to a consumer that is gone.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

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

    def close_cause(self) -> str:
        """Why the socket closed, in words: the keepalive gave up, the server closed it
        (with its code and reason), or the TCP connection dropped without a close frame."""
        if self._dead_cause is not None:
            return self._dead_cause
        if self.close_code is None:
            return "still open"
        return _describe_close(self.close_code, self.close_reason)

    async def wait_closed(self) -> None:
        """Return when the socket has closed (the reader ended)."""
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
        ws = self._ws
        if ws is None or self._closing:
            raise ClosedError("connection is closed")
        try:
            await ws.send(m.dumps(event))
        except ConnectionClosed as exc:
            code, reason = _close_info(exc)
            reason = self._redact(reason)
            raise ConnectionLost(
                f"connection {_describe_close(code, reason)} while sending {event.type}",
                code=code,
                reason=reason,
            ) from None  # the websockets exception's text carries the server's reason

    # --- connect + configure ------------------------------------------------------------------

    async def _connect(self) -> ClientConnection:
        url = self.endpoint.ws_url(self.model)
        try:
            return await connect(
                url,
                additional_headers=self.endpoint.headers(),
                compression=None,
                max_size=self._max_size,
                open_timeout=self._open_timeout,
                close_timeout=self._close_timeout,
                user_agent_header=None,  # Endpoint.headers() carries ours
                ping_interval=None,  # our own keepalive: see the module docstring
                logger=_RedactingLogger(_ws_log, self.endpoint.api_key),
            )
        except InvalidStatus as exc:
            # Not chained: the websockets exception holds the server's raw response.
            raise _handshake_error(exc, self.endpoint.api_key) from None
        except TimeoutError as exc:
            raise Timeout("the WebSocket handshake", self._open_timeout) from exc
        except OSError as exc:
            raise ConnectionFailed(f"cannot connect to {self.endpoint.ws_base}: {exc}") from exc
        except InvalidHandshake as exc:  # its text may quote the server's headers
            raise ConnectionFailed(
                f"cannot connect to {self.endpoint.ws_base}: {self._redact(str(exc))}"
            ) from None

    def _redact(self, text: str) -> str:
        return redact(text, self.endpoint.api_key)

    async def _wait_configured(self) -> None:
        try:
            async with asyncio.timeout(self._configure_timeout):
                await self._ready.wait()
        except TimeoutError as exc:
            raise Timeout("session.updated", self._configure_timeout) from exc
        if self._setup_error is not None:
            raise self._setup_error

    # --- reader -------------------------------------------------------------------------------

    async def _reader(self) -> None:
        """Read until the socket closes; then tell the state machine and the consumer."""
        ws, send = self._ws, self._channel
        assert ws is not None and send is not None
        code: int | None = None
        reason = ""
        try:
            await self._read_frames(ws, send)
        except ConnectionClosed as exc:
            code, reason = _close_info(exc)
            if self._dead_cause is not None:
                code, reason = 1011, self._dead_cause
            reason = self._redact(reason)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            code, reason = _close_info_ws(ws)  # the consumer went away: nothing to deliver
        except ProtocolViolation as exc:
            log.warning("protocol violation, closing: %s", exc)
            self._fail_setup(exc)
            with contextlib.suppress(Exception):
                await ws.close(1002, "protocol violation")
            code, reason = 1002, str(exc)
        except Exception as exc:  # never let the reader crash its owner's TaskGroup
            log.exception("realtime reader failed")
            self._fail_setup(ConnectionFailed(f"reader failed: {exc!r}"))
            code, reason = 1011, repr(exc)
        finally:
            self._reader_ended(code, reason, send)

    async def _read_frames(self, ws: ClientConnection, send: Channel[Item]) -> None:
        while True:
            self._rx_waiting_since = time.monotonic()
            raw = await ws.recv()
            self._rx_waiting_since = None
            if not isinstance(raw, str):
                log.warning("ignoring a binary frame (%d bytes): text only", len(raw))
                continue
            for note in self._handle(raw):
                await send.send(note)  # waits while the consumer is slow (back-pressure)

    def _reader_ended(self, code: int | None, reason: str, send: Channel[Item]) -> None:
        self._rx_waiting_since = None
        if self._keepalive_wake is not None:
            _wake(self._keepalive_wake)  # the socket is closed: the keepalive ends
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
        with contextlib.suppress(
            anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.WouldBlock
        ):
            for note in notes:
                send.send_nowait(note)
        send.close_send()

    async def _keepalive(self, interval: float, pong_within: float) -> None:
        """Ping after ``interval`` s of network silence; give up after ``pong_within`` s more.

        Only time the reader spends waiting on the socket counts (module docstring). Never
        raises into the TaskGroup; the reader wakes it when the socket has closed. It sleeps
        on one future and one timer, never by cancellation (a cancelled task leaves reference
        cycles behind, and hundreds of connections each run one keepalive).
        """
        ws = self._ws
        assert ws is not None
        pong: asyncio.Future[float] | None = None
        ping_at = 0.0
        try:
            while not self._closed.is_set():
                since, now = self._rx_waiting_since, time.monotonic()
                if pong is not None and pong.done():
                    if not pong.cancelled():
                        pong.exception()  # retrieved: a close fails it, we see the close anyway
                    pong = None  # answered: the peer is alive
                if pong is None:
                    if since is not None and now - since >= interval:
                        pong = cast("asyncio.Future[float]", await ws.ping())
                        ping_at = now
                        continue
                    wait = interval if since is None else interval - (now - since)
                elif since is None:
                    wait = pong_within  # the reader is busy: the pong may sit behind audio
                else:
                    # Counted from the ping, or from the last frame after it (the peer lives).
                    wait = max(since, ping_at) + pong_within - now
                    if wait <= 0:
                        self._dead_cause = (
                            f"keepalive timeout: no pong within {pong_within:g} s "
                            f"(and nothing received for {now - since:.1f} s)"
                        )
                        log.warning("%s; closing the connection", self._dead_cause)
                        await ws.close(1011, "keepalive ping timeout")
                        return
                await self._keepalive_sleep(max(wait, 0.001), pong)
        except ConnectionClosed:
            return
        except Exception:  # never let the keepalive crash its owner's TaskGroup
            log.exception("keepalive failed")
        finally:
            if pong is not None and pong.done() and not pong.cancelled():
                pong.exception()  # retrieved (a close fails it), so asyncio logs nothing

    async def _keepalive_sleep(self, seconds: float, pong: asyncio.Future[float] | None) -> None:
        """Sleep ``seconds``, or until ``pong`` arrives or the reader ends (``_wake``)."""
        loop = asyncio.get_running_loop()
        wake = self._keepalive_wake = loop.create_future()
        if self._closed.is_set():
            return
        timer = loop.call_later(seconds, _wake, wake)
        if pong is not None:
            pong.add_done_callback(lambda _: _wake(wake))
        try:
            await wake
        finally:
            timer.cancel()
            self._keepalive_wake = None

    def _handle(self, raw: str) -> list[Item]:
        """Parse one frame and run it through the state machine (the per-delta hot path)."""
        data = m.load_event_object(raw)
        secret = self.endpoint.api_key
        if secret:  # a server echoing the key: no field of its events may carry it on
            data = _redact_event(data, raw, secret)
        out: list[Item] = []
        for note in self.protocol.receive(m.server_event_from_dict(data)):
            if isinstance(note, p.AudioReceived):  # hot path first
                audio = self._decode(note)
                if audio.frame.samples.size or self._decoders is None:
                    out.append(audio)
            else:
                self._on_note(note, out)
        return out

    def _on_note(self, note: p.Notification, out: list[Item]) -> None:
        """Every notification but audio: what the consumer gets of it, in ``out``."""
        if isinstance(note, p.ResponseFinished) and self._decoders is not None:
            tail = self._decoders.finish()  # what the decoder held back to the end
            if tail.size:
                out.append(self._frame(tail, note.response_id, {}))
            out.append(note)
        elif isinstance(note, p.ResponseStarted):
            out.append(ResponseBegan(note.response_id, time.monotonic()))
        elif isinstance(note, p.Configured):
            self._ready.set()
        elif isinstance(note, p.ServerFailure):
            if note.fatal and not self._ready.is_set():
                msg = note.message or "session refused"
                self._fail_setup(server_error(msg, code=note.code))
            out.append(note)
        elif isinstance(note, p.Ignored):
            log.debug("ignored %s: %s", note.type, note.why)
        elif not isinstance(note, p.Created):
            out.append(note)

    def _decode(self, note: p.AudioReceived) -> Audio:
        try:
            data = pybase64.b64decode(note.delta, validate=True)
        except ValueError as exc:
            raise ProtocolViolation(f"audio delta is not valid base64: {exc}") from exc
        if self._decoders is not None:
            return self._frame(self._decoders.feed(note.response_id, data), note.response_id,
                               note.extra)  # fmt: skip
        if len(data) % 2:
            raise ProtocolViolation(f"PCM16 delta has an odd number of bytes ({len(data)})")
        return self._frame(np.frombuffer(data, dtype="<i2"), note.response_id, note.extra)

    def _frame(self, samples: PCM16, response_id: str, extra: Mapping[str, Any]) -> Audio:
        frame = Frame(samples, self._samples, response_id, time.monotonic())
        self._samples += int(samples.shape[0])
        stamp = extra.get("x_sent_monotonic")
        return Audio(frame, float(stamp) if isinstance(stamp, int | float) else None)

    def _fail_setup(self, exc: BaseException) -> None:
        if not self._ready.is_set():
            self._setup_error = exc
            self._ready.set()


class _RedactingLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger handed to websockets: its DEBUG handshake trace prints every request
    header, ``Authorization: Bearer sk-...`` included; the key is replaced before logging."""

    def __init__(self, logger: logging.Logger, secret: str | None) -> None:
        super().__init__(logger, {})
        self._secret = secret

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            text = str(msg) % args if args else str(msg)
            self.logger.log(level, "%s", _redact_fragments(text, self._secret), **kwargs)


def _redact_fragments(text: str, secret: str | None, shortest: int = 6) -> str:
    """Redact ``secret`` and any piece of it of ``shortest`` characters or more.

    websockets' frame trace shortens a long frame to its head and tail ("...") and can so
    cut an echoed key in two; each part is still a secret. Only for DEBUG traces: it is
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


def _close_info(exc: ConnectionClosed) -> tuple[int | None, str]:
    if exc.rcvd is not None:
        return exc.rcvd.code, exc.rcvd.reason
    return 1006, "connection dropped without a close frame"


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _describe_close(code: int | None, reason: str) -> str:
    if code == 1006:
        return "dropped by the server without a close frame (1006)"
    return f"closed by the server with code {code}" + (f" ({reason!r})" if reason else "")


def _close_info_ws(ws: ClientConnection) -> tuple[int | None, str]:
    code = ws.close_code
    return (code if code is not None else 1006), ws.close_reason or ""


def _redact_event(data: dict[str, Any], raw: str, secret: str) -> dict[str, Any]:
    """``data`` with ``secret`` replaced in every field (a server echoing the key)."""
    if data["type"] != _DELTA_TYPE:
        if secret not in raw:
            return data
        redacted: dict[str, Any] = orjson.loads(raw.replace(secret, "sk-***"))
        return redacted
    # A delta: only the short fields; searching 100 ms of base64 costs ~2 us a delta.
    for k, v in data.items():
        if k != "delta" and isinstance(v, str) and secret in v:
            data[k] = v.replace(secret, "sk-***")
    return data


def _handshake_error(exc: InvalidStatus, secret: str | None) -> ServerError | HandshakeRejected:
    """Our error for an HTTP answer to the upgrade; every field from the body is redacted.

    The body has the enrollment API's error shape (``messages.parse_enrollment_error``).
    """
    status = exc.response.status_code
    try:
        body = orjson.loads(exc.response.body or b"")
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
