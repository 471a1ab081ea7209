"""A re-INVITE that moves the caller's media, against a real SIP peer (sipp).

sipp calls with RTP at its media port, then, while our prompt plays, sends a re-INVITE whose SDP
names another port, where this test listens (``tests/sipp/uac_reinvite.xml``). The rest of the
prompt must arrive there: same SSRC, sequence numbers continuing, no new talk spurt, the audio
bit-exact; and the call's receiver must take the caller's RTP from the new address only.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import numpy as np
import pytest

from sinks import ArraySink
from sinks.g711 import ulaw_decode, ulaw_encode
from sinks.rtp_packet import RtpPacket
from tests.rtp_receiver import UdpReceiver, decode_payloads, unwrap_sequence
from tests.test_sip_sipp import SCENARIOS, ivr, sipp
from tts_stream.telephony.agent import Call
from tts_stream.telephony.media import MediaStats

pytestmark = pytest.mark.peer

PROMPT = "This prompt keeps speaking while the caller moves its media to another port."


async def test_reinvite_moves_our_rtp_and_the_expected_peer(tmp_path: Path) -> None:
    sent = ArraySink(max_blocks=10000)
    caller_pcm = (6000 * np.sin(np.arange(160) / 3)).astype(np.int16)
    seen: dict[str, MediaStats | np.ndarray | None] = {}
    done = asyncio.Event()
    async with UdpReceiver() as rx:

        async def handler(call: Call) -> None:
            assert await call.say(PROMPT, barge_in=False, sinks=[sent])
            assert call.plan.remote_port == rx.port  # the re-INVITE came during the prompt
            while call.media.read_nowait() is not None:
                pass  # sipp's echo of the first leg
            seen["before"] = call.media.stats()
            dest = ("127.0.0.1", call.media.port)
            rx.sock.sendto(RtpPacket(0, 1000, 0, 0x1234, ulaw_encode(caller_pcm)).serialize(),
                           dest)  # fmt: skip
            await asyncio.sleep(0.2)  # the stimulus: it reaches the call's socket first
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
                stranger.bind(("127.0.0.1", 0))
                stranger.sendto(RtpPacket(0, 7, 0, 0x5678, ulaw_encode(caller_pcm)).serialize(),
                                dest)  # fmt: skip
            await asyncio.sleep(0.2)
            seen["after"] = call.media.stats()
            seen["audio"] = call.media.read_nowait()
            seen["more"] = call.media.read_nowait()
            done.set()

        async with ivr(handler) as agent:
            rc, log = await sipp(
                agent, tmp_path, "-sf", str(SCENARIOS / "uac_reinvite.xml"),
                "-key", "newport", str(rx.port), "-rtp_echo",
            )  # fmt: skip
            assert rc == 0, log
            async with asyncio.timeout(10):
                await done.wait()
                await agent.wait_idle(10)
        rx.flush()
    rec = agent.records[-1]
    assert rec.ended_by == "bye"
    blocks = []
    while (b := await sent.get()) is not None:
        blocks.append(b)
    check_moved_rtp(rx.packets, rec.packets_sent, np.concatenate(blocks))
    check_new_peer(seen, caller_pcm)


def check_moved_rtp(got: list[RtpPacket], packets_sent: int, pcm: np.ndarray) -> None:
    """Both legs carried the one prompt: the first part went to sipp's port, the rest here,
    as one stream going on, bit-exact."""
    assert 0 < len(got) < packets_sent
    assert len({p.ssrc for p in got}) == 1 and {p.payload_type for p in got} == {0}
    seq = unwrap_sequence([p.sequence_number for p in got])
    assert seq == list(range(seq[0], seq[0] + len(got)))
    assert not got[0].marker  # the talk spurt went on: no new spurt at the move
    spp = 160
    expected = np.zeros(packets_sent * spp, np.int16)
    expected[: pcm.size] = ulaw_decode(ulaw_encode(pcm))  # the last packet padded with silence
    assert np.array_equal(decode_payloads(got, "pcmu"), expected[-len(got) * spp :])


def check_new_peer(seen: dict[str, MediaStats | np.ndarray | None], caller_pcm: np.ndarray) -> None:
    """The receiver: the caller's RTP from the new address counts, a stranger's does not."""
    before, after = seen["before"], seen["after"]
    assert isinstance(before, MediaStats) and isinstance(after, MediaStats)
    assert after.packets_received == before.packets_received + 1
    assert after.other_packets >= before.other_packets + 1
    audio = seen["audio"]
    assert isinstance(audio, np.ndarray)
    assert np.array_equal(audio, ulaw_decode(ulaw_encode(caller_pcm)))
    assert seen["more"] is None
