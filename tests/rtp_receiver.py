"""A plain UDP receiver for RTP tests: collects datagrams with their arrival times.

No RTP library on the receiving side: packets are parsed with the sink's own pure
``RtpPacket.parse`` (itself round-trip tested) and decoded with the G.711 tables.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np

from sinks.g711 import alaw_decode, ulaw_decode
from sinks.rtp import RtpPacket
from tts_stream.audio import PCM16

__all__ = ["Arrival", "UdpReceiver", "decode_payloads", "free_udp_port", "unwrap_sequence"]


@dataclass(frozen=True)
class Arrival:
    at: float  # time.monotonic() when the loop read it
    data: bytes
    packet: RtpPacket | None = field(default=None)


class UdpReceiver:
    """``async with UdpReceiver() as rx``: bound to 127.0.0.1 on a free port (``rx.port``)."""

    def __init__(self, port: int = 0, *, parse: bool = True) -> None:
        self._want_port = port
        self._parse = parse
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.arrivals: list[Arrival] = []
        self._changed = asyncio.Event()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def __aenter__(self) -> UdpReceiver:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.bind(("127.0.0.1", self._want_port))
        self.sock.setblocking(False)
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()

    def _readable(self) -> None:
        now = time.monotonic()
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            packet = RtpPacket.parse(data) if self._parse else None
            self.arrivals.append(Arrival(now, data, packet))
        self._changed.set()

    def flush(self) -> None:
        """Read whatever is in the socket now (packets sent before this call on loopback)."""
        self._readable()

    async def wait_for_count(self, n: int, *, within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while len(self.arrivals) < n:
                self._changed.clear()
                await self._changed.wait()

    @property
    def packets(self) -> list[RtpPacket]:
        return [a.packet for a in self.arrivals if a.packet is not None]


def unwrap_sequence(seqs: list[int]) -> list[int]:
    """Extended sequence numbers (as in RFC 3550 A.1) from 16-bit ones, starting at seqs[0]."""
    out: list[int] = []
    for s in seqs:
        out.append(s if not out else out[-1] + ((s - out[-1]) + 32768) % 65536 - 32768)
    return out


def decode_payloads(packets: list[RtpPacket], codec: str) -> PCM16:
    """Concatenate the decoded payloads in sequence order."""
    if not packets:
        return np.zeros(0, np.int16)
    order = np.argsort(unwrap_sequence([p.sequence_number for p in packets]), kind="stable")
    payload = b"".join(packets[i].payload for i in order)
    if codec == "pcmu":
        return ulaw_decode(payload)
    if codec == "pcma":
        return alaw_decode(payload)
    return np.frombuffer(payload, ">i2").astype(np.int16)


def free_udp_port(*, pair: bool) -> int:
    """A free port on 127.0.0.1 (even, with port + 1 free too, if ``pair``)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not pair:
            return port
        port &= ~1
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a,
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b,
            ):
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free UDP port")
