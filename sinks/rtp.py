"""RTP/UDP sink for IVR and SIP media paths (RFC 3550 / RFC 3551), with optional RTCP.

:class:`RtpSink` resamples the stream to the codec's clock with a stateful soxr stream, encodes
it (:mod:`sinks.rtp_packet`: G.711 or L16 in network byte order), cuts the bytes into packets of
``ptime_ms`` and hands them to the event loop's shared :class:`~sinks.rtp_clock.RtpClock`, which
sends every sink's due packets from one timer (no task or timer per sink). It sends from its own
non-blocking UDP socket, written with ``send`` straight from the clock's tick (bound to
``local_addr`` if given: symmetric RTP), or through a datagram transport the caller owns
(``transport``: a SIP call's media socket, which also receives the caller's RTP); ``redirect``
moves the stream to a new address. Frames are encoded and cut into whole packets (header and
payload) when written, so the tick only takes a packet and sends it; only a talk spurt's first
packet (its marker bit) and, after a silence, the packets queued before the spurt's timestamp
jump was known get their header rewritten. The packets wait in a count-bounded
:class:`~tts_stream.channel.Channel` the clock receives from (it wakes a writer blocked on a
full queue at a fifth of the buffer). Boundary: sockets and asyncio UDP transports; imports
``tts_stream.audio``, ``tts_stream.channel`` and ``tts_stream.errors`` only.
The packet classes are re-exported here for compatibility.

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
- a talk spurt starts on the clock's phase grid (the next multiple of
  :attr:`~sinks.rtp_clock.RtpClock.phase_grid`, 5 ms: never earlier, at most that much later),
  so streams share a few wake-ups per packet time;
- packets are due at ``start + n * ptime`` of the current talk spurt, never after a sum of
  sleeps (the shared clock may send one up to :data:`~sinks.rtp_clock.EARLY` ahead); if the
  event loop stalled for more than half a second the schedule is re-anchored instead of
  bursting the whole backlog out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import soxr

from tts_stream.audio import PCM16, AudioFormat, SinkStats
from tts_stream.channel import Channel
from tts_stream.errors import ConnectionFailed, Timeout, UsageError

from ._base import BaseSink, OwnedTasks, SinkState
from .rtp_clock import RtpClock
from .rtp_packet import (
    NTP_EPOCH_OFFSET,
    RTCP_BYE,
    RTCP_MIN_INTERVAL,
    RTCP_SDES,
    RTCP_SR,
    RTP_HEADER,
    RTP_HEADER_SIZE,
    RTP_SEQ_MOD,
    RTP_TS_MOD,
    RTP_VERSION,
    Codec,
    RtcpSenderReport,
    RtpExtension,
    RtpPacket,
    ntp_timestamp,
    rtcp_bye,
    rtcp_sdes_cname,
)

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

_RTP_B0 = RTP_VERSION << 6  # no padding, no extension, no CSRC
_HEADER = RTP_HEADER.pack

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
        pass  # receiver reports and stray packets are not used (a call's transport reads them)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable shows up here on the next send; RTP keeps going (the
        # receiver may simply not be up yet).
        self.errors += 1
        if self.errors == 1:
            log.info("%s: send error (receiver not listening?): %r", self.owner, exc)


# --- the sink ---------------------------------------------------------------------------------

_MAX_CATCH_UP = 0.5  # seconds late before the schedule is re-anchored instead of bursting


def _codec_for(  # noqa: PLR0913 - the constructor's checks, by argument
    codec: str, ptime_ms: int, port: int, *, rtcp: bool, clock_rate: int | None,
    payload_type: int | None, ids: tuple[tuple[str, int | None, int], ...],
) -> Codec:
    """Check what the constructor was given; the codec it names."""
    try:
        c = Codec[codec.upper()]
    except KeyError:
        raise UsageError(f"unknown RTP codec {codec!r}; use pcmu, pcma or l16") from None
    if not 10 <= ptime_ms <= 60:
        raise UsageError(f"ptime_ms must be within 10..60, not {ptime_ms}")
    if not 0 < port <= 65535 or (rtcp and port + 1 > 65535):
        raise UsageError(f"bad RTP port {port}")
    for what, value, limit in ids:
        if value is not None and not 0 <= value < limit:
            raise UsageError(f"{what} out of range: {value}")
    if c is not Codec.L16 and clock_rate not in (None, 8000):
        raise UsageError(f"{c.encoding_name} runs at 8000 Hz, not {clock_rate}")
    if payload_type is not None and not 0 <= payload_type < 128:
        raise UsageError(f"payload type out of range: {payload_type}")
    return c


def _check_buffers(ptime_ms: int, buffer_ms: int, prebuffer_ms: int, rtcp_interval: float) -> None:
    if rtcp_interval <= 0:
        raise UsageError("rtcp_interval must be positive")
    if buffer_ms < 2 * ptime_ms:
        raise UsageError("buffer_ms must hold at least two packets")
    if not 0 <= prebuffer_ms <= buffer_ms:
        raise UsageError("prebuffer_ms must be within 0..buffer_ms")


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

    Where packets leave from: by default an ephemeral port of a socket of the sink's own;
    ``local_addr=(host, port)`` binds it (symmetric RTP: send from the port advertised in SDP);
    ``transport`` sends through a datagram transport the caller owns and keeps open (e.g. a
    SIP call's media socket that also receives the far end's RTP). Packets of every sink on an
    event loop are sent by that loop's one :class:`~sinks.rtp_clock.RtpClock`;
    :meth:`redirect` moves the stream to another address (a re-INVITE's new media).
    """

    preferred_sample_rate: int | None = 8000

    # What the clock's tick and the write path touch, in slots: a few cache lines of the
    # object itself, read and written by offset, instead of entries of the instance dict
    # (some 70 attributes, too many for a shared-keys dict: a hashed lookup per access).
    # Everything else stays in the dict (BaseSink has one).
    __slots__ = (
        "_queue", "_take", "_send", "_fix", "_pt", "_seq0", "_ts0", "ssrc", "_spp", "_ptime",
        "_spurt_start", "_spurt_packets", "_next_due", "_talking", "_marker_next",
        "_sent0", "_partial", "_payload_size", "_encode", "_epoch", "_seg_written_in",
        "_ending", "_resampler", "_pack", "_max_packets", "_clock_error", "_idle", "_tasks",
        "_clock",
    )

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
        local_addr: tuple[str, int] | None = None,
        transport: asyncio.DatagramTransport | None = None,
    ) -> None:
        self.codec = _codec_for(
            codec, ptime_ms, port, rtcp=rtcp, clock_rate=clock_rate, payload_type=payload_type,
            ids=(("ssrc", ssrc, 1 << 32), ("initial_sequence", initial_sequence, RTP_SEQ_MOD),
                 ("initial_timestamp", initial_timestamp, RTP_TS_MOD)),
        )  # fmt: skip
        _check_buffers(ptime_ms, buffer_ms, prebuffer_ms, rtcp_interval)
        if transport is not None and (local_addr is not None or rtcp):
            raise UsageError("transport= sends through the caller's socket: no local_addr, rtcp")
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
        seq0, ts0 = initial_sequence, initial_timestamp  # of the first talk spurt (_init_pacing)
        self._seq0 = secrets.randbelow(RTP_SEQ_MOD) if seq0 is None else seq0
        self._ts0 = secrets.randbits(32) if ts0 is None else ts0
        self._buffer_ms = buffer_ms
        self._prebuffer_ms = prebuffer_ms
        self._prebuffer_packets = -(-prebuffer_ms // ptime_ms)
        self._max_packets = buffer_ms // ptime_ms
        # A writer blocked on a full queue is woken once the queue is down to a fifth (but at
        # least 100 ms of audio, and at most half), not at every packet sent: one wake-up per
        # 0.8 s of a 1 s buffer instead of 50 per second; each costs a task step and a timer.
        half = self._max_packets - max(1, self._max_packets // 2)
        self._low_water = min(half, max(self._max_packets // 5, -(-100 // ptime_ms)))
        self._session_id = secrets.randbits(31)
        self._encode = self.codec.encoder()
        self._tasks = OwnedTasks(self.name)
        self._local_addr = local_addr
        self._shared = transport  # owned by the caller: never closed here
        self._init_io()
        self._init_pacing()
        self._init_counters()

    def _init_io(self) -> None:
        self._sock: socket.socket | None = None  # our own socket (no ``transport=``)
        self._send: Callable[[bytes | bytearray], object] | None = None
        self._send_errors = 0
        self._rtcp_transport: asyncio.DatagramTransport | None = None
        self._resampler: soxr.ResampleStream | None = None
        self._partial = b""  # encoded audio short of a whole packet, waiting for more
        self._payload_size = 0  # octets per packet, known at open
        self._pack: Callable[..., bytes] = RTP_HEADER.pack  # a packet's, set at open
        # the packets' payloads, received by the clock; closed for good at release (a sink is
        # opened once only)
        self._queue = Channel[bytes](self._max_packets, low_water=self._low_water)
        self._take = self._queue.receive_nowait  # bound once: the clock's tick calls it
        self._idle = asyncio.Event()  # the queue is empty and the pacer has stopped talking
        self._sent_any = asyncio.Event()

    def _init_pacing(self) -> None:
        self._clock: RtpClock | None = None
        self._clock_error: Exception | None = None
        self._prebuffer_until: float | None = None
        self._spurt_due = 0.0  # when the next talk spurt was asked to start
        self._epoch = 0  # bumped by interrupt(): a sleeping pacer or writer sees it changed
        self._talking = False
        self._marker_next = True
        # queued packets whose header is rewritten when sent: the first of a talk spurt (its
        # marker bit) or, after a silence, every packet queued before the spurt's timestamp
        # jump was known (their headers were built without it)
        self._fix = 0
        self._ending = False  # drain() called: running dry now is the end, not an underrun
        self._gap_from: float | None = None  # monotonic time the RTP clock stopped sending
        self._spurt_start = 0.0
        # _seq0, _ts0 and _sent0 are the RTP state at the start of the current (or last) talk
        # spurt; with the packets sent in it they give the next sequence number, timestamp and
        # the count of packets sent (_next_seq, _next_ts, _sent): a tick writes back one number
        self._spurt_packets = 0
        self._next_due = 0.0
        self._spp = self._pt = 0  # samples per packet, payload type and clock rate, fixed at
        self._rate = 1  # open
        self._ptime = self.ptime_ms / 1000  # seconds per packet (spp / rate, exactly)

    def _init_counters(self) -> None:
        self._sent0 = 0
        self._talk_spurts = 0
        self._rtcp_sent = 0
        # played-sample accounting in input samples: per segment (since the last drain or
        # interrupt), output samples sent are converted back with the rate ratio
        self._played_before = 0
        self._seg_written_in = 0
        self._seg_from = 0  # _sent() when the segment began
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

    @property
    def local_address(self) -> tuple[str, int]:
        """The (host, port) packets leave from (after :meth:`open`)."""
        if self._sock is not None:
            addr = self._sock.getsockname()
        elif self._send is not None and self._shared is not None:
            addr = self._shared.get_extra_info("sockname")
        else:
            raise UsageError(f"{self.name}: not open")
        return str(addr[0]), int(addr[1])

    def rtp_stats(self) -> RtpStats:
        return RtpStats(
            ssrc=self.ssrc, packets_sent=self._sent(),
            octets_sent=self._sent() * self._payload_size,  # every payload is whole
            next_sequence_number=self._next_seq(), next_timestamp=self._next_ts(),
            talk_spurts=self._talk_spurts, send_errors=self._send_errors,
            rtcp_packets_sent=self._rtcp_sent,
        )

    def stats(self) -> SinkStats:
        self._samples_played = self._played_now() if self._fmt is not None else 0
        return super().stats()

    def redirect(self, host: str, port: int) -> None:
        """Send the following packets to ``host:port`` (an IP address), e.g. when a
        re-INVITE moved the far end's media. The stream goes on (same SSRC, continuous
        sequence numbers and timestamps, RFC 3550 §8.2 does not call for a new SSRC)."""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise UsageError(f"{self.name}: redirect needs an IP address, not {host!r}") from None
        if not 0 < port <= 65535:
            raise UsageError(f"bad RTP port {port}")
        if self.rtcp:
            raise UsageError(f"{self.name}: an RTCP sink cannot be redirected")
        if (host, port) == (self.host, self.port):
            return
        log.info("%s: media moves to %s:%d", self.name, host, port)
        self.host, self.port = host, port
        if self._sock is not None:
            try:
                self._sock.connect((host, port))  # an IP literal: no lookup, no wait
            except OSError as exc:
                raise ConnectionFailed(f"{self.name}: cannot send to {host}:{port}: {exc}") \
                    from exc  # fmt: skip
        elif self._shared is not None and self._send is not None:
            self._send = self._shared_sender(self._shared)

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
        self._spp, self._rate, self._pt = self.samples_per_packet, rate, self.payload_type
        self._payload_size = self._spp * self.codec.value[2]
        # header and payload in one call: one allocation per packet
        self._pack = struct.Struct(f"{RTP_HEADER.format}{self._payload_size}s").pack
        loop = asyncio.get_running_loop()
        try:
            if self._shared is not None:
                self._send = self._shared_sender(self._shared)
            else:
                self._sock = await self._own_socket(loop)
                self._send = self._sock.send
            if self.rtcp:
                self._rtcp_transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Datagrams(self.name + "/rtcp"), remote_addr=(self.host, self.port + 1)
                )
        except OSError as exc:
            raise ConnectionFailed(f"{self.name}: cannot open UDP socket: {exc}") from exc
        self._idle.set()
        self._clock = RtpClock.for_loop(loop)
        if self.rtcp:
            self._tasks.start(self._report(), name="rtcp")
        log.debug("%s: open, %d Hz -> %d Hz, ssrc %08x", self.name, fmt.sample_rate, rate,
                  self.ssrc)

    def _shared_sender(
        self, transport: asyncio.DatagramTransport
    ) -> Callable[[bytes | bytearray], object]:
        dest = (self.host, self.port)
        return lambda data: transport.sendto(data, dest)

    async def _own_socket(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        """A non-blocking UDP socket connected to the receiver, written to directly by the
        clock's tick (one ``send`` system call per packet, nothing in between)."""
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
        family, _, proto, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM, proto)
        try:
            sock.setblocking(False)
            if self._local_addr is not None:
                sock.bind(self._local_addr)
            sock.connect(addr)
        except OSError:
            sock.close()
            raise
        return sock

    def _check(self) -> None:
        self._tasks.check()
        if self._clock_error is not None:
            raise self._clock_error

    async def _write(self, samples: PCM16) -> None:
        self._check()
        epoch = self._epoch
        self._seg_written_in += int(samples.size)
        self._ending = False
        data = self._encoded(samples if self._resampler is None else self._resample(samples))
        count = len(data) // self._payload_size
        if self._queue.queued + count <= self._max_packets:
            self._enqueue(data, 0, count)  # room for all of it (the usual case): no await
        else:
            await self._put(data, count, epoch)

    def _try_write(self, samples: PCM16) -> bool:
        # Only without resampling: how many packets a frame completes must be known before
        # any state changes, and soxr's output length is known only after it took the input.
        if self._resampler is None:
            self._check()
            octets = len(self._partial) + int(samples.size) * self.codec.value[2]
            if self._queue.queued + octets // self._payload_size <= self._max_packets:
                self._seg_written_in += int(samples.size)
                self._ending = False
                data = self._encoded(samples)
                self._enqueue(data, 0, len(data) // self._payload_size)
                return True
        return False  # _write would wait for room (or resample)

    def _encoded(self, samples: PCM16) -> bytes:
        """A frame encoded in one codec call (G.711 and L16 are sample by sample, so encoding
        before cutting is the same as after), as whole packets' payloads back to back; the
        rest waits in ``_partial`` for the next frame."""
        data = self._partial + self._encode(samples) if self._partial else self._encode(samples)
        whole = len(data) - len(data) % self._payload_size
        self._partial = data[whole:]
        return data[:whole] if self._partial else data

    async def _put(self, data: bytes, count: int, epoch: int, *, draining: bool = False) -> bool:
        """Queue ``count`` packets' audio, waiting for room as needed; False if interrupted
        meanwhile (the rest of the frame is dropped)."""
        queue, done = self._queue, 0
        while done < count:
            room = self._max_packets - queue.queued
            if room <= 0:
                # the channel wakes us at its low-water mark, on interrupt (clear), release and
                # a clock error (close); it does not queue for us, so an interrupt drops the rest
                await self._wait(self._has_room, queue.wait_room,
                                 self._buffer_ms / 1000 + 5.0, "room in the RTP queue")  # fmt: skip
                if self._state is not SinkState.OPEN and not draining:
                    raise self._state_error("write")  # closed while this write was waiting
                if epoch != self._epoch:
                    return False
                continue
            room = min(room, count - done)
            self._enqueue(data, done, room)
            done += room
        return True

    def _has_room(self) -> bool:
        return self._queue.queued < self._max_packets

    def _enqueue(self, data: bytes, first: int, count: int) -> None:
        """Queue packets ``first`` to ``first + count`` of ``data``: each payload behind its
        header, built now (once per packet, in the writer's turn, so that the clock's tick
        only sends). The sequence number and timestamp follow on from what is queued (the
        next packet to send, plus the queue): sending does not change that sum, and a talk
        spurt's timestamp jump rewrites the headers queued before it (``_fix``)."""
        if not count:
            return
        queue, pack, b1, ssrc, spp = self._queue, self._pack, self._pt, self.ssrc, self._spp
        ahead, size = self._spurt_packets + queue.queued, self._payload_size  # since _seq0
        seq, ts = (self._seq0 + ahead) & 0xFFFF, (self._ts0 + ahead * spp) & 0xFFFFFFFF
        packets = []
        for i in range(first * size, (first + count) * size, size):
            packets.append(pack(_RTP_B0, b1, seq, ts, ssrc, data[i : i + size]))
            seq, ts = (seq + 1) & 0xFFFF, (ts + spp) & 0xFFFFFFFF  # mod 2**16, 2**32
        queue.send_all_nowait(packets)  # the caller made room: never WouldBlock
        if not self._talking:  # a talk spurt under way is not idle already
            self._idle.clear()
            self._kick()

    def _resample(self, samples: PCM16, *, last: bool = False) -> PCM16:
        assert self._resampler is not None
        out: np.ndarray = self._resampler.resample_chunk(samples.astype(np.float32), last=last)
        pcm: PCM16 = np.clip(np.rint(out), -32768, 32767).astype(np.int16)
        return pcm

    async def _drain(self) -> None:
        self._check()
        epoch = self._epoch
        self._ending = True
        self._kick()  # a spurt waiting to prebuffer starts now: no more audio is coming
        size = self._payload_size
        if self._resampler is not None:
            tail = self._encoded(self._resample(np.zeros(0, np.int16), last=True))
            self._resampler.clear()  # ready for the next talk spurt
            await self._put(tail, len(tail) // size, epoch, draining=True)
        if self._partial:  # the last packet is padded with silence
            pad = self._encoded(np.zeros((size - len(self._partial)) // self.codec.value[2],
                                         np.int16))  # fmt: skip
            await self._put(pad, 1, epoch, draining=True)
        seconds = self._queue.queued * self.ptime_ms / 1000
        await self._wait(self._idle.is_set, self._idle.wait, seconds + 5.0,
                         "the RTP queue to drain")  # fmt: skip
        if epoch == self._epoch:  # everything of this segment has been sent
            self._settle_segment()

    def _settle_segment(self) -> None:
        played = self._seg_written_in
        if self._write_lost:  # a write failed half-way: only what was sent counts
            played = self._played_now() - self._played_before
            self._dropped_samples += self._seg_written_in - played
            self._write_lost = False
        self._played_before += played
        self._seg_written_in, self._seg_from = 0, self._sent()
        self._samples_played = self._played_before

    def _write_failed(self, samples: int) -> None:
        # part of the frame may be queued (and will be sent): settle at the next drain
        self._write_lost = True

    async def _interrupt(self) -> int:
        self._epoch += 1
        played = self._played_now()
        self._dropped_samples += self._seg_written_in - (played - self._played_before)
        self._played_before = self._samples_played = played
        self._seg_written_in, self._seg_from = 0, self._sent()
        self._write_lost = False
        self._queue.clear()  # wakes a writer blocked on a full queue: it drops the rest
        self._fix = 0
        self._partial = b""
        if self._resampler is not None:
            self._resampler.clear()
        if self._talking:
            self._talking = False
            self._gap_from = self._next_due
        self._unschedule()
        self._idle.set()
        return played

    async def _release(self) -> None:
        self._queue.close()  # a writer blocked on a full queue wakes up and sees CLOSED
        self._unschedule()
        try:
            if self._rtcp_transport is not None and self._sent():
                self._send_rtcp(bye=True)
            await self._tasks.aclose()
        finally:
            if self._sock is not None:
                self._sock.close()
            if self._rtcp_transport is not None:
                self._rtcp_transport.close()
            self._sock = self._send = self._rtcp_transport = None

    # -- tasks -------------------------------------------------------------------------------

    async def _wait(
        self, ready: Callable[[], bool], wake: Callable[[], Awaitable[object]], seconds: float,
        what: str,
    ) -> None:  # fmt: skip
        """Until ``ready()``, awaiting ``wake()``; give up if an owned task fails (``_check``
        raises it, or the state's or the clock's error) or ``seconds`` pass (``Timeout``)."""
        if ready():
            return
        tasks = self._tasks.tasks
        if not tasks:  # nothing that could fail meanwhile (no RTCP task): a plain wait
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await wake()
        else:
            waiter = asyncio.ensure_future(wake())
            try:
                await asyncio.wait({waiter, *tasks}, timeout=seconds,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            finally:
                waiter.cancel()
        self._check()
        if not ready():
            raise Timeout(f"{what} ({self.name})", seconds)

    def _next_seq(self) -> int:
        return (self._seq0 + self._spurt_packets) % RTP_SEQ_MOD

    def _next_ts(self) -> int:
        return (self._ts0 + self._spurt_packets * self._spp) % RTP_TS_MOD

    def _sent(self) -> int:
        return self._sent0 + self._spurt_packets

    def _played_now(self) -> int:
        rate_in = self.format.sample_rate
        sent_in = (self._sent() - self._seg_from) * self._spp * rate_in // self.clock_rate
        return self._played_before + min(self._seg_written_in, sent_in)

    # -- pacing: driven by the loop's RtpClock ----------------------------------------------

    def _kick(self) -> None:
        """Audio arrived (or the end of it): start a talk spurt now or after the prebuffer."""
        if self._talking or not self._queue.queued or self._clock is None:
            return
        # on the clock's phase grid (a few ms at most, never earlier): one wake-up then
        # serves every stream of that phase
        now = time.monotonic()
        if self._ending or self._queue.queued >= self._prebuffer_packets:
            due = self._clock.snap(now)
        elif self._prebuffer_until is None:
            # A spurt starting on the very first packet underruns at the first hiccup of a
            # producer that streams in real time (peers.md §3, hass-sip #45); a short jitter
            # buffer costs that much latency once, and only when the audio trickles in.
            self._prebuffer_until = due = self._clock.snap(now + self._prebuffer_ms / 1000)
        else:
            return  # already waiting for the prebuffer
        self._spurt_due = due
        self._clock.schedule(self, due)

    def _unschedule(self) -> None:
        self._prebuffer_until = None
        if self._clock is not None:
            self._clock.cancel(self)  # a dict lookup if it was not scheduled

    def on_clock(self, now: float, horizon: float) -> float | None:
        """Called by the clock: send every packet due up to ``horizon``; the next due time.

        The hot path (50 calls a second per stream, one packet each): a queued packet is
        complete (header and payload, built when written), so a tick takes it and sends it
        with one system call; the state it reads is in slots, and it is written back once."""
        if not self._talking and not self._start_spurt():
            return None
        due = self._next_due
        if due < now - _MAX_CATCH_UP:
            due = self._reanchor(now, due)
        queue = self._queue
        if due <= horizon and queue.queued:
            send, take = self._send, self._take
            assert send is not None
            start, n, ptime, sent = self._spurt_start, self._spurt_packets, self._ptime, 0
            while True:
                packet = take()  # wakes a blocked writer at the low-water mark
                if self._fix:
                    packet = self._fixed(packet, sent)
                try:
                    send(packet)
                except OSError as exc:  # ICMP unreachable reported on this send, or a full buffer
                    self._send_failed(exc)
                sent += 1
                due = start + (n + sent) * ptime  # absolute: start + n * ptime, never a sum
                if due > horizon or not queue.queued:
                    break
            self._spurt_packets, self._next_due = n + sent, due
        if not queue.queued:
            self._stop_talking()
            return None
        return due

    def _fixed(self, packet: bytes, k: int) -> bytes:
        """``packet`` (the ``k``-th of this tick) with its header rewritten: the marker bit
        on a talk spurt's first packet, the timestamp of the spurt (after a silence)."""
        self._fix -= 1
        b1 = self._pt
        if self._marker_next:
            b1 |= 0x80
            self._marker_next = False
            if self._first_sample_at is None:  # the first packet ever: it leaves now
                self._mark_first_sample()
                self._sent_any.set()
        k += self._spurt_packets
        seq, ts = (self._seq0 + k) & 0xFFFF, (self._ts0 + k * self._spp) & 0xFFFFFFFF
        return _HEADER(_RTP_B0, b1, seq, ts, self.ssrc) + packet[RTP_HEADER_SIZE:]

    def _start_spurt(self) -> bool:
        """Begin a talk spurt if there is audio; False (and idle) if there is none."""
        self._prebuffer_until = None
        if not self._queue.queued:
            self._idle.set()
            return False
        # The spurt starts when it was due, not when the clock got round to it: a clock
        # woken late (a busy loop) catches up instead of moving every stream that started
        # meanwhile onto the same phase (lock-step streams make bursty work).
        start, jump = self._spurt_due, 0
        if self._gap_from is not None:
            start = max(start, self._gap_from)
            # keep the RTP clock locked to real time across the silence (§5.1)
            jump = round((start - self._gap_from) * self._rate)
        self._seq0, self._sent0 = self._next_seq(), self._sent()
        self._ts0 = (self._next_ts() + jump) % RTP_TS_MOD
        # the marker goes on the first packet; after a jump every queued header is stale
        self._fix = self._queue.queued if jump else 1
        self._spurt_start, self._spurt_packets = start, 0
        self._next_due = start
        self._talking, self._marker_next = True, True
        self._talk_spurts += 1
        return True

    def _reanchor(self, now: float, due: float) -> float:
        log.warning("%s: %.0f ms late, re-anchoring the schedule", self.name,
                    (now - due) * 1e3)  # fmt: skip
        # whole packet times, so the stream keeps its phase on the grid
        ptime = self.ptime_ms / 1000
        shift = -(-(now - due) // ptime) * ptime
        self._spurt_start += shift
        self._next_due = due + shift
        return self._next_due

    def _send_failed(self, exc: OSError) -> None:
        # ICMP port unreachable shows up on the next send; RTP keeps going (the receiver may
        # simply not be up yet). The packet is lost, as a UDP packet may be.
        self._send_errors += 1
        if self._send_errors == 1:
            log.info("%s: send error (receiver not listening?): %r", self.name, exc)

    def _stop_talking(self) -> None:
        self._talking = False
        self._gap_from = self._next_due
        if not self._ending:
            self._underruns += 1
            log.debug("%s: underrun", self.name)
        self._idle.set()

    def on_clock_error(self, exc: Exception) -> None:
        self._clock_error = exc
        self._queue.close()  # the receiver is gone: a blocked writer wakes up and sees the error
        self._idle.set()

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
        # last packet's sampling instant to the same moment (§6.4.1). That packet is the one
        # before the next: its timestamp and due time are one packet before the next's (a
        # talk spurt's timestamp jump keeps the same line, so this holds across silences).
        mono, wall = time.monotonic(), time.time()
        last_ts, last_due = self._next_ts() - self._spp, self._next_due - self._ptime
        rtp_ts = (last_ts + round((mono - last_due) * self.clock_rate)) % RTP_TS_MOD
        sent = self._sent()
        sr = RtcpSenderReport(
            self.ssrc, ntp_timestamp(wall), rtp_ts, sent, sent * self._payload_size
        )
        data = sr.serialize() + rtcp_sdes_cname(self.ssrc, self._cname)
        if bye:
            data += rtcp_bye(self.ssrc)
        self._rtcp_transport.sendto(data)
        self._rtcp_sent += 1
