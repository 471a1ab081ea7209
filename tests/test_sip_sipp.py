"""The SIP agent against a real SIP peer: sipp (Debian ``sip-tester``) as the caller.

Each test starts the local server (tone backend), a :class:`SipAgent` on 127.0.0.1, and one
sipp run bounded in calls (``-m``) and time (``-timeout``); sipp's exit code says whether
every call of its scenario went as scripted (0) or not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sinks import ArraySink
from sinks.g711 import ulaw_decode, ulaw_encode
from tests.rtp_receiver import free_udp_port
from tts_stream import Engine
from tts_stream.server import LocalServer
from tts_stream.telephony.agent import Call, SipAgent
from tts_stream.testing.enroll import enroll_voice as _enroll

pytestmark = pytest.mark.peer

SCENARIOS = Path(__file__).parent / "sipp"
SIPP_TIMEOUT = 30


@contextlib.asynccontextmanager
async def ivr(
    handler: Callable[[Call], Awaitable[None]], **agent: Any
) -> AsyncIterator[SipAgent]:
    async with LocalServer(port=0, backend="tone") as srv:
        name = await _enroll(srv)
        async with Engine(api_key=srv.api_key, base_url=srv.base_url) as engine:
            voice = await engine.voices.find(name)
            async with SipAgent(engine, voice, handler, port=0, **agent) as a:
                yield a


async def sipp(agent: SipAgent, cwd: Path, *args: str, calls: int = 1) -> tuple[int, str]:
    host, port = agent.address
    cmd = [
        "sipp", f"{host}:{port}", "-i", "127.0.0.1", "-p", str(free_udp_port(pair=False)),
        "-mp", str(free_udp_port(pair=True)), "-m", str(calls), "-timeout", str(SIPP_TIMEOUT),
        "-timeout_error", "-nostdin", "-trace_err", *args,
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(SIPP_TIMEOUT + 10):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    errors = "".join(
        p.read_text(errors="replace") for p in cwd.glob("*_errors.log")  # noqa: ASYNC240
    )
    return int(proc.returncode or 0), out.decode(errors="replace")[-3000:] + errors[-3000:]


async def test_uac_call_and_rtp_echo_bit_exact(tmp_path: Path) -> None:
    """sipp's built-in uac: INVITE/100/200/ACK, our prompt, BYE/200; -rtp_echo returns our
    RTP and the audio we decode from it is exactly what we encoded."""
    sent = ArraySink(max_blocks=10000)
    echoed: list[np.ndarray] = []
    done = asyncio.Event()

    async def handler(call: Call) -> None:
        assert call.plan.codec.encoding == "PCMU"
        assert await call.say("Hello from the test.", barge_in=False, sinks=[sent])
        await asyncio.sleep(0.5)  # the stimulus: the last echoed packets come back
        while (block := call.media.read_nowait()) is not None:
            echoed.append(block)
        done.set()

    async with ivr(handler) as agent:
        rc, log = await sipp(agent, tmp_path, "-sn", "uac", "-d", "4000", "-rtp_echo")
        assert rc == 0, log
        async with asyncio.timeout(10):
            await done.wait()
            await agent.wait_idle(10)
    rec = agent.records[-1]
    assert rec.ended_by == "bye" and rec.first_audio_ms is not None
    blocks = []
    while (b := await sent.get()) is not None:
        blocks.append(b)
    pcm = np.concatenate(blocks)
    assert pcm.size > 800
    expected = ulaw_decode(ulaw_encode(pcm))
    got = np.concatenate(echoed)
    assert got.size >= expected.size
    assert np.array_equal(got[: expected.size], expected)
    assert not got[expected.size :].any()  # the last packet was padded with silence
    assert rec.packets_sent == rec.media_received


async def test_dtmf_from_sipp_pcaps(tmp_path: Path) -> None:
    """sipp plays its RFC 4733 pcaps (1, 5, #) during the call; we get each digit once."""
    digits: list[str] = []

    async def handler(call: Call) -> None:
        assert call.plan.codec.encoding == "PCMA" and call.plan.telephone_event is not None
        async for d in call.dtmf(wait_s=10):
            digits.append(d)
            if d == "#":
                break

    async with ivr(handler) as agent:
        rc, log = await sipp(agent, tmp_path, "-sf", str(SCENARIOS / "uac_dtmf.xml"))
        assert rc == 0, log
        await agent.wait_idle(10)
    assert digits == ["1", "5", "#"]
    assert agent.records[-1].digits == ["1", "5", "#"]


async def test_cancel_while_ringing_gets_487(tmp_path: Path) -> None:
    calls: list[Call] = []

    async def handler(call: Call) -> None:
        calls.append(call)

    async with ivr(handler, ring_s=3.0) as agent:
        rc, log = await sipp(agent, tmp_path, "-sf", str(SCENARIOS / "uac_cancel.xml"))
        assert rc == 0, log
        await asyncio.sleep(0)  # the answer task sees the call is gone
        await agent.wait_idle(10)
    assert calls == []  # never answered, the handler never ran


async def test_garbage_gets_400_unknown_dialog_481_no_codec_488(tmp_path: Path) -> None:
    async def handler(call: Call) -> None:
        raise AssertionError("no call should be answered")

    async with ivr(handler) as agent:
        rc, log = await sipp(agent, tmp_path, "-sf", str(SCENARIOS / "garbage.xml"))
        assert rc == 0, log
        assert agent.calls == {}
