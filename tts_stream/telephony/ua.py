"""A SIP user agent server as a sans-I/O state machine (RFC 3261 §8.2, §12, §13.3, §15, §17.2).

Datagrams and time go in, datagrams to send and call events come out::

    ua = UserAgent(contact=("127.0.0.1", 5060))
    out = ua.receive(data, addr, now)        # -> [Send | IncomingCall | CallConfirmed | ...]
    out = ua.answer(call_id, host, port, now)  # our 200 OK with the SDP answer
    out = ua.on_timer(now)                   # retransmissions and time-outs due by now
    ua.next_deadline()                       # when to call on_timer next

What it does, by the RFC: INVITE → 100 Trying → (the application answers) 200 OK with the SDP
answer, retransmitted with timer G's doubling (T1..T2) until the ACK, given up after timer H
(64·T1) with a BYE (§13.3.1.4); retransmitted requests get the same response again (server
transactions, §17.2); CANCEL of a pending INVITE → 200 to the CANCEL and 487 to the INVITE
(§9.2); BYE → 200 and the call ends (§15.1.2); re-INVITE → 200 with the current media
(RFC 3264 §8); OPTIONS → 200 with Allow/Accept (§11.2); in-dialog requests that match no dialog
→ 481 (§12.2.2); no common codec → 488 (§13.3.1); lower CSeq in a dialog → 500 (§12.2.2);
malformed requests → 400 when there is enough to answer, otherwise dropped (§8.2 / §16.3).
Responses go back to the address the request came from, with ``received``/``rport`` set on the
top Via (RFC 3581). Our BYE is a non-INVITE client transaction (timers E and F, §17.1.2).
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from tts_stream.errors import ProtocolViolation

from .sdp import MediaPlan, NoCommonCodec, answer, our_offer, parse_offer
from .sip import (
    MAGIC_COOKIE,
    NameAddr,
    SipParseError,
    SipRequest,
    SipResponse,
    SipUri,
    Via,
    _canonical,
    parse,
    response_to,
    with_tag,
)

__all__ = [
    "T1",
    "T2",
    "CallConfirmed",
    "CallEnded",
    "IncomingCall",
    "MediaChanged",
    "Output",
    "Send",
    "UserAgent",
]

log = logging.getLogger(__name__)

T1 = 0.5  # §17.1.1.1 RTT estimate
T2 = 4.0  # maximum retransmit interval of non-INVITE requests and INVITE responses
T4 = 5.0  # maximum time a message stays in the network
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS"
_KNOWN = {"REGISTER", "PRACK", "UPDATE", "INFO", "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE",
          "PUBLISH"}  # fmt: skip


@dataclass(frozen=True)
class Send:
    data: bytes
    addr: tuple[str, int]


@dataclass(frozen=True)
class IncomingCall:
    """A new INVITE was accepted for negotiation: answer it or reject it."""

    call_id: str
    plan: MediaPlan  # remote_host/port empty when the INVITE had no SDP (we offer)
    caller: str  # From
    callee: str  # To (the Request-URI's user is in ``uri``)
    uri: str
    source: tuple[str, int]


@dataclass(frozen=True)
class CallConfirmed:
    call_id: str  # the ACK of our 200 arrived


@dataclass(frozen=True)
class MediaChanged:
    call_id: str
    plan: MediaPlan  # from a re-INVITE, or from the ACK's answer to our offer
    # where that request came from (its media may follow the signalling: an SDP address the
    # media socket cannot reach is replaced by this host, as for the first INVITE)
    source: tuple[str, int] | None = None


@dataclass(frozen=True)
class CallEnded:
    call_id: str
    reason: str  # "bye", "cancel", "no ack", "hangup", "rejected"


Output = Send | IncomingCall | CallConfirmed | MediaChanged | CallEnded


class _Timer:
    __slots__ = ("active", "fire", "when")

    def __init__(self, when: float, fire: Callable[[float], list[Output]]) -> None:
        self.when, self.fire, self.active = when, fire, True


@dataclass
class _Dialog:
    call_id: str
    local_tag: str
    remote_tag: str
    local_uri: str  # our To header value, with our tag
    remote_uri: str  # their From header value, with their tag
    target: str  # their Contact URI (remote target)
    route: list[str]
    source: tuple[str, int]
    invite: SipRequest
    plan: MediaPlan
    remote_cseq: int
    local_cseq: int = field(default_factory=lambda: secrets.randbelow(1 << 16) + 1)
    answered: bool = False
    confirmed: bool = False
    ended: bool = False
    offered: bool = False  # the INVITE had no SDP: our 200 carries the offer
    ok: bytes = b""  # the 2xx being retransmitted until the ACK
    ok_cseq: int = 0
    retransmit: _Handle | None = None


@dataclass
class _InviteTx:
    request: SipRequest
    source: tuple[str, int]
    dialog: _Dialog | None
    last: bytes = b""  # the last response sent (resent when the INVITE is retransmitted)
    final: int = 0  # status of the final response, 0 while proceeding
    timer: _Handle | None = None


class UserAgent:
    """The UAS core and its transactions; see the module docstring.

    ``contact`` is the (host, port) we advertise in Contact and Via; ``codecs`` our
    preference when several are offered (the offerer's order wins, RFC 3264 §6.1).
    """

    def __init__(
        self,
        *,
        contact: tuple[str, int],
        codecs: tuple[str, ...] = ("PCMU", "PCMA", "L16"),
        user: str = "tts-stream",
        server: str = "tts-stream",
    ) -> None:
        self.contact = contact
        self.codecs = codecs
        self._user = user
        self._server = server
        self._dialogs: dict[str, _Dialog] = {}  # call-id -> dialog (one per call we serve)
        self._invites: dict[str, _InviteTx] = {}  # INVITE branch -> server transaction
        self._done: dict[tuple[str, str], tuple[bytes, tuple[str, int], float]] = {}
        self._client: dict[str, _Handle] = {}  # our BYE's branch -> its retransmit timer
        self._heap: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()

    # -- public ------------------------------------------------------------------------------

    @property
    def calls(self) -> int:
        """Dialogs alive (answered or pending)."""
        return sum(not d.ended for d in self._dialogs.values())

    def receive(self, data: bytes, addr: tuple[str, int], now: float) -> list[Output]:
        """Handle one datagram from ``addr``; never raises on bad input."""
        if not data.strip():
            return []  # keep-alive (RFC 5626 §4.4.1 CRLF)
        try:
            msg = parse(data)
        except SipParseError as exc:
            return self._bad_request(data, addr, str(exc))
        try:
            if isinstance(msg, SipResponse):
                return self._response(msg)
            return self._request(msg, addr, now)
        except ProtocolViolation as exc:  # a header we read later is malformed
            if isinstance(msg, SipRequest) and msg.method != "ACK":
                return self._reply(msg, addr, now, 400, "Bad Request", warning=str(exc))
            return []

    def answer(self, call_id: str, host: str, port: int, now: float) -> list[Output]:
        """Send our 200 OK with SDP (media at ``host:port``); no-op if the call is gone."""
        d = self._dialogs.get(call_id)
        if d is None or d.ended or d.answered:
            return []
        tx = self._invites.get(d.invite.via.branch)
        d.plan = d.plan.with_local(host, port, secrets.randbits(31))
        d.answered = True
        out = self._send_ok(d, d.invite, now)
        if tx is not None:
            tx.final, tx.last = 200, d.ok
        return out

    def ring(self, call_id: str) -> list[Output]:
        """Send 180 Ringing for a pending call (resent if the INVITE is retransmitted)."""
        d = self._dialogs.get(call_id)
        tx = None if d is None else self._invites.get(d.invite.via.branch)
        if d is None or d.ended or d.answered or tx is None:
            return []
        ringing = response_to(d.invite, 180, "Ringing", to_tag=d.local_tag, headers=(
            *self._common(), ("Contact", self._contact())))  # fmt: skip
        tx.last = self._fix_via(ringing, tx.source).serialize()
        return [Send(tx.last, tx.source)]

    def reject(self, call_id: str, status: int, reason: str, now: float) -> list[Output]:
        """Answer a pending INVITE with a final error response."""
        d = self._dialogs.get(call_id)
        if d is None or d.ended or d.answered:
            return []
        d.ended = True
        tx = self._invites.get(d.invite.via.branch)
        out: list[Output] = [CallEnded(call_id, "rejected")]
        if tx is not None:
            out += self._final_error(tx, status, reason, now, d.local_tag)
        return out

    def hangup(self, call_id: str, now: float) -> list[Output]:
        """End the call from our side: BYE once answered (§15), 480 while still pending."""
        d = self._dialogs.get(call_id)
        if d is None or d.ended:
            return []
        if not d.answered:
            return self.reject(call_id, 480, "Temporarily Unavailable", now)
        return [*self._bye(d, now), CallEnded(call_id, "hangup")]

    def plan(self, call_id: str) -> MediaPlan | None:
        d = self._dialogs.get(call_id)
        return None if d is None else d.plan

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and not heap[0][2].active:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def on_timer(self, now: float) -> list[Output]:
        out: list[Output] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, timer = heapq.heappop(heap)
            if timer.active:
                timer.active = False
                out += timer.fire(now)
        for key in [k for k, v in self._done.items() if v[2] <= now]:
            del self._done[key]  # timer J (§17.2.2): retransmissions absorbed long enough
        return out

    # -- timers ------------------------------------------------------------------------------

    def _timer(self, when: float, fire: Callable[[float], list[Output]]) -> _Timer:
        t = _Timer(when, fire)
        heapq.heappush(self._heap, (when, next(self._seq), t))
        return t

    def _retransmit(
        self, data: bytes, addr: tuple[str, int], now: float,
        give_up: Callable[[float], list[Output]],
    ) -> _Handle:
        """Send ``data`` again at T1, 2·T1, 4·T1 ... capped at T2; ``give_up`` at 64·T1."""
        deadline = now + 64 * T1
        holder: list[_Timer] = []

        def fire(t: float, interval: float) -> list[Output]:
            if t >= deadline:
                return give_up(t)
            nxt = min(2 * interval, T2)
            holder[0] = self._timer(min(t + nxt, deadline), lambda t2: fire(t2, nxt))
            return [Send(data, addr)]

        first = self._timer(now + T1, lambda t: fire(t, T1))
        holder.append(first)
        return _Handle(holder)

    # -- requests ----------------------------------------------------------------------------

    def _request(self, req: SipRequest, addr: tuple[str, int], now: float) -> list[Output]:
        method = req.method
        if req.cseq.method != method:
            return self._reply(req, addr, now, 400, "Bad Request", warning="CSeq method differs")
        if method == "ACK":
            return self._ack(req, addr, now)
        if method == "CANCEL":
            return self._cancel(req, addr, now)
        again = self._retransmission(req)
        if again is not None:
            return again
        dialog, refused = self._dialog_of(req, addr, now)
        if refused is not None:
            return refused
        return self._by_method(req, addr, dialog, now)

    def _retransmission(self, req: SipRequest) -> list[Output] | None:
        """A request seen before gets its transaction's last response again (§17.2); else None."""
        if req.method == "INVITE":
            tx = self._invites.get(req.via.branch)
            if tx is None:
                return None
            return [Send(tx.last, tx.source)] if tx.last else []
        done = self._done.get((req.via.branch, req.method))
        return None if done is None else [Send(done[0], done[1])]

    def _dialog_of(
        self, req: SipRequest, addr: tuple[str, int], now: float
    ) -> tuple[_Dialog | None, list[Output] | None]:
        """The dialog of a request whose To has a tag, its CSeq checked (§12.2.2).

        Returns ``(dialog, None)`` (``dialog`` is None outside a dialog) or ``(None, reply)``
        when the request is refused: an unknown dialog or a CSeq that did not grow.
        """
        if not NameAddr.parse(req.header("To") or "").tag:
            return None, None
        dialog = self._match(req)
        if dialog is None:
            return None, self._reply(req, addr, now, 481, "Call/Transaction Does Not Exist")
        if req.cseq.number <= dialog.remote_cseq:
            return None, self._reply(req, addr, now, 500, "Server Internal Error",
                                     warning="CSeq lower than the last one")  # fmt: skip
        dialog.remote_cseq = req.cseq.number
        return dialog, None

    def _by_method(
        self, req: SipRequest, addr: tuple[str, int], dialog: _Dialog | None, now: float
    ) -> list[Output]:
        """A new request (not ACK or CANCEL, not a retransmission), by its method."""
        method = req.method
        if method == "INVITE":
            if dialog is None:
                return self._invite(req, addr, now)
            return self._reinvite(req, addr, dialog, now)
        if method == "BYE":
            return self._their_bye(req, addr, dialog, now)
        if method == "OPTIONS":
            return self._reply(req, addr, now, 200, "OK", headers=(
                ("Allow", ALLOW), ("Accept", "application/sdp"),
                ("Contact", self._contact()),
            ))  # fmt: skip
        if method in _KNOWN:
            return self._reply(req, addr, now, 405, "Method Not Allowed",
                               headers=(("Allow", ALLOW),))  # fmt: skip
        return self._reply(req, addr, now, 501, "Not Implemented", headers=(("Allow", ALLOW),))

    def _their_bye(
        self, req: SipRequest, addr: tuple[str, int], dialog: _Dialog | None, now: float
    ) -> list[Output]:
        """BYE ends the dialog it names (§15.1.2); outside a dialog it is 481."""
        if dialog is None:
            return self._reply(req, addr, now, 481, "Call/Transaction Does Not Exist")
        return self._reply(req, addr, now, 200, "OK") + self._end(dialog, "bye")

    def _invite(self, req: SipRequest, addr: tuple[str, int], now: float) -> list[Output]:
        call_id = req.call_id
        if call_id in self._dialogs:  # a second INVITE of a call we have, on a new branch
            return self._reply(req, addr, now, 482, "Loop Detected")
        local_tag = secrets.token_hex(6)
        tx = _InviteTx(req, addr, None)
        self._invites[req.via.branch] = tx
        offered = not req.body
        try:
            if offered:
                plan = our_offer("0.0.0.0", 0, 0)
            else:
                ctype = (req.header("Content-Type") or "").split(";")[0].strip().lower()
                if ctype != "application/sdp":
                    return self._final_error(tx, 415, "Unsupported Media Type", now, local_tag,
                                             headers=(("Accept", "application/sdp"),))  # fmt: skip
                plan = answer(parse_offer(req.body), codecs=self.codecs)
        except NoCommonCodec as exc:
            return self._final_error(tx, 488, "Not Acceptable Here", now, local_tag,
                                     warning=str(exc), code=305)  # fmt: skip
        except ProtocolViolation as exc:
            return self._final_error(tx, 488, "Not Acceptable Here", now, local_tag,
                                     warning=f"bad SDP: {exc}", code=306)  # fmt: skip
        contact = req.header("Contact")
        target = NameAddr.parse(contact).uri if contact else NameAddr.parse(
            req.header("From") or "").uri
        d = _Dialog(
            call_id=call_id, local_tag=local_tag,
            remote_tag=NameAddr.parse(req.header("From") or "").tag or "",
            local_uri=with_tag(req.header("To") or "", local_tag),
            remote_uri=req.header("From") or "", target=target,
            route=req.header_all("Record-Route"), source=addr, invite=req, plan=plan,
            remote_cseq=req.cseq.number, offered=offered,
        )
        tx.dialog = d
        self._dialogs[call_id] = d
        trying = response_to(req, 100, "Trying", headers=self._common())
        tx.last = self._fix_via(trying, addr).serialize()
        return [
            Send(tx.last, addr),
            IncomingCall(call_id, plan, req.header("From") or "", req.header("To") or "",
                         req.uri, addr),  # fmt: skip
        ]

    def _reinvite(
        self, req: SipRequest, addr: tuple[str, int], d: _Dialog, now: float
    ) -> list[Output]:
        tx = _InviteTx(req, addr, d)
        self._invites[req.via.branch] = tx
        out: list[Output] = []
        if req.body:
            try:
                new = answer(parse_offer(req.body), codecs=(d.plan.codec.encoding, *self.codecs))
            except NoCommonCodec as exc:
                return self._final_error(tx, 488, "Not Acceptable Here", now, d.local_tag,
                                         warning=str(exc), code=305)  # fmt: skip
            except ProtocolViolation as exc:
                return self._final_error(tx, 488, "Not Acceptable Here", now, d.local_tag,
                                         warning=f"bad SDP: {exc}", code=306)  # fmt: skip
            changed = (new.remote_host, new.remote_port, new.codec, new.direction) != (
                d.plan.remote_host, d.plan.remote_port, d.plan.codec, d.plan.direction)
            if changed:
                d.plan = replace(new, local_host=d.plan.local_host,
                                 local_port=d.plan.local_port, session_id=d.plan.session_id,
                                 version=d.plan.version + 1)  # fmt: skip
                out.append(MediaChanged(d.call_id, d.plan, addr))
        out[:0] = self._send_ok(d, req, now)
        tx.final, tx.last = 200, d.ok
        return out

    def _send_ok(self, d: _Dialog, req: SipRequest, now: float) -> list[Output]:
        if d.retransmit is not None:
            d.retransmit.active = False
        ok = response_to(req, 200, "OK", to_tag=d.local_tag, headers=(
            *self._common(), ("Contact", self._contact()), ("Allow", ALLOW),
            *(("Record-Route", r) for r in d.route),
            ("Content-Type", "application/sdp"),
        ), body=d.plan.sdp())  # fmt: skip
        d.ok, d.ok_cseq = self._fix_via(ok, d.source).serialize(), req.cseq.number

        def no_ack(t: float) -> list[Output]:
            if d.ended or d.confirmed and req is d.invite:
                return []
            log.info("SIP: no ACK for call %s: hanging up (RFC 3261 §13.3.1.4)", d.call_id)
            return [*self._bye(d, t), CallEnded(d.call_id, "no ack")]

        d.retransmit = self._retransmit(d.ok, d.source, now, no_ack)
        return [Send(d.ok, d.source)]

    def _ack(self, req: SipRequest, addr: tuple[str, int], now: float) -> list[Output]:
        tx = self._invites.get(req.via.branch)
        if tx is not None and tx.final >= 300:  # ACK of our error response (§17.2.1)
            if tx.timer is not None:
                tx.timer.active = False
            self._timer(now + T4, lambda t: self._forget(req.via.branch))  # timer I
            return []
        d = self._match(req)
        if d is None or d.ended or req.cseq.number != d.ok_cseq:
            return []  # an ACK of nothing we know: dropped (§17.2.3, never answered)
        if d.retransmit is not None:
            d.retransmit.active = False
            d.retransmit = None
        out: list[Output] = []
        if not d.confirmed:
            d.confirmed = True
            out.append(CallConfirmed(d.call_id))
        if d.offered and req.body:  # the answer to the offer in our 200
            d.offered = False
            try:
                ans = parse_offer(req.body)
                plan = answer(ans, codecs=self.codecs)
            except ProtocolViolation as exc:
                log.info("SIP: bad SDP answer in ACK of %s: %s", d.call_id, exc)
                return [*out, *self._bye(d, now), CallEnded(d.call_id, "bad answer")]
            d.plan = replace(plan, local_host=d.plan.local_host, local_port=d.plan.local_port,
                             session_id=d.plan.session_id)  # fmt: skip
            out.append(MediaChanged(d.call_id, d.plan, addr))
        return out

    def _cancel(self, req: SipRequest, addr: tuple[str, int], now: float) -> list[Output]:
        tx = self._invites.get(req.via.branch)
        if tx is None:
            return self._reply(req, addr, now, 481, "Call/Transaction Does Not Exist")
        out = self._reply(req, addr, now, 200, "OK")
        d = tx.dialog
        if tx.final == 0 and d is not None and not d.ended:  # §9.2: still pending
            d.ended = True
            out += self._final_error(tx, 487, "Request Terminated", now, d.local_tag)
            out.append(CallEnded(d.call_id, "cancel"))
        return out

    def _end(self, d: _Dialog, reason: str) -> list[Output]:
        if d.retransmit is not None:
            d.retransmit.active = False
        was_ended, d.ended = d.ended, True
        self._dialogs.pop(d.call_id, None)
        self._invites.pop(d.invite.via.branch, None)
        return [] if was_ended else [CallEnded(d.call_id, reason)]

    def _forget(self, branch: str) -> list[Output]:
        tx = self._invites.pop(branch, None)
        if tx is not None and tx.dialog is not None and tx.dialog.ended:
            self._dialogs.pop(tx.dialog.call_id, None)
        return []

    # -- our BYE -----------------------------------------------------------------------------

    def _bye(self, d: _Dialog, now: float) -> list[Output]:
        if d.retransmit is not None:
            d.retransmit.active = False
        d.ended = True
        self._dialogs.pop(d.call_id, None)
        self._invites.pop(d.invite.via.branch, None)
        d.local_cseq += 1
        branch = MAGIC_COOKIE + secrets.token_hex(8)
        host, port = self.contact
        headers: list[tuple[str, str]] = [
            ("Via", f"SIP/2.0/UDP {_host(host)}:{port};branch={branch};rport"),
            ("Max-Forwards", "70"), ("From", d.local_uri), ("To", d.remote_uri),
            ("Call-ID", d.call_id), ("CSeq", f"{d.local_cseq} BYE"),
            *(("Route", r) for r in d.route), *self._common(),
        ]
        bye = SipRequest(tuple(headers), b"", "BYE", d.target).serialize()
        dest = self._destination(d)

        def give_up(t: float) -> list[Output]:
            self._client.pop(branch, None)
            return []  # timer F: the far end is gone; nothing else to do

        self._client[branch] = self._retransmit(bye, dest, now, give_up)
        return [Send(bye, dest)]

    def _destination(self, d: _Dialog) -> tuple[str, int]:
        """Where an in-dialog request goes (§12.2.1.1, loose routing): the first Route or the
        remote target; their source address when that is not an IP literal (no DNS here)."""
        target = NameAddr.parse(d.route[0]).uri if d.route else d.target
        try:
            uri = SipUri.parse(target)
            ipaddress.ip_address(uri.host)
        except (ProtocolViolation, ValueError):
            return d.source
        return uri.host, uri.port or 5060

    def _response(self, resp: SipResponse) -> list[Output]:
        timer = self._client.get(resp.via.branch)
        if timer is not None and resp.status >= 200:
            timer.active = False
            del self._client[resp.via.branch]
        return []  # responses to anything else are stray: dropped

    # -- helpers -----------------------------------------------------------------------------

    def _match(self, req: SipRequest) -> _Dialog | None:
        """The dialog of an in-dialog request (§12.2.2): Call-ID, To tag = ours, From tag."""
        d = self._dialogs.get(req.call_id)
        if d is None:
            return None
        if NameAddr.parse(req.header("To") or "").tag != d.local_tag:
            return None
        if (NameAddr.parse(req.header("From") or "").tag or "") != d.remote_tag:
            return None
        return d

    def _contact(self) -> str:
        host, port = self.contact
        return f"<sip:{self._user}@{_host(host)}:{port}>"

    def _common(self) -> tuple[tuple[str, str], ...]:
        return (("Server", self._server),)

    def _fix_via(self, resp: SipResponse, addr: tuple[str, int]) -> SipResponse:
        """``received`` and ``rport`` on the top Via (RFC 3261 §18.2.1, RFC 3581 §4)."""
        headers = list(resp.headers)
        for i, (name, value) in enumerate(headers):
            if name == "Via":
                via = Via.parse(value)
                extra = ""
                if via.host != addr[0]:
                    extra += f";received={addr[0]}"
                if "rport" in via.params and not via.params["rport"]:
                    value = value.replace(";rport", f";rport={addr[1]}", 1)
                headers[i] = (name, value + extra)
                break
        return replace(resp, headers=tuple(headers))

    def _reply(
        self,
        req: SipRequest,
        addr: tuple[str, int],
        now: float,
        status: int,
        reason: str,
        *,
        headers: tuple[tuple[str, str], ...] = (),
        warning: str | None = None,
    ) -> list[Output]:
        """A final response to a non-INVITE request, kept to absorb retransmissions."""
        extra = (*self._common(), *headers)
        if warning:
            extra += (("Warning", f'399 tts-stream "{_quote(warning)}"'),)
        tag = None
        if NameAddr.parse(req.header("To") or "").tag is None and status != 100:
            d = self._dialogs.get(req.call_id)
            tag = d.local_tag if d is not None else secrets.token_hex(6)
        resp = self._fix_via(response_to(req, status, reason, to_tag=tag, headers=extra), addr)
        data = resp.serialize()
        if req.method not in ("INVITE", "ACK"):
            self._done[(req.via.branch, req.method)] = (data, addr, now + 64 * T1)
        return [Send(data, addr)]

    def _final_error(
        self,
        tx: _InviteTx,
        status: int,
        reason: str,
        now: float,
        tag: str,
        *,
        headers: tuple[tuple[str, str], ...] = (),
        warning: str | None = None,
        code: int = 399,
    ) -> list[Output]:
        """A 3xx-6xx to an INVITE, retransmitted (timer G) until its ACK (§17.2.1)."""
        extra = (*self._common(), *headers)
        if warning:
            extra += (("Warning", f'{code} tts-stream "{_quote(warning)}"'),)
        resp = response_to(tx.request, status, reason, to_tag=tag, headers=extra)
        tx.last = self._fix_via(resp, tx.source).serialize()
        tx.final = status
        branch = tx.request.via.branch

        def give_up(t: float) -> list[Output]:  # timer H
            return self._forget(branch)

        tx.timer = self._retransmit(tx.last, tx.source, now, give_up)
        return [Send(tx.last, tx.source)]

    def _bad_request(self, data: bytes, addr: tuple[str, int], why: str) -> list[Output]:
        """400 to a malformed request that has a request line and a Via (§8.2, §21.4.1):
        the Via, From, To, Call-ID and CSeq lines are copied as they came."""
        head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
        lines = head.replace("\r\n", "\n").split("\n")
        start = lines[0].split(" ")
        if len(start) != 3 or start[2] != "SIP/2.0" or start[0].upper() == "ACK":
            log.debug("SIP: dropped an unanswerable datagram from %s: %s", addr, why)
            return []  # a response, no request line, or an ACK: never answered
        copied: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            canonical = _canonical(name.strip())
            if colon and canonical in ("Via", "From", "To", "Call-ID", "CSeq"):
                value = value.strip()
                if canonical == "To" and ";tag=" not in value:
                    value += f";tag={secrets.token_hex(6)}"
                copied.append((canonical, value))
        if not any(name == "Via" for name, _ in copied):
            log.debug("SIP: dropped a request without Via from %s: %s", addr, why)
            return []
        log.info("SIP: 400 to %s: %s", addr, why)
        resp = SipResponse((*copied, *self._common(),
                            ("Warning", f'399 tts-stream "{_quote(why)}"')), b"", 400,
                           "Bad Request")  # fmt: skip
        return [Send(resp.serialize(), addr)]


class _Handle:
    """A retransmission chain: cancelling it cancels whichever timer is next."""

    __slots__ = ("_holder",)

    def __init__(self, holder: list[_Timer]) -> None:
        self._holder = holder

    @property
    def active(self) -> bool:
        return self._holder[0].active

    @active.setter
    def active(self, value: bool) -> None:
        self._holder[0].active = value


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', "'")[:200]
