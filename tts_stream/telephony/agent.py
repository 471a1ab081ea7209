"""The asyncio side of telephony: a UDP transport driving :class:`~.ua.UserAgent`, and the
:class:`Call` object an application scripts.

::

    async def menu(call: Call) -> None:
        await call.say("Welcome. Press 1 for sales, 2 for support.")
        async for digit in call.dtmf(timeout=10):
            await call.say(f"You pressed {digit}.")
            break
        await call.hangup()

    async with Engine(...) as engine, SipAgent(engine, voice, menu, port=5060) as agent:
        await agent.serve_forever()

Every call gets a media socket (:class:`~.media.CallMedia`) and one :class:`~sinks.RtpSink`
that sends from it, opened once and reused by every ``say`` (a re-INVITE that moves the far
end's media redirects it, and the media socket's expected peer, at once); the handler runs in
the agent's task group and is cancelled when the caller hangs up. Time for the pure user agent
comes from ``time.monotonic()`` here, and its timers from one ``loop.call_at`` handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from sinks import RtpSink
from tts_stream import Engine, Sink, UsageError, Voice
from tts_stream.errors import ConnectionFailed, TtsStreamError

from .media import CallMedia
from .sdp import MediaPlan
from .ua import CallConfirmed, CallEnded, IncomingCall, MediaChanged, Output, Send, UserAgent

__all__ = ["Call", "CallRecord", "SipAgent"]

log = logging.getLogger(__name__)

Handler = Callable[["Call"], Awaitable[None]]


@dataclass
class CallRecord:
    """What happened on one call (kept by the agent, logged when the call ends)."""

    call_id: str
    caller: str
    codec: str
    started: float
    first_audio_ms: float | None = None
    digits: list[str] = field(default_factory=list)
    prompts: int = 0
    barge_ins: int = 0
    ended_by: str = ""
    packets_sent: int = 0
    media_received: int = 0


class Call:
    """One answered call: speak, listen for digits, hang up."""

    def __init__(self, agent: SipAgent, call_id: str, plan: MediaPlan, media: CallMedia,
                 caller: str) -> None:  # fmt: skip
        self._agent = agent
        self.call_id = call_id
        self.plan = plan
        self.media = media
        self.record = CallRecord(call_id, caller, plan.codec.encoding, time.monotonic())
        self._sink: RtpSink | None = None
        self._sink_stale = False  # a re-INVITE changed the codec: the next say() reopens
        self._packets_before = 0  # sent by sinks this call replaced
        self._ended = asyncio.Event()
        self._barge = asyncio.Event()
        self._speaking = False

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    async def say(
        self, text: str, *, barge_in: bool = True, sinks: Sequence[Sink] = (), **speak: Any
    ) -> bool:
        """Speak ``text`` on the call; returns False if a key or the caller's voice (VAD)
        interrupted it (barge-in) or the call ended, True when it was heard to the end.

        ``sinks`` get the same audio too (e.g. a :class:`~sinks.WavSink` recording the
        prompts); ``speak`` goes to :meth:`Engine.speak <tts_stream.Engine.speak>`."""
        if self.ended:
            return False
        sink = await self._rtp()
        self._barge.clear()
        self.media.vad = barge_in
        self._speaking = True
        self.record.prompts += 1
        interrupted = False
        try:
            async with asyncio.TaskGroup() as tg:
                speech = self._agent.engine.speak(
                    self._agent.voice, sinks=[sink, *sinks], sample_rate=8000, **speak)
                async with speech:
                    watcher = tg.create_task(self._watch(speech, barge_in))
                    await speech.push(text)
                watcher.cancel()
                interrupted = speech.metrics.interrupted
            if self.record.first_audio_ms is None and speech.metrics.first_audio_ms is not None:
                self.record.first_audio_ms = speech.metrics.first_audio_ms
                log.info("call %s: first audio %.1f ms", self.call_id,
                         speech.metrics.first_audio_ms)  # fmt: skip
        finally:
            self._speaking = False
            self.media.vad = False
        return not (interrupted or self._barge.is_set() or self.ended)

    async def _watch(self, speech: Any, barge_in: bool) -> None:
        waits = [asyncio.ensure_future(self._ended.wait())]
        if barge_in:
            waits.append(asyncio.ensure_future(self._barge.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self._barge.is_set():
            self.record.barge_ins += 1
        with contextlib.suppress(UsageError):  # finished meanwhile: nothing to interrupt
            await speech.interrupt()

    async def dtmf(self, *, wait_s: float = 30.0) -> AsyncIterator[str]:
        """Digits as the caller presses them; ends after ``wait_s`` seconds without one, or
        at hang-up."""
        while not self.ended:
            digit = await self.media.digit(wait_s)
            if digit is None:
                return
            yield digit

    async def hangup(self) -> None:
        """End the call (BYE); returns at once, the handler goes on until it returns."""
        self._agent._hangup(self)

    def _media_changed(self, plan: MediaPlan) -> None:
        """A re-INVITE (or the ACK's answer) changed the media: receive from and send to the
        new address at once (the prompt being spoken moves with it); a new codec or packet
        time takes effect from the next prompt."""
        old, self.plan = self.plan, plan
        self.media.use(plan)
        if self._sink is None:
            return
        if (plan.codec, plan.ptime_ms) != (old.codec, old.ptime_ms):
            self._sink_stale = True
        try:
            self._sink.redirect(plan.remote_host, plan.remote_port)
        except (UsageError, ConnectionFailed) as exc:  # e.g. a hold with c=0.0.0.0: keep going
            log.info("call %s: media not moved: %s", self.call_id, exc)

    async def _rtp(self) -> RtpSink:
        if self._sink is not None and self._sink_stale:
            self._packets_before += self._sink.rtp_stats().packets_sent
            with contextlib.suppress(TtsStreamError, OSError):
                await self._sink.aclose()
            self._sink, self._sink_stale = None, False
        if self._sink is None:
            assert self.media.transport is not None
            self._sink = RtpSink(
                self.plan.remote_host, self.plan.remote_port,
                codec=self.plan.codec.encoding.lower(), ptime_ms=self.plan.ptime_ms,
                payload_type=self.plan.codec.payload_type, transport=self.media.transport,
                clock_rate=8000, name=f"rtp:{self.call_id[:12]}",
            )  # fmt: skip
            from tts_stream.audio import AudioFormat

            await self._sink.open(AudioFormat(8000))
        return self._sink

    def _on_digit(self, digit: str) -> None:
        self.record.digits.append(digit)
        log.info("call %s: digit %s", self.call_id, digit)
        if self._speaking:
            self._barge.set()

    def _on_speech(self) -> None:
        if self._speaking:
            log.info("call %s: caller speaks: barge-in", self.call_id)
            self._barge.set()

    async def _close(self) -> None:
        self._ended.set()
        if self._sink is not None:
            self.record.packets_sent = self._packets_before + self._sink.rtp_stats().packets_sent
            with contextlib.suppress(TtsStreamError, OSError):
                await self._sink.aclose()
        self.record.media_received = self.media.stats().packets_received
        await self.media.aclose()


def _reachable(plan: MediaPlan, rtp_host: str, source: tuple[str, int]) -> MediaPlan:
    """Media bound to loopback can only reach loopback: an SDP address outside it (a phone
    that advertised another interface) is replaced by the address the INVITE came from, as
    SBCs do for unroutable SDP ("media follows signalling"). Nothing leaves the machine."""
    try:
        local_lo = ipaddress.ip_address(rtp_host).is_loopback
        remote_lo = ipaddress.ip_address(plan.remote_host).is_loopback
    except ValueError:
        return plan
    if local_lo and not remote_lo:
        log.info("SDP address %s is not reachable from %s: sending media to %s",
                 plan.remote_host, rtp_host, source[0])  # fmt: skip
        return dataclasses.replace(plan, remote_host=source[0])
    return plan


class _SipProtocol(asyncio.DatagramProtocol):
    def __init__(self, agent: SipAgent) -> None:
        self.agent = agent

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.agent._datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("SIP socket error: %r", exc)


class SipAgent:
    """Answer every SIP call on ``host:port`` (UDP) and run ``handler(call)`` for each.

    ``advertise`` is the address put in Contact, Via and SDP (default: ``host``; set it when
    binding 0.0.0.0 or behind NAT); RTP sockets bind to ``rtp_host`` (default ``host``).
    ``max_calls`` bounds the calls alive at once (more get 486 Busy Here). ``ring_s`` > 0
    sends 180 Ringing and answers that much later (0: answer at once).
    """

    def __init__(
        self,
        engine: Engine,
        voice: Voice | str,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 5060,
        advertise: str | None = None,
        rtp_host: str | None = None,
        codecs: tuple[str, ...] = ("PCMU", "PCMA", "L16"),
        max_calls: int = 1000,
        hangup_grace: float = 5.0,
        ring_s: float = 0.0,
    ) -> None:
        self.engine, self.voice, self.handler = engine, voice, handler
        self.host, self.port = host, port
        self.advertise = advertise or host
        self.rtp_host = rtp_host or host
        self.codecs = codecs
        self.max_calls = max_calls
        self._grace = hangup_grace
        self._ring_s = ring_s
        self.ua: UserAgent | None = None
        self.calls: dict[str, Call] = {}
        self.records: list[CallRecord] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._pending: set[str] = set()
        self._stopping = asyncio.Event()
        self._changed = asyncio.Event()  # a call started or ended
        self._finishing = 0
        self.on_call_end: Callable[[CallRecord], None] | None = None

    @property
    def address(self) -> tuple[str, int]:
        if self._transport is None:
            raise UsageError("SipAgent is not started")
        addr = self._transport.get_extra_info("sockname")
        return str(addr[0]), int(addr[1])

    async def __aenter__(self) -> SipAgent:
        loop = asyncio.get_running_loop()
        try:
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: _SipProtocol(self), local_addr=(self.host, self.port)
            )
        except OSError as exc:
            raise ConnectionFailed(f"cannot listen for SIP on {self.host}:{self.port}: {exc}") \
                from exc  # fmt: skip
        self.ua = UserAgent(contact=(self.advertise, self.address[1]), codecs=self.codecs)
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        log.info("SIP: listening on %s:%d (UDP)", *self.address)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            for call in list(self.calls.values()):
                self._hangup(call)
            for task in self._tasks.values():
                task.cancel()
            assert self._tg is not None
            await self._tg.__aexit__(et, e, tb)
        finally:
            if self._timer is not None:
                self._timer.cancel()
            if self._transport is not None:
                # let the last BYEs leave (sendto is immediate on UDP; nothing to flush)
                self._transport.close()

    async def serve_forever(self) -> None:
        """Run until cancelled (Ctrl-C in the CLI)."""
        await self._stopping.wait()

    async def wait_idle(self, seconds: float) -> None:
        """Wait until no call is alive (bounded by ``seconds``)."""
        async with asyncio.timeout(seconds):
            while self.calls or self._pending or self._tasks or self._finishing:
                self._changed.clear()
                await self._changed.wait()

    # -- the sans-I/O driver -----------------------------------------------------------------

    def _datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.ua is not None
        try:
            out = self.ua.receive(data, addr, time.monotonic())
        except Exception:  # the agent must survive anything a peer sends
            log.exception("SIP: failed on a datagram from %s", addr)
            return
        self._apply(out)

    def _apply(self, out: list[Output]) -> None:
        assert self._transport is not None and self.ua is not None
        for item in out:
            if isinstance(item, Send):
                self._transport.sendto(item.data, item.addr)
            elif isinstance(item, IncomingCall):
                self._incoming(item)
            elif isinstance(item, CallConfirmed):
                log.debug("SIP: call %s confirmed", item.call_id)
            elif isinstance(item, MediaChanged):
                call = self.calls.get(item.call_id)
                if call is not None:
                    source = item.source or (call.plan.remote_host, 0)
                    call._media_changed(_reachable(item.plan, self.rtp_host, source))
            elif isinstance(item, CallEnded):
                self._ended(item.call_id, item.reason)
        self._arm()

    def _arm(self) -> None:
        assert self.ua is not None
        when = self.ua.next_deadline()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if when is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + (when - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        assert self.ua is not None
        self._apply(self.ua.on_timer(time.monotonic()))

    # -- calls -------------------------------------------------------------------------------

    def _incoming(self, item: IncomingCall) -> None:
        assert self.ua is not None and self._tg is not None
        if len(self.calls) + len(self._pending) >= self.max_calls:
            self._apply(self.ua.reject(item.call_id, 486, "Busy Here", time.monotonic()))
            return
        self._pending.add(item.call_id)
        self._tg.create_task(self._answer(item), name=f"answer:{item.call_id[:12]}")

    async def _answer(self, item: IncomingCall) -> None:
        assert self.ua is not None and self._tg is not None
        if self._ring_s > 0:
            self._apply(self.ua.ring(item.call_id))
            await asyncio.sleep(self._ring_s)
        media = CallMedia(self.rtp_host)
        try:
            await media.open()
        except ConnectionFailed as exc:
            self._pending.discard(item.call_id)
            self._changed.set()
            log.warning("SIP: call %s: %s", item.call_id, exc)
            self._apply(self.ua.reject(item.call_id, 503, "Service Unavailable",
                                       time.monotonic()))  # fmt: skip
            return
        self._pending.discard(item.call_id)
        self._changed.set()
        out = self.ua.answer(item.call_id, self.advertise, media.port, time.monotonic())
        if not out:  # cancelled meanwhile
            await media.aclose()
            return
        plan = _reachable(self.ua.plan(item.call_id) or item.plan, self.rtp_host, item.source)
        media.use(plan)
        call = Call(self, item.call_id, plan, media, item.caller)
        media._on_digit, media._on_speech = call._on_digit, call._on_speech
        self.calls[item.call_id] = call
        self._changed.set()
        log.info("SIP: call %s from %s answered (%s, RTP %s:%d -> %s:%d)", item.call_id,
                 item.caller, plan.codec.encoding, self.advertise, media.port,
                 plan.remote_host, plan.remote_port)  # fmt: skip
        self._apply(out)
        self._tasks[item.call_id] = self._tg.create_task(
            self._run(call), name=f"call:{item.call_id[:12]}")  # fmt: skip

    async def _run(self, call: Call) -> None:
        try:
            await self.handler(call)
        except asyncio.CancelledError:
            if not call.ended:
                raise
        except Exception:
            log.exception("call %s: the handler failed", call.call_id)
            self._hangup(call)
        finally:
            self._tasks.pop(call.call_id, None)
        if not call.ended:  # the script is over: the caller may still speak or hang up
            await call._ended.wait()

    def _hangup(self, call: Call) -> None:
        assert self.ua is not None
        self._apply(self.ua.hangup(call.call_id, time.monotonic()))

    def _ended(self, call_id: str, reason: str) -> None:
        call = self.calls.pop(call_id, None)
        if call is None:
            return
        call.record.ended_by = reason
        call._ended.set()
        call.media.end()
        assert self._tg is not None
        self._finishing += 1
        self._tg.create_task(self._finish(call), name=f"end:{call_id[:12]}")

    async def _finish(self, call: Call) -> None:
        task = self._tasks.get(call.call_id)
        if task is not None:
            # the handler sees the hang-up (say() returns False, dtmf() ends); then it goes
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._grace):
                    await asyncio.shield(task)
            task.cancel()
        try:
            await call._close()
        finally:
            self._finishing -= 1
            self._changed.set()
        r = call.record
        self.records.append(r)
        if len(self.records) > 10000:
            del self.records[:5000]
        log.info("call %s ended (%s): first audio %s ms, digits %r, %d prompts, %d barge-ins",
                 r.call_id, r.ended_by,
                 "-" if r.first_audio_ms is None else f"{r.first_audio_ms:.1f}",
                 "".join(r.digits), r.prompts, r.barge_ins)  # fmt: skip
        if self.on_call_end is not None:
            self.on_call_end(r)
