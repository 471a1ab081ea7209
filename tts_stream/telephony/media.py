"""A call's RTP socket: the caller's audio in (jitter buffer, G.711 decoded, VAD), DTMF out of
it (RFC 4733), and the port our :class:`~sinks.RtpSink` sends from (symmetric RTP).

:class:`CallMedia` binds one UDP socket and advertises its port in SDP. Incoming packets of the
negotiated codec go through a small reordering buffer (``jitter_packets`` deep: a late packet
within that window is put back in order, a gap that long is declared lost and filled with
silence so the audio keeps its timing) and are decoded to 8 kHz int16 blocks in a bounded
queue (the oldest block is dropped, and counted, when nobody reads). Telephone events become
digits. A voice activity detector (webrtcvad, 20 ms frames) runs while ``vad`` is on and
reports the start of speech after ``vad_frames`` voiced frames in a row.

Whose packets count (the *expected peer*): RTP from the address the SDP named is always taken;
until something arrives from there, the first other source is latched instead (a phone behind
NAT sends from an address its SDP does not know, as media servers' symmetric-RTP latching
allows); packets from any other source are stray (counted, dropped). When a re-INVITE moves the
far end's media (:meth:`CallMedia.use` with a new address), the old address stops counting
and the jitter buffer starts afresh for the new leg, as it does when the SSRC changes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np
import webrtcvad

from sinks.rtp_packet import RTP_SEQ_MOD, Codec
from tts_stream.audio import PCM16
from tts_stream.errors import ConnectionFailed

from .dtmf import DtmfDetector
from .sdp import MediaPlan

__all__ = ["CallMedia", "MediaStats"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!BBHII")


@dataclass(frozen=True)
class MediaStats:
    packets_received: int
    packets_lost: int  # declared lost by the jitter buffer (silence inserted)
    packets_late: int  # arrived after their slot was played out: dropped
    packets_reordered: int
    blocks_dropped: int  # decoded audio nobody read in time
    digits: int
    other_packets: int  # unknown payload type, bad RTP, stray sources


class CallMedia(asyncio.DatagramProtocol):
    """The media socket of one call (see the module docstring); ``async with`` or ``aclose``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        jitter_packets: int = 3,
        audio_blocks: int = 250,
        digits: int = 64,
        vad_frames: int = 5,
        vad_aggressiveness: int = 2,
        on_digit: Callable[[str], None] | None = None,
        on_speech: Callable[[], None] | None = None,
    ) -> None:
        self.host = host
        self.plan: MediaPlan | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self._jitter = jitter_packets
        self._audio: collections.deque[PCM16] = collections.deque(maxlen=audio_blocks)
        self._audio_ready = asyncio.Event()
        self._digits: asyncio.Queue[str | None] = asyncio.Queue(maxsize=digits)
        self._dtmf = DtmfDetector()
        self._pending: dict[int, bytes] = {}  # seq -> payload, waiting for its turn
        self._next: int | None = None
        self._decode: Callable[[bytes], PCM16] | None = None
        self._codec_pt = self._event_pt = -1
        self._vad = webrtcvad.Vad(vad_aggressiveness)
        self._vad_on = False
        self._vad_need = vad_frames
        self._voiced = 0
        self._on_digit, self._on_speech = on_digit, on_speech
        self._closed = False
        self.peer: tuple[str, int] | None = None  # where the SDP says the far end sends from
        self._source: tuple[str, int] | None = None  # the address whose RTP is taken
        self._left: set[tuple[str, int]] = set()  # earlier peers of this call (moved away)
        self._ssrc: int | None = None
        self._n = {k: 0 for k in ("rx", "lost", "late", "reordered", "dropped", "digits", "other")}

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_datagram_endpoint(lambda: self, local_addr=(self.host, 0))
        except OSError as exc:
            raise ConnectionFailed(f"cannot bind an RTP socket on {self.host}: {exc}") from exc

    @property
    def port(self) -> int:
        assert self.transport is not None, "open() first"
        return int(self.transport.get_extra_info("sockname")[1])

    def use(self, plan: MediaPlan) -> None:
        """Receive with the negotiated codec and telephone-event payload type."""
        self.plan = plan
        peer = (plan.remote_host, plan.remote_port)
        if peer != self.peer:
            if self.peer is not None:
                self._left.add(self.peer)
                log.info("RTP: the far end's media moved from %s:%d to %s:%d", *self.peer, *peer)
            self._left.discard(peer)
            self.peer, self._source = peer, None
            self._restart()
        codec = Codec.from_name(plan.codec.encoding)
        self._decode = None if codec is None else codec.decoder()
        self._codec_pt = plan.codec.payload_type
        self._event_pt = -1 if plan.telephone_event is None else plan.telephone_event.payload_type

    def end(self) -> None:
        """The call is over: a reader waiting for a digit or audio gets the end now."""
        self._closed = True
        if self._digits.full():
            self._digits.get_nowait()
        self._digits.put_nowait(None)
        self._audio_ready.set()

    async def aclose(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.close()
        self._audio_ready.set()

    async def __aenter__(self) -> CallMedia:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- reading -----------------------------------------------------------------------------

    @property
    def vad(self) -> bool:
        return self._vad_on

    @vad.setter
    def vad(self, on: bool) -> None:
        self._vad_on, self._voiced = on, 0

    def stats(self) -> MediaStats:
        n = self._n
        return MediaStats(n["rx"], n["lost"], n["late"], n["reordered"], n["dropped"],
                          n["digits"], n["other"])  # fmt: skip

    def read_nowait(self) -> PCM16 | None:
        """The next decoded block of the caller's audio (8 kHz mono int16), or None."""
        return self._audio.popleft() if self._audio else None

    async def audio(self, *, idle_timeout: float = 30.0) -> AsyncIterator[PCM16]:
        """The caller's audio as it arrives; ends when the call's media closes or goes quiet
        for ``idle_timeout`` seconds."""
        while True:
            while self._audio:
                yield self._audio.popleft()
            if self._closed:
                return
            self._audio_ready.clear()
            try:
                async with asyncio.timeout(idle_timeout):
                    await self._audio_ready.wait()
            except TimeoutError:
                return

    async def digit(self, wait_s: float) -> str | None:
        """The next DTMF digit, or None after ``wait_s`` seconds or at the end of the call."""
        try:
            async with asyncio.timeout(wait_s):
                return await self._digits.get()
        except TimeoutError:
            return None

    # -- the protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport

    def error_received(self, exc: Exception) -> None:
        log.debug("RTP socket error (far end not listening?): %r", exc)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 12 or (addr[:2] != self._source and not self._accept(addr[:2])):
            self._n["other"] += 1  # too short for RTP, or a stray source
            return
        b0, b1, seq, ts, ssrc = _HEADER.unpack_from(data)
        if b0 >> 6 != 2:
            self._n["other"] += 1  # not RTP (RTCP goes to port + 1; STUN, garbage)
            return
        pos = 12 + 4 * (b0 & 0x0F)
        if b0 & 0x10 and len(data) >= pos + 4:
            pos += 4 + 4 * struct.unpack_from("!H", data, pos + 2)[0]
        end = len(data) - (data[-1] if b0 & 0x20 and len(data) > pos else 0)
        payload = data[pos:end]
        pt = b1 & 0x7F
        self._n["rx"] += 1
        if pt == self._event_pt:
            try:
                ev = self._dtmf.feed(payload, ts)
            except Exception:  # noqa: BLE001 - a bad event packet is only counted
                self._n["other"] += 1
                return
            if ev is not None:
                self._n["digits"] += 1
                if self._digits.full():
                    self._digits.get_nowait()  # the oldest digit gives way
                self._digits.put_nowait(ev.digit)
                if self._on_digit is not None:
                    self._on_digit(ev.digit)
            return
        if pt != self._codec_pt or self._decode is None:
            self._n["other"] += 1
            return
        if ssrc != self._ssrc:
            self._ssrc = ssrc
            self._restart()  # a new source: its sequence numbers start anywhere (RFC 3550 A.1)
        self._reorder(seq, payload)

    def _accept(self, addr: tuple[str, int]) -> bool:
        """Whether RTP from ``addr`` counts (see the module docstring); latches onto it."""
        if addr == self.peer or (self._source is None and addr not in self._left):
            if self._source is not None:
                self._restart()  # the SDP's address wins over a latched NAT source
            self._source = addr
            return True
        return False

    def _restart(self) -> None:
        """Start the jitter buffer afresh: what waits is played in order, then a new stream."""
        if self._next is not None and self._decode is not None:
            nxt = self._next
            for seq in sorted(self._pending, key=lambda q: (q - nxt) % RTP_SEQ_MOD):
                self._play(self._pending[seq])
        self._pending.clear()
        self._next = None

    def _reorder(self, seq: int, payload: bytes) -> None:
        if self._next is None:
            self._next = seq
        ahead = (seq - self._next) % RTP_SEQ_MOD
        if ahead >= RTP_SEQ_MOD // 2:
            self._n["late"] += 1  # its slot is gone: playing it now would break the timing
            return
        if ahead:
            self._n["reordered"] += seq not in self._pending
        self._pending[seq] = payload
        while True:
            nxt = self._next
            if nxt in self._pending:
                self._play(self._pending.pop(nxt))
            elif len(self._pending) > self._jitter:
                self._n["lost"] += 1  # waited long enough: conceal with silence
                assert self._decode is not None
                self._play(None, self._decode(next(iter(self._pending.values()))).size)
            else:
                break
            self._next = (nxt + 1) % RTP_SEQ_MOD

    def _play(self, payload: bytes | None, size: int = 160) -> None:
        assert self._decode is not None
        pcm = np.zeros(size, np.int16) if payload is None else self._decode(payload)
        if len(self._audio) == self._audio.maxlen:
            self._n["dropped"] += 1
        self._audio.append(pcm)
        self._audio_ready.set()
        if self._vad_on and pcm.size == 160:
            try:
                voiced = self._vad.is_speech(pcm.tobytes(), 8000)
            except Exception:  # noqa: BLE001 - webrtcvad raises a bare Error on odd sizes
                voiced = False
            self._voiced = self._voiced + 1 if voiced else 0
            if self._voiced == self._vad_need and self._on_speech is not None:
                self._on_speech()
