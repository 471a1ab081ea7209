"""RFC 4733 telephone events (DTMF digits in RTP), pure: parse and de-duplicate.

A key press is sent as a series of event packets with the same RTP timestamp (the event's
start), growing ``duration``, and three retransmitted packets with the End bit (§2.5.1.4).
:class:`DtmfDetector` reports each press once, when its first packet arrives (lowest latency
for barge-in), and ignores the rest, including end packets of a press it already reported and
a press whose start packet was lost (it is reported at its first end packet then).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tts_stream.errors import ProtocolViolation

__all__ = ["DIGITS", "DtmfDetector", "DtmfEvent", "TelephoneEvent"]

DIGITS = "0123456789*#ABCD"  # event codes 0-15 (RFC 4733 §3.2)
_EVENT = struct.Struct("!BBH")


@dataclass(frozen=True)
class TelephoneEvent:
    """The 4-byte payload of one RFC 4733 packet (§2.3)."""

    event: int
    end: bool
    volume: int
    duration: int

    @classmethod
    def parse(cls, payload: bytes) -> TelephoneEvent:
        if len(payload) < 4:
            raise ProtocolViolation(f"telephone-event payload too short: {len(payload)} bytes")
        event, flags, duration = _EVENT.unpack_from(payload)
        return cls(event, bool(flags & 0x80), flags & 0x3F, duration)

    def serialize(self) -> bytes:
        return _EVENT.pack(self.event, (0x80 if self.end else 0) | self.volume, self.duration)


@dataclass(frozen=True)
class DtmfEvent:
    digit: str
    timestamp: int  # RTP timestamp of the event start


class DtmfDetector:
    """Feed it telephone-event payloads with their RTP timestamp; get each press once."""

    def __init__(self) -> None:
        self._last: int | None = None  # timestamp of the last press reported

    def feed(self, payload: bytes, timestamp: int) -> DtmfEvent | None:
        ev = TelephoneEvent.parse(payload)
        if ev.event >= len(DIGITS):
            return None  # a tone or flash event, not a digit
        if timestamp == self._last:
            return None  # continuation or end retransmission of the press we reported
        self._last = timestamp
        return DtmfEvent(DIGITS[ev.event], timestamp)
