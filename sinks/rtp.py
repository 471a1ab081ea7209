"""RTP/UDP sink for IVR and SIP media paths (RFC 3550 / RFC 3551), with optional RTCP.

Two layers. The pure one: :class:`RtpPacket` and :class:`RtcpSenderReport` (frozen
dataclasses with ``parse`` / ``serialize``, constants named after RFC 3550) and the SDP text.
The I/O one: :class:`RtpSink`, which resamples the stream to the codec's clock with a stateful
soxr stream, cuts it into packets of ``ptime_ms``, encodes them (G.711 from :mod:`sinks.g711`,
or L16 in network byte order) and sends them from one pacing task per sink against absolute
deadlines on the monotonic clock. Boundary: asyncio UDP transports; imports
``tts_stream.audio`` and ``tts_stream.errors`` only.

RTP clock policy (documented behaviour, see RFC 3550 §5.1 and RFC 3551 §4.1):

- sequence numbers, timestamps and the SSRC start at random values and wrap modulo 2**16 and
  2**32; the marker bit is set on the first packet of each talk spurt (the first packet, and
  the first after an underrun, a ``drain()`` or an ``interrupt()``);
- the sink never sends comfort noise: when the queue runs dry (an underrun while audio is
  still expected is counted in ``stats().underruns``) it simply stops sending, and the next
  talk spurt's timestamp jumps by the number of sample periods that elapsed, so the RTP clock
  stays locked to real time (a receiver sees a silence, not a time warp);
- a talk spurt starts once ``prebuffer_ms`` (default 60) of audio is queued, or that long
  after its first packet was queued, or at ``drain()``: a small jitter buffer against a
  producer that streams in real time;
- packets are sent at ``start + n * ptime`` of the current talk spurt, never after a sum of
  sleeps; if the event loop stalled for more than half a second the schedule is re-anchored
  instead of bursting the whole backlog out.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import ipaddress
import logging
import random
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import soxr

from tts_stream.audio import PCM16, AudioFormat, Rechunker, deadline
from tts_stream.errors import ConnectionFailed, ProtocolViolation, Timeout, UsageError

from ._base import BaseSink, OwnedTasks, SinkState
from .g711 import alaw_encode, ulaw_encode

__all__ = [
    "NTP_EPOCH_OFFSET",
    "RTCP_BYE",
    "RTCP_SDES",
    "RTCP_SR",
    "RTP_HEADER_SIZE",
    "RTP_SEQ_MOD",
    "RTP_TS_MOD",
    "RTP_VERSION",
    "Codec",
    "RtcpSenderReport",
    "RtpExtension",
    "RtpPacket",
    "RtpSink",
    "RtpStats",
    "rtcp_bye",
    "rtcp_sdes_cname",
]

log = logging.getLogger(__name__)

# --- RFC 3550 constants -------------------------------------------------------------------

RTP_VERSION = 2  # §5.1 "V"
RTP_HEADER_SIZE = 12  # §5.1 fixed header, before the CSRC list
RTP_SEQ_MOD = 1 << 16  # Appendix A.1
RTP_TS_MOD = 1 << 32
RTP_MAX_CSRC = 15  # §5.1 "CC" is 4 bits
RTCP_SR = 200  # §12.1 packet types
RTCP_RR = 201
RTCP_SDES = 202
RTCP_BYE = 203
RTCP_SDES_END = 0  # §6.5
RTCP_SDES_CNAME = 1
NTP_EPOCH_OFFSET = 2208988800  # §4: seconds from 1900-01-01 (NTP era 0) to 1970-01-01
RTCP_MIN_INTERVAL = 5.0  # §6.2 recommended minimum report interval, seconds

_HEADER = struct.Struct("!BBHII")
_RTP_B0 = RTP_VERSION << 6  # no padding, no extension, no CSRC
_SR = struct.Struct("!BBHIIIIII")  # header + sender info (§6.4.1), no report blocks


# --- pure packet layer ----------------------------------------------------------------------


@dataclass(frozen=True)
class RtpExtension:
    """A header extension (RFC 3550 §5.3.1): 16-bit profile word and 32-bit-aligned data."""

    profile: int
    data: bytes = b""

    def __post_init__(self) -> None:
        if not 0 <= self.profile < 1 << 16:
            raise UsageError(f"extension profile out of range: {self.profile}")
        if len(self.data) % 4 or len(self.data) >= 4 << 16:
            raise UsageError("extension data must be a multiple of 4 bytes, < 256 KiB")


@dataclass(frozen=True)
class RtpPacket:
    """One RTP data packet (RFC 3550 §5.1).

    ``padding`` is the number of padding octets appended (the last of them holds the count,
    so 0 or 1..255). ``parse`` raises :class:`~tts_stream.errors.ProtocolViolation` on
    malformed input; the constructor raises :class:`~tts_stream.errors.UsageError` on fields
    out of range.
    """

    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int
    payload: bytes = b""
    marker: bool = False
    csrc: tuple[int, ...] = ()
    extension: RtpExtension | None = None
    padding: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.payload_type < 128:
            raise UsageError(f"payload type out of range: {self.payload_type}")
        if not 0 <= self.sequence_number < RTP_SEQ_MOD:
            raise UsageError(f"sequence number out of range: {self.sequence_number}")
        for name, value in (("timestamp", self.timestamp), ("ssrc", self.ssrc), *(
            ("csrc", c) for c in self.csrc
        )):
            if not 0 <= value < 1 << 32:
                raise UsageError(f"{name} out of range: {value}")
        if len(self.csrc) > RTP_MAX_CSRC:
            raise UsageError(f"at most {RTP_MAX_CSRC} CSRCs")
        if not 0 <= self.padding < 256:
            raise UsageError(f"padding out of range: {self.padding}")

    def serialize(self) -> bytes:
        b0 = (
            (RTP_VERSION << 6)
            | (0x20 if self.padding else 0)
            | (0x10 if self.extension else 0)
            | len(self.csrc)
        )
        b1 = (0x80 if self.marker else 0) | self.payload_type
        parts = [_HEADER.pack(b0, b1, self.sequence_number, self.timestamp, self.ssrc)]
        parts.extend(struct.pack("!I", c) for c in self.csrc)
        if self.extension is not None:
            ext = self.extension
            parts.append(struct.pack("!HH", ext.profile, len(ext.data) // 4))
            parts.append(ext.data)
        parts.append(self.payload)
        if self.padding:
            parts.append(bytes(self.padding - 1) + bytes([self.padding]))
        return b"".join(parts)

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        if len(data) < RTP_HEADER_SIZE:
            raise ProtocolViolation(f"RTP packet too short: {len(data)} bytes")
        b0, b1, seq, ts, ssrc = _HEADER.unpack_from(data)
        if b0 >> 6 != RTP_VERSION:
            raise ProtocolViolation(f"RTP version {b0 >> 6}, expected {RTP_VERSION}")
        pos = RTP_HEADER_SIZE
        cc = b0 & 0x0F
        if len(data) < pos + 4 * cc:
            raise ProtocolViolation("RTP packet truncated in the CSRC list")
        csrc = struct.unpack_from(f"!{cc}I", data, pos)
        pos += 4 * cc
        extension = None
        if b0 & 0x10:
            if len(data) < pos + 4:
                raise ProtocolViolation("RTP packet truncated in the header extension")
            profile, words = struct.unpack_from("!HH", data, pos)
            pos += 4
            if len(data) < pos + 4 * words:
                raise ProtocolViolation("RTP header extension longer than the packet")
            extension = RtpExtension(profile, bytes(data[pos : pos + 4 * words]))
            pos += 4 * words
        end = len(data)
        padding = 0
        if b0 & 0x20:
            padding = data[-1] if end > pos else 0
            if padding == 0 or end - padding < pos:
                raise ProtocolViolation(f"bad RTP padding count {padding}")
            end -= padding
        return cls(
            payload_type=b1 & 0x7F, sequence_number=seq, timestamp=ts, ssrc=ssrc,
            payload=bytes(data[pos:end]), marker=bool(b1 & 0x80), csrc=tuple(csrc),
            extension=extension, padding=padding,
        )


@dataclass(frozen=True)
class RtcpSenderReport:
    """An RTCP SR without report blocks (RFC 3550 §6.4.1); ``ntp_timestamp`` is 32.32 fixed."""

    ssrc: int
    ntp_timestamp: int
    rtp_timestamp: int
    packet_count: int
    octet_count: int

    def serialize(self) -> bytes:
        # length = size in 32-bit words minus one (§6.4.1): 28 bytes -> 6
        return _SR.pack(
            RTP_VERSION << 6, RTCP_SR, _SR.size // 4 - 1, self.ssrc,
            self.ntp_timestamp >> 32, self.ntp_timestamp & 0xFFFFFFFF,
            self.rtp_timestamp, self.packet_count % (1 << 32), self.octet_count % (1 << 32),
        )

    @classmethod
    def parse(cls, data: bytes) -> RtcpSenderReport:
        """Parse the SR at the start of ``data`` (a compound packet must start with it)."""
        if len(data) < _SR.size:
            raise ProtocolViolation(f"RTCP SR too short: {len(data)} bytes")
        b0, pt, _length, ssrc, msw, lsw, rtp_ts, packets, octets = _SR.unpack_from(data)
        if b0 >> 6 != RTP_VERSION or pt != RTCP_SR:
            raise ProtocolViolation(f"not an RTCP SR (version {b0 >> 6}, type {pt})")
        return cls(ssrc, (msw << 32) | lsw, rtp_ts, packets, octets)


def rtcp_sdes_cname(ssrc: int, cname: str) -> bytes:
    """An RTCP SDES packet with one chunk carrying the CNAME item (RFC 3550 §6.5.1)."""
    text = cname.encode()[:255]
    chunk = struct.pack("!IBB", ssrc, RTCP_SDES_CNAME, len(text)) + text
    chunk += bytes(4 - len(chunk) % 4)  # one to four END (null) octets pad to 32 bits
    return struct.pack("!BBH", (RTP_VERSION << 6) | 1, RTCP_SDES, len(chunk) // 4) + chunk


def rtcp_bye(ssrc: int) -> bytes:
    """An RTCP BYE packet for one SSRC (RFC 3550 §6.6)."""
    return struct.pack("!BBHI", (RTP_VERSION << 6) | 1, RTCP_BYE, 1, ssrc)


def ntp_timestamp(unix_time: float) -> int:
    """Wall-clock seconds since 1970 as a 64-bit NTP timestamp (RFC 3550 §4)."""
    return int((unix_time + NTP_EPOCH_OFFSET) * (1 << 32)) & ((1 << 64) - 1)


# --- codecs ----------------------------------------------------------------------------------


def _l16_encode(samples: PCM16) -> bytes:
    return samples.astype(">i2").tobytes()  # RFC 3551 §4.5.11: network byte order


class Codec(enum.Enum):
    """Payload formats: (encoding name, static payload type or None, bytes per sample)."""

    PCMU = ("PCMU", 0, 1)
    PCMA = ("PCMA", 8, 1)
    L16 = ("L16", None, 2)

    @property
    def encoding_name(self) -> str:
        return str(self.value[0])

    @property
    def static_payload_type(self) -> int | None:
        pt = self.value[1]
        return None if pt is None else int(pt)

    def encoder(self) -> Callable[[PCM16], bytes]:
        return {Codec.PCMU: ulaw_encode, Codec.PCMA: alaw_encode, Codec.L16: _l16_encode}[self]


@dataclass(frozen=True)
class RtpStats:
    """RTP-level counters of one :class:`RtpSink` (a snapshot)."""

    ssrc: int
    packets_sent: int
    octets_sent: int  # payload octets, as in RTCP SR
    next_sequence_number: int
    next_timestamp: int
    talk_spurts: int
    send_errors: int  # ICMP errors reported by the kernel (e.g. nobody listening yet)
    rtcp_packets_sent: int


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.errors = 0

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        pass  # receiver reports and stray packets are not used

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable shows up here on the next send; RTP keeps going (the
        # receiver may simply not be up yet).
        self.errors += 1
        if self.errors == 1:
            log.info("%s: send error (receiver not listening?): %r", self.owner, exc)


# --- the sink ---------------------------------------------------------------------------------

_MAX_CATCH_UP = 0.5  # seconds late before the schedule is re-anchored instead of bursting


class RtpSink(BaseSink):
    """Send the stream as RTP to ``host:port`` (and RTCP to ``port + 1`` if ``rtcp``).

    ``codec``: ``"pcmu"`` / ``"pcma"`` (G.711 at 8 kHz, payload types 0 / 8) or ``"l16"``
    (16-bit big-endian PCM at ``clock_rate``; the stream's own rate when ``clock_rate`` is
    None, i.e. bit-exact, no resampling; payload type 96 unless given, 11 for 44.1 kHz).
    Input at another rate is resampled with a stateful soxr stream (anti-aliased, no
    per-chunk clicks). :attr:`preferred_sample_rate` tells the engine which stream rate avoids
    resampling. ``ptime_ms`` (10-60) is the audio per packet; ``buffer_ms`` bounds the queue
    (``write`` awaits beyond it); a talk spurt starts once ``prebuffer_ms`` of audio is queued
    (or that long after its first packet was, or at ``drain()``). ``ssrc``,
    ``initial_sequence`` and ``initial_timestamp`` default to random values. RTCP sender
    reports go out every ``rtcp_interval`` seconds (randomised ×0.5-1.5, RFC 3550 §6.3.1),
    and a BYE on close.
    """

    preferred_sample_rate: int | None = 8000

    def __init__(
        self,
        host: str,
        port: int,
        *,
        codec: str = "pcmu",
        ptime_ms: int = 20,
        payload_type: int | None = None,
        ssrc: int | None = None,
        rtcp: bool = False,
        clock_rate: int | None = None,
        buffer_ms: int = 1000,
        prebuffer_ms: int = 60,
        rtcp_interval: float = RTCP_MIN_INTERVAL,
        cname: str | None = None,
        initial_sequence: int | None = None,
        initial_timestamp: int | None = None,
        name: str | None = None,
    ) -> None:
        try:
            self.codec = Codec[codec.upper()]
        except KeyError:
            raise UsageError(f"unknown RTP codec {codec!r}; use pcmu, pcma or l16") from None
        if not 10 <= ptime_ms <= 60:
            raise UsageError(f"ptime_ms must be within 10..60, not {ptime_ms}")
        if not 0 < port <= 65535 or (rtcp and port + 1 > 65535):
            raise UsageError(f"bad RTP port {port}")
        for what, value, limit in (
            ("ssrc", ssrc, 1 << 32), ("initial_sequence", initial_sequence, RTP_SEQ_MOD),
            ("initial_timestamp", initial_timestamp, RTP_TS_MOD),
        ):
            if value is not None and not 0 <= value < limit:
                raise UsageError(f"{what} out of range: {value}")
        if rtcp_interval <= 0:
            raise UsageError("rtcp_interval must be positive")
        if self.codec is not Codec.L16 and clock_rate not in (None, 8000):
            raise UsageError(f"{self.codec.encoding_name} runs at 8000 Hz, not {clock_rate}")
        if payload_type is not None and not 0 <= payload_type < 128:
            raise UsageError(f"payload type out of range: {payload_type}")
        if buffer_ms < 2 * ptime_ms:
            raise UsageError("buffer_ms must hold at least two packets")
        if not 0 <= prebuffer_ms <= buffer_ms:
            raise UsageError("prebuffer_ms must be within 0..buffer_ms")
        super().__init__(name=name or f"rtp:{host}:{port}/{self.codec.name.lower()}")
        self.host, self.port = host, port
        self.ptime_ms = ptime_ms
        self.rtcp = rtcp
        self._rtcp_interval = rtcp_interval
        self._cname = cname or f"{secrets.token_hex(6)}@tts-stream"
        self._clock_rate = 8000 if self.codec is not Codec.L16 else clock_rate
        if self.codec is Codec.L16:
            self.preferred_sample_rate = clock_rate  # None: any rate, sent as is
        self._payload_type = payload_type
        self.ssrc = secrets.randbits(32) if ssrc is None else ssrc
        self._seq = secrets.randbelow(RTP_SEQ_MOD) if initial_sequence is None else initial_sequence
        self._ts = secrets.randbits(32) if initial_timestamp is None else initial_timestamp
        self._buffer_ms = buffer_ms
        self._prebuffer_ms = prebuffer_ms
        self._prebuffer_packets = -(-prebuffer_ms // ptime_ms)
        self._session_id = secrets.randbits(31)
        self._encode = self.codec.encoder()
        self._tasks = OwnedTasks(self.name)
        self._transport: asyncio.DatagramTransport | None = None
        self._rtcp_transport: asyncio.DatagramTransport | None = None
        self._proto: _Datagrams | None = None
        self._resampler: soxr.ResampleStream | None = None
        self._rechunker: Rechunker | None = None
        self._queue: collections.deque[bytes] = collections.deque()
        self._max_packets = buffer_ms // ptime_ms
        self._data = asyncio.Event()  # the queue is not empty
        self._space = asyncio.Event()  # the queue has room
        self._idle = asyncio.Event()  # the queue is empty and the pacer has stopped talking
        self._sent_any = asyncio.Event()
        self._epoch = 0  # bumped by interrupt(): a sleeping pacer or writer sees it changed
        self._talking = False
        self._marker_next = True
        self._ending = False  # drain() called: running dry now is the end, not an underrun
        self._gap_from: float | None = None  # monotonic time the RTP clock stopped sending
        self._spurt_start = 0.0
        self._spurt_packets = 0
        self._next_due = 0.0
        self._last_due = 0.0
        self._last_ts = self._ts
        self._packets_sent = 0
        self._octets_sent = 0
        self._talk_spurts = 0
        self._rtcp_sent = 0
        # played-sample accounting in input samples: per segment (since the last drain or
        # interrupt), output samples sent are converted back with the rate ratio
        self._played_before = 0
        self._seg_written_in = 0
        self._seg_sent_out = 0
        self._write_lost = False

    # -- descriptive -------------------------------------------------------------------------

    @property
    def clock_rate(self) -> int:
        """RTP clock rate (= audio rate on the wire); known before open except for L16."""
        if self._clock_rate is None:
            if self._fmt is None:
                raise UsageError("L16 without clock_rate sends the stream's rate: open() first")
            return self._fmt.sample_rate
        return self._clock_rate

    @property
    def payload_type(self) -> int:
        if self._payload_type is not None:
            return self._payload_type
        static = self.codec.static_payload_type
        if static is not None:
            return static
        return 11 if self.clock_rate == 44100 else 96  # RFC 3551 table 4: PT 11 is L16/44100/1

    @property
    def samples_per_packet(self) -> int:
        return self.clock_rate * self.ptime_ms // 1000

    def sdp(self) -> str:
        """An SDP (RFC 4566) describing this stream, for the receiver (e.g. ``ffmpeg -i``)."""
        try:
            ipv = "IP6" if ipaddress.ip_address(self.host).version == 6 else "IP4"
        except ValueError:
            ipv = "IP4"  # a host name
        rtpmap = f"{self.codec.encoding_name}/{self.clock_rate}"
        if self.codec is Codec.L16:
            rtpmap += "/1"
        lines = [
            "v=0",
            f"o=- {self._session_id} 1 IN {ipv} {self.host}",
            "s=tts-stream",
            f"c=IN {ipv} {self.host}",
            "t=0 0",
            f"m=audio {self.port} RTP/AVP {self.payload_type}",
            f"a=rtpmap:{self.payload_type} {rtpmap}",
            f"a=ptime:{self.ptime_ms}",
        ]
        if self.rtcp:
            lines.append(f"a=rtcp:{self.port + 1}")
        return "\r\n".join(lines) + "\r\n"

    def rtp_stats(self) -> RtpStats:
        return RtpStats(
            ssrc=self.ssrc, packets_sent=self._packets_sent, octets_sent=self._octets_sent,
            next_sequence_number=self._seq, next_timestamp=self._ts,
            talk_spurts=self._talk_spurts, send_errors=self._proto.errors if self._proto else 0,
            rtcp_packets_sent=self._rtcp_sent,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def _open(self, fmt: AudioFormat) -> None:
        if fmt.channels != 1:
            raise UsageError(f"{self.name}: RTP sink sends mono, got {fmt.channels} channels")
        rate = self.clock_rate
        if self.codec is Codec.L16 and rate * self.ptime_ms % 1000:
            raise UsageError(f"ptime {self.ptime_ms} ms is not a whole number of samples")
        if fmt.sample_rate != rate:
            # float32 in int16 scale, rounded back here: soxr's own int16 output adds a
            # dither that depends on the chunking; this way the output is deterministic and
            # identical to resampling the whole stream at once.
            self._resampler = soxr.ResampleStream(
                fmt.sample_rate, rate, 1, dtype="float32", quality="HQ"
            )
        self._rechunker = Rechunker(self.samples_per_packet)
        loop = asyncio.get_running_loop()
        try:
            self._transport, self._proto = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self.name), remote_addr=(self.host, self.port)
            )
            if self.rtcp:
                self._rtcp_transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Datagrams(self.name + "/rtcp"), remote_addr=(self.host, self.port + 1)
                )
        except OSError as exc:
            raise ConnectionFailed(f"{self.name}: cannot open UDP socket: {exc}") from exc
        self._space.set()
        self._idle.set()
        self._tasks.start(self._pace(), name="pace")
        if self.rtcp:
            self._tasks.start(self._report(), name="rtcp")
        log.debug("%s: open, %d Hz -> %d Hz, ssrc %08x", self.name, fmt.sample_rate, rate,
                  self.ssrc)

    async def _write(self, samples: PCM16) -> None:
        self._tasks.check()
        assert self._rechunker is not None
        epoch = self._epoch
        self._seg_written_in += int(samples.size)
        self._ending = False
        out = samples if self._resampler is None else self._resample(samples)
        for block in self._rechunker.push(out):
            if not await self._put(block, epoch):
                return  # interrupted while waiting: the rest of this frame is dropped

    def _try_write(self, samples: PCM16) -> bool:
        # Only without resampling: how many packets a frame completes must be known before
        # any state changes, and soxr's output length is known only after it took the input.
        if self._resampler is not None:
            return False
        self._tasks.check()
        assert self._rechunker is not None
        packets = (self._rechunker.pending + int(samples.size)) // self._rechunker.block
        if len(self._queue) + packets > self._max_packets:
            return False  # _write would wait for room
        self._seg_written_in += int(samples.size)
        self._ending = False
        for block in self._rechunker.push(samples):
            self._enqueue(block)
        return True

    async def _put(self, block: PCM16, epoch: int, *, draining: bool = False) -> bool:
        """Queue one packet's audio, waiting for room; False if interrupted meanwhile."""
        while len(self._queue) >= self._max_packets:
            self._space.clear()
            await self._wait(self._space, self._buffer_ms / 1000 + 5.0, "room in the RTP queue")
            if self._state is not SinkState.OPEN and not draining:
                raise self._state_error("write")  # closed while this write was waiting
        if epoch != self._epoch:
            return False
        self._enqueue(block)
        return True

    def _enqueue(self, block: PCM16) -> None:
        self._queue.append(self._encode(block))
        self._idle.clear()
        self._data.set()

    def _resample(self, samples: PCM16, *, last: bool = False) -> PCM16:
        assert self._resampler is not None
        out: np.ndarray = self._resampler.resample_chunk(samples.astype(np.float32), last=last)
        pcm: PCM16 = np.clip(np.rint(out), -32768, 32767).astype(np.int16)
        return pcm

    async def _drain(self) -> None:
        self._tasks.check()
        assert self._rechunker is not None
        epoch = self._epoch
        self._ending = True
        self._data.set()  # a pacer waiting to prebuffer starts now: no more audio is coming
        if self._resampler is not None:
            tail = self._resample(np.zeros(0, np.int16), last=True)
            self._resampler.clear()  # ready for the next talk spurt
            for block in self._rechunker.push(tail):
                await self._put(block, epoch, draining=True)
        rest = self._rechunker.flush(pad=True)  # the last packet is padded with silence
        if rest is not None:
            await self._put(rest, epoch, draining=True)
        seconds = len(self._queue) * self.ptime_ms / 1000
        await self._wait(self._idle, seconds + 5.0, "the RTP queue to drain")
        if epoch == self._epoch:  # everything of this segment has been sent
            played = self._seg_written_in
            if self._write_lost:  # a write failed half-way: only what was sent counts
                played = self._played_now() - self._played_before
                self._dropped_samples += self._seg_written_in - played
                self._write_lost = False
            self._played_before += played
            self._seg_written_in = self._seg_sent_out = 0
            self._samples_played = self._played_before

    def _write_failed(self, samples: int) -> None:
        # part of the frame may be queued (and will be sent): settle at the next drain
        self._write_lost = True

    async def _interrupt(self) -> int:
        self._epoch += 1
        played = self._played_now()
        self._dropped_samples += self._seg_written_in - (played - self._played_before)
        self._played_before = self._samples_played = played
        self._seg_written_in = self._seg_sent_out = 0
        self._write_lost = False
        self._queue.clear()
        if self._rechunker is not None:
            self._rechunker.clear()
        if self._resampler is not None:
            self._resampler.clear()
        if self._talking:
            self._talking = False
            self._gap_from = self._next_due
        self._space.set()
        self._idle.set()
        return played

    async def _release(self) -> None:
        self._space.set()  # a writer blocked on a full queue wakes up and sees CLOSED
        try:
            if self._rtcp_transport is not None and self._packets_sent:
                self._send_rtcp(bye=True)
            await self._tasks.aclose()
        finally:
            for transport in (self._transport, self._rtcp_transport):
                if transport is not None:
                    transport.close()
            self._transport = self._rtcp_transport = None
            self._queue.clear()

    # -- tasks -------------------------------------------------------------------------------

    async def _wait(self, event: asyncio.Event, seconds: float, what: str) -> None:
        """Wait for ``event``, but give up if an owned task fails or ``seconds`` pass."""
        if event.is_set():
            return
        waiter = asyncio.ensure_future(event.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, *self._tasks.tasks}, timeout=seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            waiter.cancel()
        self._tasks.check()
        if not event.is_set():
            raise Timeout(f"{what} ({self.name})", seconds)

    def _played_now(self) -> int:
        rate_in = self.format.sample_rate
        sent_in = self._seg_sent_out * rate_in // self.clock_rate
        return self._played_before + min(self._seg_written_in, sent_in)

    async def _pace(self) -> None:
        """The one task that sends this sink's packets, on an absolute schedule."""
        spp, rate = self.samples_per_packet, self.clock_rate
        pt, ssrc = self.payload_type, self.ssrc
        while True:
            if not self._queue:
                if self._talking:
                    self._talking = False
                    self._gap_from = self._next_due
                    if not self._ending:
                        self._underruns += 1
                        log.debug("%s: underrun", self.name)
                self._idle.set()
                self._data.clear()
                await self._data.wait()  # cancelled by aclose(); data wakes it
                continue
            epoch = self._epoch
            if not self._talking and not await self._prebuffered(epoch):
                continue
            if not self._talking:
                now = time.monotonic()
                start = now if self._gap_from is None else max(now, self._gap_from)
                if self._gap_from is not None:
                    # keep the RTP clock locked to real time across the silence (§5.1)
                    self._ts = (self._ts + round((start - self._gap_from) * rate)) % RTP_TS_MOD
                self._spurt_start, self._spurt_packets = start, 0
                self._talking, self._marker_next = True, True
                self._talk_spurts += 1
            due = deadline(self._spurt_start, self._spurt_packets * spp, rate)
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -_MAX_CATCH_UP:
                log.warning("%s: %.0f ms late, re-anchoring the schedule", self.name, -delay * 1e3)
                self._spurt_start -= delay
                due -= delay
            if epoch != self._epoch or not self._queue:
                continue  # interrupted while sleeping
            payload = self._queue.popleft()
            self._space.set()
            # Hot path (50 packets/s per stream): the fixed header packed directly is 15x
            # cheaper than building an RtpPacket; tests parse these bytes back as RtpPackets.
            header = _HEADER.pack(
                _RTP_B0, (0x80 if self._marker_next else 0) | pt, self._seq, self._ts, ssrc
            )
            assert self._transport is not None
            self._transport.sendto(header + payload)
            self._mark_first_sample()
            self._sent_any.set()
            self._marker_next = False
            self._last_due, self._last_ts = due, self._ts
            self._seq = (self._seq + 1) % RTP_SEQ_MOD
            self._ts = (self._ts + spp) % RTP_TS_MOD
            self._spurt_packets += 1
            self._next_due = deadline(self._spurt_start, self._spurt_packets * spp, rate)
            self._packets_sent += 1
            self._octets_sent += len(payload)
            self._seg_sent_out += spp
            self._samples_played = self._played_now()

    async def _prebuffered(self, epoch: int) -> bool:
        """Before a talk spurt: wait (at most ``prebuffer_ms``) for a few packets of audio.

        A spurt that starts on the very first packet underruns at the first hiccup of a
        producer that streams in real time (peers.md §3, hass-sip #45); a short jitter buffer
        costs that much latency once, and only when the audio trickles in.
        """
        if self._ending or len(self._queue) >= self._prebuffer_packets:
            return True
        try:
            async with asyncio.timeout(self._prebuffer_ms / 1000):
                while not self._ending and len(self._queue) < self._prebuffer_packets:
                    self._data.clear()
                    await self._data.wait()
                    if epoch != self._epoch:
                        return False
        except TimeoutError:
            pass
        return epoch == self._epoch and bool(self._queue)

    async def _report(self) -> None:
        """RTCP sender reports (RFC 3550 §6.4.1), once this sink has sent data."""
        await self._sent_any.wait()
        while True:
            self._send_rtcp()
            await asyncio.sleep(self._rtcp_interval * random.uniform(0.5, 1.5))

    def _send_rtcp(self, *, bye: bool = False) -> None:
        if self._rtcp_transport is None:
            return
        # NTP time is wall-clock by definition; the RTP timestamp is extrapolated from the
        # last packet's sampling instant to the same moment (§6.4.1).
        mono, wall = time.monotonic(), time.time()
        rtp_ts = (self._last_ts + round((mono - self._last_due) * self.clock_rate)) % RTP_TS_MOD
        sr = RtcpSenderReport(
            self.ssrc, ntp_timestamp(wall), rtp_ts, self._packets_sent, self._octets_sent
        )
        data = sr.serialize() + rtcp_sdes_cname(self.ssrc, self._cname)
        if bye:
            data += rtcp_bye(self.ssrc)
        self._rtcp_transport.sendto(data)
        self._rtcp_sent += 1
