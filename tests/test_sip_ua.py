"""The sans-I/O SIP layer with plain function calls: messages, SDP offer/answer, the UAS state
machine with time as an argument (RFC 3261 timers G/H/E), RFC 4733 DTMF."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tts_stream.errors import ProtocolViolation
from tts_stream.telephony.dtmf import DtmfDetector, TelephoneEvent
from tts_stream.telephony.sdp import NoCommonCodec, answer, parse_offer
from tts_stream.telephony.sip import NameAddr, SipRequest, SipResponse, parse
from tts_stream.telephony.ua import (
    T1,
    T2,
    CallConfirmed,
    CallEnded,
    IncomingCall,
    MediaChanged,
    Send,
    UserAgent,
)

SRC = ("127.0.0.1", 5070)


def sdp(port: int = 6000, pts: str = "0 8 101", extra: str = "") -> str:
    return (
        "v=0\r\no=u 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP {pts}\r\na=rtpmap:101 telephone-event/8000\r\n"
        f"a=fmtp:101 0-15\r\na=ptime:20\r\n{extra}"
    )


def request(
    method: str, *, branch: str = "z9hG4bK1", cseq: int = 1, to_tag: str = "",
    body: str = "", call_id: str = "c1", cseq_method: str | None = None,
) -> bytes:
    to = "<sip:ivr@127.0.0.1>" + (f";tag={to_tag}" if to_tag else "")
    lines = [
        f"{method} sip:ivr@127.0.0.1 SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:5070;branch={branch};rport",
        "From: sipp <sip:sipp@127.0.0.1:5070>;tag=abc", f"To: {to}", f"Call-ID: {call_id}",
        f"CSeq: {cseq} {cseq_method or method}", "Contact: <sip:sipp@127.0.0.1:5070>",
        "Max-Forwards: 70",
    ]
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def responses(out: Sequence[object]) -> list[SipResponse]:
    got = []
    for o in out:
        if isinstance(o, Send):
            m = parse(o.data)
            if isinstance(m, SipResponse):
                got.append(m)
    return got


def answered(ua: UserAgent, now: float = 0.0) -> tuple[str, SipResponse]:
    out = ua.receive(request("INVITE", body=sdp()), SRC, now)
    assert [r.status for r in responses(out)] == [100]
    call = next(o for o in out if isinstance(o, IncomingCall))
    ok = responses(ua.answer(call.call_id, "127.0.0.1", 7000, now))
    assert [r.status for r in ok] == [200]
    return call.call_id, ok[0]


def test_message_round_trip_and_compact_headers() -> None:
    data = (b"OPTIONS sip:a@b SIP/2.0\r\nv: SIP/2.0/UDP h:1;branch=z9hG4bKx\r\nf: <sip:x@y>;tag=1"
            b"\r\nt: <sip:a@b>\r\ni: id\r\nCSeq: 3 OPTIONS\r\nl: 0\r\n\r\n")  # fmt: skip
    msg = parse(data)
    assert isinstance(msg, SipRequest) and msg.call_id == "id" and msg.cseq.number == 3
    assert msg.via.branch == "z9hG4bKx" and NameAddr.parse(msg.header("From") or "").tag == "1"
    assert parse(msg.serialize()) == msg


@pytest.mark.parametrize("data", [
    b"", b"INVITE sip:a SIP/2.0\r\nVia: x\r\n", b"garbage\r\n\r\n",
    request("INVITE").replace(b"CSeq: 1", b"CSeq: x"),
    request("INVITE", body="v=0").replace(b"Content-Length: 3", b"Content-Length: 99"),
])  # fmt: skip
def test_malformed_messages_raise_protocol_violation(data: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        parse(data)


@given(st.binary(max_size=600))
def test_the_agent_never_crashes_on_random_bytes(data: bytes) -> None:
    ua = UserAgent(contact=("127.0.0.1", 5060))
    for o in ua.receive(data, SRC, 0.0):
        assert isinstance(o, Send)
    ua.on_timer(100.0)


@given(st.integers(0, 400))
def test_the_agent_never_crashes_on_truncated_invites(cut: int) -> None:
    ua = UserAgent(contact=("127.0.0.1", 5060))
    ua.receive(request("INVITE", body=sdp())[:cut], SRC, 0.0)


def test_sdp_answer_follows_the_offer_order_and_keeps_telephone_event() -> None:
    plan = answer(parse_offer(sdp(pts="8 0 101").encode()))
    assert plan.codec.encoding == "PCMA" and plan.telephone_event is not None
    assert plan.remote_port == 6000 and plan.ptime_ms == 20
    text = plan.with_local("127.0.0.1", 7000, 1).sdp().decode()
    assert "m=audio 7000 RTP/AVP 8 101" in text and "a=rtpmap:101 telephone-event/8000" in text
    l16 = answer(parse_offer(sdp(pts="96", extra="a=rtpmap:96 L16/8000\r\n").encode()))
    assert l16.codec.encoding == "L16"
    with pytest.raises(NoCommonCodec):
        answer(parse_offer(sdp(pts="18", extra="a=rtpmap:18 G729/8000\r\n").encode()))


def test_invite_answer_retransmits_200_until_ack() -> None:
    ua = UserAgent(contact=("127.0.0.1", 5060))
    call_id, ok = answered(ua)
    assert ok.header("To") and NameAddr.parse(ok.header("To") or "").tag
    assert ok.header("Via") == "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1;rport=5070"
    assert ok.header("CSeq") == "1 INVITE" and b"m=audio 7000" in ok.body
    # timer G: T1, 2*T1, 4*T1 ... capped at T2
    times, now = [], 0.0
    for _ in range(5):
        deadline = ua.next_deadline()
        assert deadline is not None
        now = deadline
        assert [r.status for r in responses(ua.on_timer(now))] == [200]
        times.append(now)
    gaps = [round(b - a, 3) for a, b in zip([0.0, *times], times, strict=False)]
    assert gaps == [T1, 2 * T1, 4 * T1, T2, T2]
    tag = NameAddr.parse(ok.header("To") or "").tag or ""
    out = ua.receive(request("ACK", branch="z9hG4bK2", to_tag=tag), SRC, now)
    assert out == [CallConfirmed(call_id)]
    assert ua.on_timer(now + 60) == []  # no more retransmissions
    out = ua.receive(request("BYE", branch="z9hG4bK3", cseq=2, to_tag=tag), SRC, now + 61)
    assert [r.status for r in responses(out)] == [200] and CallEnded(call_id, "bye") in out
    # a retransmitted BYE gets the same 200 again; another BYE: 481
    again = ua.receive(request("BYE", branch="z9hG4bK3", cseq=2, to_tag=tag), SRC, now + 61)
    assert [r.status for r in responses(again)] == [200]
    other = ua.receive(request("BYE", branch="z9hG4bK4", cseq=3, to_tag=tag), SRC, now + 61)
    assert [r.status for r in responses(other)] == [481]


def test_no_ack_gives_up_after_timer_h_with_a_bye() -> None:
    ua = UserAgent(contact=("127.0.0.1", 5060))
    call_id, _ = answered(ua)
    out: list[object] = []
    while (deadline := ua.next_deadline()) is not None and deadline <= 64 * T1:
        out += ua.on_timer(deadline)
    sent = [parse(o.data) for o in out if isinstance(o, Send)]
    assert any(isinstance(m, SipRequest) and m.method == "BYE" for m in sent)
    assert CallEnded(call_id, "no ack") in out


def test_retransmitted_invite_gets_the_last_response() -> None:
    ua = UserAgent(contact=("127.0.0.1", 5060))
    out = ua.receive(request("INVITE", body=sdp()), SRC, 0.0)
    again = ua.receive(request("INVITE", body=sdp()), SRC, 0.1)
    assert [r.status for r in responses(again)] == [100]
    assert sum(isinstance(o, IncomingCall) for o in out + again) == 1


def test_cancel_pending_invite() -> None:
    ua = UserAgent(contact=("127.0.0.1", 5060))
    out = ua.receive(request("INVITE", body=sdp()), SRC, 0.0)
    call_id = next(o for o in out if isinstance(o, IncomingCall)).call_id
    out = ua.receive(request("CANCEL"), SRC, 0.1)
    assert [r.status for r in responses(out)] == [200, 487]
    assert CallEnded(call_id, "cancel") in out
    assert ua.answer(call_id, "127.0.0.1", 7000, 0.2) == []
    assert responses(ua.receive(request("CANCEL", branch="z9hG4bKzz"), SRC, 0.3))[0].status == 481


def test_reinvite_answered_with_current_media_and_options() -> None:
    ua = UserAgent(contact=("127.0.0.1", 5060))
    call_id, ok = answered(ua)
    tag = NameAddr.parse(ok.header("To") or "").tag or ""
    ua.receive(request("ACK", branch="z9hG4bK2", to_tag=tag), SRC, 0.1)
    out = ua.receive(request("INVITE", branch="z9hG4bK5", cseq=2, to_tag=tag,
                             body=sdp(port=6100)), SRC, 1.0)  # fmt: skip
    ok2 = responses(out)[0]
    assert ok2.status == 200 and b"m=audio 7000" in ok2.body
    changed = next(o for o in out if isinstance(o, MediaChanged))
    assert changed.plan.remote_port == 6100
    assert changed.source == SRC  # where the re-INVITE came from (media follows signalling)
    opts = responses(ua.receive(request("OPTIONS", branch="z9hG4bK6"), SRC, 1.0))[0]
    assert opts.status == 200 and "INVITE" in (opts.header("Allow") or "")
    low = ua.receive(request("INFO", branch="z9hG4bK7", cseq=1, to_tag=tag), SRC, 1.0)
    assert responses(low)[0].status == 500  # CSeq went backwards
    assert responses(ua.receive(request("REGISTER", branch="z9hG4bK8"), SRC, 1.0))[0].status == 405
    assert ua.hangup(call_id, 2.0)[-1] == CallEnded(call_id, "hangup")


def test_no_common_codec_is_488() -> None:
    ua = UserAgent(contact=("127.0.0.1", 5060))
    bad = sdp(pts="18", extra="a=rtpmap:18 G729/8000\r\n")
    out = ua.receive(request("INVITE", body=bad), SRC, 0.0)
    assert [r.status for r in responses(out)] == [488]
    assert not any(isinstance(o, IncomingCall) for o in out)


def test_dtmf_detector_reports_each_press_once() -> None:
    det = DtmfDetector()
    got = []
    for ts, end, dur in [(100, False, 160), (100, False, 320), (100, True, 480), (100, True, 480),
                         (900, False, 160), (900, True, 320)]:  # fmt: skip
        ev = det.feed(TelephoneEvent(11, end, 10, dur).serialize(), ts)
        if ev:
            got.append(ev.digit)
    assert got == ["#", "#"]
    assert TelephoneEvent.parse(TelephoneEvent(5, True, 7, 800).serialize()).event == 5
