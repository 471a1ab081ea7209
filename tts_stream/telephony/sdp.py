"""SDP (RFC 4566) for one audio stream and the RFC 3264 offer/answer rules a UAS needs (pure).

:func:`parse_offer` reads the connection address, the first ``m=audio`` line, its payload
formats (static ones from RFC 3551 table 4 when there is no ``rtpmap``), ``a=ptime`` and the
direction. :func:`answer` picks the first offered format we support (the offerer's order is
its preference, §6.1), keeps ``telephone-event/8000`` (RFC 4733) if offered, answers with the
same ptime (20 ms when the offer has none) and returns a :class:`MediaPlan`; :meth:`MediaPlan.sdp`
writes the answer (or our own offer for an INVITE without SDP). No codec in common is
:class:`NoCommonCodec`, the 488 of RFC 3261 §13.3.1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tts_stream.errors import ProtocolViolation

__all__ = [
    "SUPPORTED",
    "MediaPlan",
    "NoCommonCodec",
    "Offer",
    "PayloadFormat",
    "answer",
    "our_offer",
    "parse_offer",
]

# encoding name -> clock rate we accept; L16 at 8 kHz only (the telephony rate)
SUPPORTED = {"PCMU": 8000, "PCMA": 8000, "L16": 8000}
_STATIC = {0: ("PCMU", 8000), 8: ("PCMA", 8000)}  # RFC 3551 table 4 (the ones we speak)
TELEPHONE_EVENT = "telephone-event"
_DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")


class NoCommonCodec(ProtocolViolation):
    """The offer has no payload format we can send (answer 488 Not Acceptable Here)."""


@dataclass(frozen=True)
class PayloadFormat:
    payload_type: int
    encoding: str  # upper case, e.g. "PCMU", "TELEPHONE-EVENT"
    clock_rate: int
    fmtp: str = ""


@dataclass(frozen=True)
class Offer:
    host: str
    port: int
    formats: tuple[PayloadFormat, ...]
    ptime_ms: int | None
    direction: str
    session_id: str
    version: int


@dataclass(frozen=True)
class MediaPlan:
    """What was agreed: where the far end listens, our codec and DTMF payload type."""

    remote_host: str
    remote_port: int
    codec: PayloadFormat
    ptime_ms: int
    telephone_event: PayloadFormat | None
    direction: str = "sendrecv"  # ours
    local_host: str = "127.0.0.1"
    local_port: int = 0
    session_id: int = 0
    version: int = 1
    extra: tuple[PayloadFormat, ...] = field(default=())  # offered alternatives (our offer)

    def sdp(self) -> bytes:
        """Our SDP with this plan (RFC 3264 §6: the answer lists only the chosen formats)."""
        ipv = "IP6" if ":" in self.local_host else "IP4"
        formats = [self.codec, *self.extra]
        if self.telephone_event is not None:
            formats.append(self.telephone_event)
        lines = [
            "v=0",
            f"o=tts-stream {self.session_id} {self.version} IN {ipv} {self.local_host}",
            "s=tts-stream",
            f"c=IN {ipv} {self.local_host}",
            "t=0 0",
            f"m=audio {self.local_port} RTP/AVP {' '.join(str(f.payload_type) for f in formats)}",
        ]
        for f in formats:
            lines.append(f"a=rtpmap:{f.payload_type} {_rtpmap_name(f)}/{f.clock_rate}")
            if f.fmtp:
                lines.append(f"a=fmtp:{f.payload_type} {f.fmtp}")
        lines += [f"a=ptime:{self.ptime_ms}", f"a={self.direction}"]
        return ("\r\n".join(lines) + "\r\n").encode()

    def with_local(self, host: str, port: int, session_id: int) -> MediaPlan:
        return replace(self, local_host=host, local_port=port, session_id=session_id)


def _rtpmap_name(f: PayloadFormat) -> str:
    return TELEPHONE_EVENT if f.encoding == TELEPHONE_EVENT.upper() else f.encoding


def parse_offer(body: bytes) -> Offer:
    """Parse an SDP offer; raises :class:`~tts_stream.errors.ProtocolViolation` saying why."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("SDP is not UTF-8") from exc
    reader = _OfferReader()
    for raw in text.splitlines():
        line = raw.strip()
        if len(line) >= 2 and line[1] == "=":
            reader.read(line)
    return reader.offer()


@dataclass
class _OfferReader:
    """What an offer's lines said so far: the session level and its first ``m=audio`` section.

    ``in_audio`` is true inside that section; once it ends (``seen_audio`` and not
    ``in_audio``), later sections are skipped but their ``c=`` lines are still checked.
    """

    session_host: str | None = None
    media_host: str | None = None
    port: int | None = None
    pts: list[int] = field(default_factory=list)
    rtpmap: dict[int, tuple[str, int]] = field(default_factory=dict)
    fmtp: dict[int, str] = field(default_factory=dict)
    ptime: int | None = None
    direction: str = "sendrecv"
    session_id: str = "0"
    version: int = 0
    in_audio: bool = False
    seen_audio: bool = False

    def read(self, line: str) -> None:
        """One ``<kind>=<value>`` line; other kinds than o, m, c and a are ignored."""
        kind, value = line[0], line[2:]
        if kind == "o":
            self._origin(value)
        elif kind == "m":
            self._media(value, line)
        elif kind == "c":
            self._connection(value, line)
        elif kind == "a" and (self.in_audio or not self.seen_audio):
            self._attribute(value)

    def _origin(self, value: str) -> None:
        bits = value.split()
        if len(bits) >= 3 and bits[2].isdigit():
            self.session_id, self.version = bits[1], int(bits[2])

    def _media(self, value: str, line: str) -> None:
        self.in_audio = False
        bits = value.split()
        if len(bits) < 3 or bits[0] != "audio" or self.seen_audio:
            return
        if not bits[1].split("/")[0].isdigit():
            raise ProtocolViolation(f"bad SDP media port in {line!r}")
        self.port = int(bits[1].split("/")[0])
        if bits[2] not in ("RTP/AVP", "RTP/AVPF"):
            raise ProtocolViolation(f"unsupported SDP transport {bits[2]!r}")
        self.pts = [int(p) for p in bits[3:] if p.isdigit() and int(p) < 128]
        self.in_audio = self.seen_audio = True

    def _connection(self, value: str, line: str) -> None:
        bits = value.split()
        if len(bits) < 3:
            raise ProtocolViolation(f"bad SDP connection line {line!r}")
        host = bits[2].split("/")[0]
        if self.seen_audio and self.in_audio:
            self.media_host = host
        elif not self.seen_audio:
            self.session_host = host

    def _attribute(self, value: str) -> None:
        name, _, rest = value.partition(":")
        if name == "rtpmap" and self.in_audio:
            pt_text, _, enc = rest.partition(" ")
            enc_bits = enc.split("/")
            if pt_text.isdigit() and len(enc_bits) >= 2 and enc_bits[1].isdigit():
                self.rtpmap[int(pt_text)] = (enc_bits[0].upper(), int(enc_bits[1]))
        elif name == "fmtp" and self.in_audio:
            pt_text, _, params = rest.partition(" ")
            if pt_text.isdigit():
                self.fmtp[int(pt_text)] = params.strip()
        elif name == "ptime" and rest.strip().isdigit():
            self.ptime = int(rest.strip())
        elif name in _DIRECTIONS:
            self.direction = name

    def offer(self) -> Offer:
        """The offer the lines describe; raises when the audio port or address is missing."""
        if self.port is None:
            raise ProtocolViolation("SDP has no m=audio line")
        conn = self.media_host or self.session_host
        if conn is None:
            raise ProtocolViolation("SDP has no connection address (c=)")
        formats = []
        for pt in self.pts:
            enc, rate = self.rtpmap.get(pt) or _STATIC.get(pt, ("", 0))
            if enc:
                formats.append(PayloadFormat(pt, enc, rate, self.fmtp.get(pt, "")))
        return Offer(conn, self.port, tuple(formats), self.ptime, self.direction,
                     self.session_id, self.version)  # fmt: skip


def answer(offer: Offer, *, codecs: tuple[str, ...] = ("PCMU", "PCMA", "L16")) -> MediaPlan:
    """Choose our side of the call from ``offer`` (RFC 3264 §6.1); raises NoCommonCodec."""
    wanted = {c.upper() for c in codecs}
    chosen = next(
        (f for f in offer.formats
         if f.encoding in wanted and SUPPORTED.get(f.encoding) == f.clock_rate),
        None,
    )  # fmt: skip
    if chosen is None:
        names = ", ".join(f"{f.encoding}/{f.clock_rate}" for f in offer.formats) or "none"
        raise NoCommonCodec(f"no common audio codec (offered: {names})")
    event = next(
        (f for f in offer.formats
         if f.encoding == TELEPHONE_EVENT.upper() and f.clock_rate == 8000),
        None,
    )  # fmt: skip
    ptime = offer.ptime_ms if offer.ptime_ms in (10, 20, 30, 40, 50, 60) else 20
    ours = {"sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}.get(
        offer.direction, "sendrecv"
    )
    return MediaPlan(offer.host, offer.port, chosen, ptime, event, ours)


def our_offer(host: str, port: int, session_id: int) -> MediaPlan:
    """Our offer, for an INVITE without SDP (the answer comes in the ACK)."""
    return MediaPlan(
        remote_host="", remote_port=0, codec=PayloadFormat(0, "PCMU", 8000), ptime_ms=20,
        telephone_event=PayloadFormat(101, TELEPHONE_EVENT.upper(), 8000, "0-16"),
        local_host=host, local_port=port, session_id=session_id,
        extra=(PayloadFormat(8, "PCMA", 8000),),
    )
