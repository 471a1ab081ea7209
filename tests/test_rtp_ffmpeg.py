"""RtpSink received by a real ffmpeg from the sink's own SDP, on 127.0.0.1.

ffmpeg is started first and writes raw s16le (flushed per packet); the test waits until ffmpeg
has bound the RTP port (read from /proc/net/udp), sends, waits until the decoded output has
the expected size, then stops ffmpeg with SIGINT. Every wait is bounded. L16 must come out
bit-exact; PCMU/PCMA must equal the reference G.711 decode of what was sent. The alignment
offset is searched for, not assumed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import soxr

from sinks import RtpSink
from sinks.g711 import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode
from tests.rtp_receiver import free_udp_port
from tts_stream.audio import PCM16, AudioFormat, Frame

pytestmark = pytest.mark.peer

FFMPEG_TIMEOUT = 20.0


def speechlike(seconds: float, rate: int) -> PCM16:
    """Gliding harmonics with an envelope (below 3.5 kHz so 8 kHz keeps it all)."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 40 * np.sin(2 * np.pi * 1.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    return (x * env * 5000).astype(np.int16)


def udp_port_bound(port: int) -> bool:
    """Whether some socket is bound to UDP ``port`` (Linux /proc/net/udp)."""
    with open("/proc/net/udp") as f:
        next(f)
        return any(int(line.split()[1].split(":")[1], 16) == port for line in f)


async def until(predicate: object, *, within: float, what: str) -> None:
    """Poll ``predicate`` (every 10 ms) until true; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def best_alignment(got: PCM16, want: PCM16, max_offset: int = 2000) -> int:
    """The offset of ``want`` inside ``got`` with the most equal samples."""
    best, best_score = 0, -1
    for off in range(-min(max_offset, len(want) - 1), min(max_offset, len(got) - 1) + 1):
        a = got[max(off, 0) :]
        b = want[max(-off, 0) :]
        n = min(len(a), len(b))
        score = int(np.count_nonzero(a[:n] == b[:n]))
        if score > best_score:
            best, best_score = off, score
    return best


async def receive_with_ffmpeg(
    tmp_path: Path, sink: RtpSink, fmt: AudioFormat, audio: PCM16, *, expect_samples: int
) -> PCM16:
    await sink.open(fmt)
    sdp = tmp_path / "stream.sdp"
    sdp.write_text(sink.sdp())
    out = tmp_path / "out.raw"
    proc = await asyncio.create_subprocess_exec(
        "ffmpeg",
        "-hide_banner",
        "-loglevel",
        "error",
        "-nostdin",
        "-y",
        "-protocol_whitelist",
        "file,udp,rtp",
        "-i",
        str(sdp),
        "-flush_packets",
        "1",
        "-f",
        "s16le",
        "-acodec",
        "pcm_s16le",
        str(out),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await until(lambda: udp_port_bound(sink.port), within=FFMPEG_TIMEOUT, what="ffmpeg")
        for i in range(0, len(audio), 2400):
            await sink.write(Frame(audio[i : i + 2400]))
        await sink.drain()
        want_bytes = 2 * expect_samples
        await until(
            lambda: out.exists() and out.stat().st_size >= want_bytes,
            within=FFMPEG_TIMEOUT,
            what="ffmpeg to decode every packet",
        )
    finally:
        await sink.aclose()
        err = await stop_ffmpeg(proc)
    # 255 after SIGINT is ffmpeg's normal exit; anything it logged besides that is suspect
    assert proc.returncode in (0, 255), err.decode()
    return np.frombuffer(out.read_bytes(), "<i2")


async def stop_ffmpeg(proc: asyncio.subprocess.Process) -> bytes:
    """SIGINT, and a second one if ffmpeg is still blocked reading the network.

    Once transcoding has started, ffmpeg's first SIGINT only asks for a graceful end (it
    still waits in the UDP read, up to its 10 s timeout: "Connection timed out"); the second
    one interrupts the read. Both finish the output properly; a kill is the last resort.
    """
    assert proc.stderr is not None
    for _ in range(2):
        if proc.returncode is not None:
            break
        proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 1.0)
        except TimeoutError:
            continue
    if proc.returncode is None:
        try:
            await asyncio.wait_for(proc.wait(), FFMPEG_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    return await asyncio.wait_for(proc.stderr.read(), FFMPEG_TIMEOUT)


def padded(x: PCM16, block: int) -> PCM16:
    return np.concatenate([x, np.zeros(-len(x) % block, np.int16)])


def resampled(x: PCM16, rate_in: int, rate_out: int) -> PCM16:
    """What the sink sends: one-shot soxr HQ, rounded (the sink's chunked output is identical)."""
    r = soxr.ResampleStream(rate_in, rate_out, 1, dtype="float32", quality="HQ")
    y: np.ndarray = r.resample_chunk(x.astype(np.float32), last=True)
    out: PCM16 = np.clip(np.rint(y), -32768, 32767).astype(np.int16)
    return out


@pytest.mark.parametrize(
    ("codec", "rate", "clock_rate", "rtcp"),
    [
        ("l16", 8000, None, False),
        ("l16", 16000, None, True),  # L16 at the stream's own rate, with RTCP to port + 1
        ("l16", 24000, 8000, False),  # resampled to 8 kHz
        ("pcmu", 8000, None, True),
        ("pcma", 8000, None, False),
        ("pcmu", 24000, None, False),  # resampled to 8 kHz, then G.711
        ("pcma", 24000, None, True),
    ],
)
async def test_ffmpeg_decodes_what_was_sent(
    tmp_path: Path, codec: str, rate: int, clock_rate: int | None, rtcp: bool
) -> None:
    port = free_udp_port(pair=rtcp)
    sink = RtpSink("127.0.0.1", port, codec=codec, clock_rate=clock_rate, rtcp=rtcp)
    audio = speechlike(1.2, rate)
    wire_rate = clock_rate or (rate if codec == "l16" else 8000)
    linear = audio if wire_rate == rate else resampled(audio, rate, wire_rate)
    spp = wire_rate // 50
    sent = padded(linear, spp)
    if codec == "pcmu":
        sent = ulaw_decode(ulaw_encode(sent))
    elif codec == "pcma":
        sent = alaw_decode(alaw_encode(sent))
    async with asyncio.timeout(60):
        got = await receive_with_ffmpeg(
            tmp_path, sink, AudioFormat(rate), audio, expect_samples=len(sent)
        )
    offset = best_alignment(got, sent)
    assert offset >= 0, f"ffmpeg lost the first {-offset} samples"
    np.testing.assert_array_equal(got[offset : offset + len(sent)], sent)
    assert len(got) - offset == len(sent), (len(got), offset, len(sent))
    assert sink.rtp_stats().packets_sent == len(sent) // spp
    if rtcp:
        assert sink.rtp_stats().rtcp_packets_sent >= 2  # the first report and the BYE


def test_proc_net_udp_probe() -> None:
    """The readiness probe itself: a bound socket is seen, a closed one is not."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
        assert udp_port_bound(port)
    assert os.path.exists("/proc/net/udp") and not udp_port_bound(port)
