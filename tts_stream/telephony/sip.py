"""SIP messages (RFC 3261 §7, §20): parse and serialize, pure (no I/O, no clock).

:class:`SipRequest` and :class:`SipResponse` are frozen dataclasses; headers are kept as an
ordered tuple of ``(name, value)`` with the canonical (long) name, so multi-valued headers such
as Via and Record-Route keep their order. :func:`parse` raises :class:`SipParseError` (a
:class:`~tts_stream.errors.ProtocolViolation`) on malformed input and says what is wrong;
:func:`response_to` builds a response that copies Via, From, To, Call-ID and CSeq as §8.2.6.2
requires. Helpers parse the pieces a UAS needs: Via (branch, sent-by, rport), name-addr with
its ``tag``, CSeq, and a SIP URI's host and port.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tts_stream.errors import ProtocolViolation

__all__ = [
    "MAX_MESSAGE",
    "CSeq",
    "NameAddr",
    "SipMessage",
    "SipParseError",
    "SipRequest",
    "SipResponse",
    "SipUri",
    "Via",
    "parse",
    "response_to",
]

MAX_MESSAGE = 65535  # one UDP datagram
SIP_VERSION = "SIP/2.0"
MAGIC_COOKIE = "z9hG4bK"  # §8.1.1.7: branch of an RFC 3261 client

# §7.3.3 compact forms, and the canonical spelling of the headers we read or write
_COMPACT = {
    "v": "Via", "f": "From", "t": "To", "i": "Call-ID", "m": "Contact", "l": "Content-Length",
    "c": "Content-Type", "k": "Supported", "s": "Subject", "e": "Content-Encoding",
}
_CANONICAL = {
    name.lower(): name
    for name in (
        "Via", "From", "To", "Call-ID", "CSeq", "Contact", "Content-Length", "Content-Type",
        "Max-Forwards", "Record-Route", "Route", "Allow", "Accept", "Supported", "User-Agent",
        "Server", "Subject", "Content-Encoding", "Require", "Unsupported", "Expires",
    )
}
_TOKEN = re.compile(r"^[A-Za-z0-9.!%*_+`'~-]+$")
_STATUS = re.compile(r"^SIP/2\.0 ([1-6]\d\d) ?(.*)$")


class SipParseError(ProtocolViolation):
    """A datagram is not a well-formed SIP message."""


def _canonical(name: str) -> str:
    low = name.lower()
    if low in _COMPACT:
        return _COMPACT[low]
    return _CANONICAL.get(low, name)


@dataclass(frozen=True)
class SipMessage:
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any spelling), or None."""
        want = _canonical(name).lower()
        for key, value in self.headers:
            if key.lower() == want:
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        """Every value of ``name``, comma-separated lists split (§7.3.1)."""
        want = _canonical(name).lower()
        out: list[str] = []
        for key, value in self.headers:
            if key.lower() == want:
                out.extend(_split_commas(value))
        return out

    def _serialize(self, start: str) -> bytes:
        lines = [start]
        lines.extend(f"{k}: {v}" for k, v in self.headers if k.lower() != "content-length")
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body

    @property
    def call_id(self) -> str:
        return self.header("Call-ID") or ""

    @property
    def cseq(self) -> CSeq:
        return CSeq.parse(self.header("CSeq") or "")

    @property
    def via(self) -> Via:
        return Via.parse(self.header_all("Via")[0])


@dataclass(frozen=True)
class SipRequest(SipMessage):
    method: str = "OPTIONS"
    uri: str = "sip:invalid"

    def serialize(self) -> bytes:
        return self._serialize(f"{self.method} {self.uri} {SIP_VERSION}")


@dataclass(frozen=True)
class SipResponse(SipMessage):
    status: int = 200
    reason: str = "OK"

    def serialize(self) -> bytes:
        return self._serialize(f"{SIP_VERSION} {self.status} {self.reason}")


def _split_commas(value: str) -> list[str]:
    """Split a header value at commas outside quotes and angle brackets."""
    parts: list[str] = []
    cur: list[str] = []
    depth, quoted = 0, False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "<":
            depth += 1
        elif not quoted and ch == ">":
            depth -= 1
        if ch == "," and not quoted and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


def parse(data: bytes) -> SipRequest | SipResponse:
    """Parse one datagram; raises :class:`SipParseError` saying what is wrong."""
    start, header_lines, body = _frame(data)
    headers = _headers(header_lines)
    body = _body(headers, body)
    msg: SipRequest | SipResponse
    m = _STATUS.match(start)
    if m:
        msg = SipResponse(tuple(headers), body, int(m.group(1)), m.group(2))
    else:
        parts = start.split(" ")
        if len(parts) != 3 or parts[2] != SIP_VERSION or not _TOKEN.match(parts[0]):
            raise SipParseError(f"bad SIP start line {start[:60]!r}")
        msg = SipRequest(tuple(headers), body, parts[0].upper(), parts[1])
    _check_required(msg)
    return msg


def _frame(data: bytes) -> tuple[str, list[str], bytes]:
    """The start line, the header lines and the raw body of a datagram (§7.5)."""
    if len(data) > MAX_MESSAGE:
        raise SipParseError(f"SIP message too long: {len(data)} bytes")
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")  # §7.5: tolerate bare LF
        if not sep:
            raise SipParseError("SIP message truncated: no blank line after the headers")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SipParseError("SIP headers are not UTF-8") from exc
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and not lines[0]:
        lines.pop(0)  # §7.5: empty lines before the start line are ignored
    if not lines:
        raise SipParseError("empty SIP message")
    return lines[0], lines[1:], body


def _headers(lines: list[str]) -> list[tuple[str, str]]:
    """``(canonical name, value)`` in order, folded continuation lines joined (§7.3.1)."""
    headers: list[tuple[str, str]] = []
    for line in lines:
        if line[:1] in (" ", "\t") and headers:  # folded continuation line (§7.3.1)
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}")
            continue
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not _TOKEN.match(name):
            raise SipParseError(f"bad SIP header line {line[:60]!r}")
        headers.append((_canonical(name), value.strip()))
    return headers


def _body(headers: list[tuple[str, str]], body: bytes) -> bytes:
    """``body`` cut to its Content-Length (§20.14), checked to be all there."""
    length = next((v for k, v in headers if k == "Content-Length"), None)
    if length is None:
        return body
    if not length.isdigit():
        raise SipParseError(f"bad Content-Length {length!r}")
    if int(length) > len(body):
        raise SipParseError(f"SIP body truncated: {len(body)} of {length} bytes")
    return body[: int(length)]


def _check_required(msg: SipMessage) -> None:
    """The headers every request and response carries (§8.1.1), each well-formed."""
    for required in ("Via", "From", "To", "Call-ID", "CSeq"):
        if msg.header(required) is None:
            raise SipParseError(f"SIP message without {required}")
    msg.cseq  # noqa: B018 - validates
    msg.via  # noqa: B018
    NameAddr.parse(msg.header("From") or "")
    NameAddr.parse(msg.header("To") or "")


def _params(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(";"):
        part = part.strip()
        if part:
            key, _, value = part.partition("=")
            out[key.strip().lower()] = value.strip()
    return out


@dataclass(frozen=True)
class CSeq:
    number: int
    method: str

    @classmethod
    def parse(cls, value: str) -> CSeq:
        parts = value.split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) >= 1 << 31:
            raise SipParseError(f"bad CSeq {value!r}")
        return cls(int(parts[0]), parts[1].upper())

    def __str__(self) -> str:
        return f"{self.number} {self.method}"


@dataclass(frozen=True)
class Via:
    transport: str
    host: str
    port: int | None
    params: dict[str, str] = field(default_factory=dict)

    @property
    def branch(self) -> str:
        return self.params.get("branch", "")

    @classmethod
    def parse(cls, value: str) -> Via:
        proto, _, rest = value.strip().partition(" ")
        bits = proto.split("/")
        if len(bits) != 3 or bits[0].upper() != "SIP" or not rest.strip():
            raise SipParseError(f"bad Via {value[:60]!r}")
        sent_by, _, params = rest.strip().partition(";")
        host, port = _host_port(sent_by.strip())
        return cls(bits[2].upper(), host, port, _params(params))


def _host_port(text: str) -> tuple[str, int | None]:
    if text.startswith("["):  # IPv6 reference
        end = text.find("]")
        if end < 0:
            raise SipParseError(f"bad host {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise SipParseError(f"bad host {text!r}")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise SipParseError(f"bad port in {text!r}")
        return host, int(port_text)
    return host, None


@dataclass(frozen=True)
class SipUri:
    """The parts of a ``sip:`` URI a UAS routes on (user@host:port;params)."""

    user: str
    host: str
    port: int | None
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> SipUri:
        text = text.strip()
        scheme, colon, rest = text.partition(":")
        if not colon or scheme.lower() not in ("sip", "sips"):
            raise SipParseError(f"not a SIP URI: {text[:60]!r}")
        rest = rest.split("?", 1)[0]
        user, at, hostpart = rest.rpartition("@")
        if not at:
            user, hostpart = "", rest
        hp, _, params = hostpart.partition(";")
        host, port = _host_port(hp)
        return cls(user, host, port, _params(params))


@dataclass(frozen=True)
class NameAddr:
    """``"Name" <uri>;tag=...`` (From, To, Contact, Route): the URI and the parameters."""

    uri: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    @classmethod
    def parse(cls, value: str) -> NameAddr:
        value = value.strip()
        if "<" in value:
            start, end = value.find("<"), value.find(">")
            if end < start:
                raise SipParseError(f"bad name-addr {value[:60]!r}")
            return cls(value[start + 1 : end], _params(value[end + 1 :]))
        uri, _, params = value.partition(";")  # addr-spec: parameters belong to the header
        if not uri:
            raise SipParseError(f"bad name-addr {value[:60]!r}")
        return cls(uri.strip(), _params(params))


def with_tag(value: str, tag: str) -> str:
    """A From/To value with ``;tag=`` added (unless it has one)."""
    if NameAddr.parse(value).tag is not None:
        return value
    return f"{value};tag={tag}"


def response_to(
    request: SipRequest,
    status: int,
    reason: str,
    *,
    to_tag: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes = b"",
) -> SipResponse:
    """A response to ``request`` (§8.2.6.2): Via (all, in order), From, Call-ID, CSeq copied;
    To copied with ``to_tag`` added unless it has a tag already."""
    out: list[tuple[str, str]] = [("Via", v) for v in request.header_all("Via")]
    to = request.header("To") or ""
    if to_tag is not None:
        to = with_tag(to, to_tag)
    out += [
        ("From", request.header("From") or ""), ("To", to),
        ("Call-ID", request.call_id), ("CSeq", request.header("CSeq") or ""),
    ]
    out.extend(headers)
    return SipResponse(tuple(out), body, status, reason)
