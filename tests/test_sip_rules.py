"""The rules of the SDP reader, the SIP parser and the agent's request dispatch, one each.

Plain calls (pure modules). They pin the paths that ``test_sip_ua.py`` and the sipp and
baresip tests cross only in passing: SDP session-level lines, a second audio section, SIP
framing tolerances, and the agent's answers to requests outside a dialog.
"""

from __future__ import annotations

import pytest

from tests.test_sip_ua import SRC, request, responses, sdp
from tts_stream.errors import ProtocolViolation
from tts_stream.telephony.sdp import PayloadFormat, parse_offer
from tts_stream.telephony.sip import SipParseError, SipRequest, parse
from tts_stream.telephony.ua import UserAgent

SESSION = "v=0\r\no=u 7 9 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n"

# --- SDP -------------------------------------------------------------------------------------


def test_session_lines_apply_unless_the_audio_section_says_otherwise() -> None:
    offer = parse_offer(f"{SESSION}a=ptime:30\r\na=sendonly\r\nm=audio 4000 RTP/AVP 8\r\n".encode())
    assert (offer.host, offer.port, offer.ptime_ms, offer.direction) == (
        "10.0.0.1", 4000, 30, "sendonly")  # fmt: skip
    assert (offer.session_id, offer.version) == ("7", 9)
    assert offer.formats == (PayloadFormat(8, "PCMA", 8000),)  # static type, no rtpmap
    own = parse_offer(f"{SESSION}m=audio 4000 RTP/AVP 0\r\nc=IN IP4 10.0.0.2/127\r\n".encode())
    assert own.host == "10.0.0.2"  # the section's address, its TTL dropped


def test_only_the_first_audio_section_counts() -> None:
    text = (f"{SESSION}m=audio 4000 RTP/AVP 96\r\na=rtpmap:96 L16/8000\r\n"
            "m=audio 5000 RTP/AVP 97\r\na=rtpmap:97 PCMU/8000\r\na=ptime:40\r\n"
            "c=IN IP4 10.0.0.3\r\n")  # fmt: skip
    offer = parse_offer(text.encode())
    assert (offer.host, offer.port, offer.ptime_ms) == ("10.0.0.1", 4000, None)
    assert offer.formats == (PayloadFormat(96, "L16", 8000),)


@pytest.mark.parametrize(("text", "why"), [
    (f"{SESSION}m=audio x RTP/AVP 0\r\n", "bad SDP media port"),
    (f"{SESSION}m=audio 4000 UDP/TLS/RTP/SAVP 0\r\n", "unsupported SDP transport"),
    (SESSION, "no m=audio line"),
    ("v=0\r\nm=audio 4000 RTP/AVP 0\r\n", "no connection address"),
    (f"{SESSION}m=audio 4000 RTP/AVP 0\r\nm=video 5000 RTP/AVP 96\r\nc=IN\r\n",
     "bad SDP connection line"),  # checked even in a section we skip
])  # fmt: skip
def test_bad_offers_say_why(text: str, why: str) -> None:
    with pytest.raises(ProtocolViolation, match=why):
        parse_offer(text.encode())


# --- SIP framing -----------------------------------------------------------------------------


def test_bare_lf_leading_blank_lines_and_folded_headers_are_tolerated() -> None:
    crlf = request("OPTIONS")
    lf = crlf.replace(b"\r\n", b"\n").replace(b"sipp <sip:", b"sipp\n\t<sip:")
    a, b = parse(crlf), parse(lf)
    assert isinstance(b, SipRequest)
    assert b.header("From") == "sipp <sip:sipp@127.0.0.1:5070>;tag=abc"
    assert a == b == parse(b"\r\n" + crlf)  # an empty line before the start line


def test_the_body_is_cut_at_content_length() -> None:
    msg = parse(request("INVITE", body=sdp()) + b"trailing garbage")
    assert msg.body == sdp().encode()


@pytest.mark.parametrize(("data", "why"), [
    (b"x" * 70000, "too long"),
    (request("OPTIONS").replace(b"Call-ID: c1\r\n", b""), "without Call-ID"),
    (request("OPTIONS").replace(b"Content-Length: 0", b"Content-Length: x"), "Content-Length"),
    (request("OPTIONS").replace(b"Max-Forwards: 70", b"Max Forwards 70"), "bad SIP header"),
    (request("OPTIONS").replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1), "bad SIP start line"),
    (b"\r\n\r\n", "empty SIP message"),
])  # fmt: skip
def test_bad_messages_say_why(data: bytes, why: str) -> None:
    with pytest.raises(SipParseError, match=why):
        parse(data)


# --- the agent's answers outside a dialog ----------------------------------------------------


@pytest.mark.parametrize(("data", "status"), [
    (request("OPTIONS", cseq_method="INVITE"), 400),  # CSeq names another method
    (request("BYE"), 481),  # no dialog to end
    (request("BYE", to_tag="nope"), 481),  # a dialog we do not have
    (request("INFO"), 405),  # known, not allowed here
    (request("FROBNICATE"), 501),
    (request("OPTIONS"), 200),
])  # fmt: skip
def test_requests_outside_a_dialog(data: bytes, status: int) -> None:
    ua = UserAgent(contact=("127.0.0.1", 5060))
    (resp,) = responses(ua.receive(data, SRC, 0.0))
    assert resp.status == status
    if status in (405, 501, 200):
        assert resp.header("Allow") == "INVITE, ACK, CANCEL, BYE, OPTIONS"


def test_a_retransmitted_request_gets_the_same_answer() -> None:
    ua = UserAgent(contact=("127.0.0.1", 5060))
    first = ua.receive(request("OPTIONS"), SRC, 0.0)
    assert ua.receive(request("OPTIONS"), SRC, 1.0) == first  # same bytes, same address
    assert ua.receive(request("OPTIONS", branch="z9hG4bK2"), SRC, 1.0) != first  # a new one
