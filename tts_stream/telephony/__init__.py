"""Telephony: answer SIP calls and speak on them with a cloned voice.

Layers, pure first: :mod:`.sip` (messages), :mod:`.sdp` (offer/answer), :mod:`.ua` (the UAS
state machine: datagrams and time in, datagrams and call events out), :mod:`.dtmf`
(RFC 4733 events); then I/O: :mod:`.media` (a call's RTP socket: the caller's audio decoded,
DTMF, our RTP sent from the same port), :mod:`.agent` (the asyncio UDP transport for SIP and
the :class:`Call` object). Uses the public API of the engine and the sinks only; the engine
never imports this package.
"""

from __future__ import annotations

from .agent import Call, CallRecord, SipAgent
from .media import CallMedia, MediaStats

__all__ = ["Call", "CallMedia", "CallRecord", "MediaStats", "SipAgent"]
