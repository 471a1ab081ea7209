"""RTP and RTCP packets (RFC 3550 / RFC 3551) and the payload codecs (pure: no I/O, no clock).

:class:`RtpPacket` and :class:`RtcpSenderReport` are frozen dataclasses with ``parse`` /
``serialize``, constants named after RFC 3550; :class:`Codec` names the payload formats and
their encoders/decoders (G.711 from :mod:`sinks.g711`, L16 in network byte order). Used by the
pacing sink (:mod:`sinks.rtp`) and by RTP receivers (e.g. ``tts_stream.telephony``).
Boundary: imports ``tts_stream.audio`` and ``tts_stream.errors`` only.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tts_stream.audio import PCM16
from tts_stream.errors import ProtocolViolation, UsageError

from .g711 import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode

__all__ = [
    "NTP_EPOCH_OFFSET",
    "RTCP_BYE",
    "RTCP_MIN_INTERVAL",
    "RTCP_SDES",
    "RTCP_SR",
    "RTP_HEADER",
    "RTP_HEADER_SIZE",
    "RTP_SEQ_MOD",
    "RTP_TS_MOD",
    "RTP_VERSION",
    "Codec",
    "RtcpSenderReport",
    "RtpExtension",
    "RtpPacket",
    "ntp_timestamp",
    "rtcp_bye",
    "rtcp_sdes_cname",
]

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

RTP_HEADER = struct.Struct("!BBHII")  # the fixed header (§5.1), for hot paths
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
        parts = [RTP_HEADER.pack(b0, b1, self.sequence_number, self.timestamp, self.ssrc)]
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
        b0, b1, seq, ts, ssrc = RTP_HEADER.unpack_from(data)
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


def _l16_decode(data: bytes | bytearray | memoryview) -> PCM16:
    n = len(data) // 2 * 2  # an odd trailing byte is not a sample
    pcm: PCM16 = np.frombuffer(data[:n], dtype=">i2").astype(np.int16)
    return pcm


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

    def decoder(self) -> Callable[[bytes | bytearray | memoryview], PCM16]:
        return {Codec.PCMU: ulaw_decode, Codec.PCMA: alaw_decode, Codec.L16: _l16_decode}[self]

    @classmethod
    def from_name(cls, encoding_name: str) -> Codec | None:
        """The codec for an SDP ``rtpmap`` encoding name (case-insensitive), or None."""
        return cls.__members__.get(encoding_name.upper())


