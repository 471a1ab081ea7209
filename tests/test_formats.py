"""Every response format: the server's encoders, the engine's incremental decoders, end to end.

* decode.py alone: streams split at every size decode to the same samples as one feed.
* The server's mp3/opus streams decode in FFmpeg's own demuxers (PyAV ``av.open``): a
  valid stream, as long as the audio, ``bit_rate`` honoured for opus (§5.4).
* End to end: the engine speaking with ``response_format=wav|mp3|opus`` hands its sinks
  exactly (bit for bit) the samples of a one-shot decode of the same stream, fetched with a
  raw WebSocket session (the tone backend and the encoders are deterministic).
"""

from __future__ import annotations

import io
import struct
from typing import Any

import av
import numpy as np
import pybase64
import pytest

from sinks import ArraySink
from tts_stream import Engine
from tts_stream.audio import PCM16
from tts_stream.decode import OggPackets, ResponseDecoders, make_decoder
from tts_stream.errors import ProtocolViolation, UsageError
from tts_stream.messages import VC_MODELS
from tts_stream.server import LocalServer
from tts_stream.server.encode import make_encoder
from tts_stream.server.synth import synthesize
from tts_stream.testing.speakers import piper_sample_wav

from .conftest import Enroll
from .test_server_realtime import configure, send, session, until

TEXT = "Hello there, this is a test of every response format."
FORMATS = ("wav", "mp3", "opus")


def encoded(fmt: str, pcm: PCM16, rate: int, kbps: int = 64, step: int = 2400) -> bytes:
    enc = make_encoder(fmt, rate, kbps)
    parts = [enc.encode(pcm[i : i + step]) for i in range(0, pcm.size, step)]
    return b"".join([*parts, enc.flush()])


def decode_all(fmt: str, stream: bytes, rate: int, split: int | None = None) -> PCM16:
    dec = make_decoder(fmt, rate)
    n = split or max(1, len(stream))
    parts = [dec.feed(stream[i : i + n]) for i in range(0, len(stream), n)]
    return np.concatenate([*parts, dec.flush()])


def ffmpeg_decode(stream: bytes, rate: int) -> PCM16:
    """FFmpeg's demuxer and default decoder, resampled to ``rate`` s16 mono."""
    with av.open(io.BytesIO(stream), "r") as container:
        rs = av.AudioResampler(format="s16", layout="mono", rate=rate)
        out = [f.to_ndarray().reshape(-1) for fr in container.decode(audio=0)
               for f in rs.resample(fr)]  # fmt: skip
        out += [f.to_ndarray().reshape(-1) for f in rs.resample(None)]
    return np.concatenate(out).astype(np.int16)


@pytest.fixture(scope="module")
def speech() -> PCM16:
    return synthesize(TEXT, sample_rate=24000)


# --------------------------------------------------------------------------- decode.py


@pytest.mark.parametrize("fmt", ["mp3", "opus"])
@pytest.mark.parametrize("rate", [8000, 16000, 24000, 48000])
def test_any_split_decodes_bit_exact_like_one_feed(fmt: str, rate: int) -> None:
    pcm = synthesize(TEXT, sample_rate=rate)
    stream = encoded(fmt, pcm, rate)
    whole = decode_all(fmt, stream, rate)
    for split in (1, 7, 300, 4096):
        assert np.array_equal(decode_all(fmt, stream, rate, split), whole)
    # Same length as FFmpeg's own demuxer + decoder, and opus aligned with the input.
    ref = ffmpeg_decode(stream, rate)
    assert whole.size == ref.size
    if fmt == "opus":
        assert whole.size == pcm.size  # pre-skip and end padding trimmed exactly
        err = whole.astype(float) - ref.astype(float)
        assert 10 * np.log10(np.sum(ref.astype(float) ** 2) / np.sum(err**2)) > 8


def test_wav_header_split_anywhere_and_odd_bytes() -> None:
    pcm = (np.arange(-500, 500) * 30).astype(np.int16)
    header = (
        b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
        + b"LIST" + struct.pack("<I", 3) + b"abc\0"  # an odd chunk before fmt, padded
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, 24000, 48000, 2, 16)
        + b"data" + struct.pack("<I", 0xFFFFFFFF)
    )  # fmt: skip
    stream = header + pcm.tobytes()
    for split in (1, 3, 5, 44, 1000):
        assert np.array_equal(decode_all("wav", stream, 24000, split), pcm)


@pytest.mark.parametrize(
    ("fmt", "data"),
    [
        ("wav", b"RIFX" + b"\0" * 40),
        ("wav", b"RIFF\0\0\0\0WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 2, 8000, 0, 4, 16)),
        ("opus", b"NotOgg" + b"\0" * 40),
    ],
)
def test_bad_streams_are_protocol_violations(fmt: str, data: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        make_decoder(fmt, 24000).feed(data)


def test_ogg_packets_and_granules(speech: PCM16) -> None:
    stream = encoded("opus", speech, 24000)
    reader = OggPackets()
    packets = [pk for i in range(0, len(stream), 100) for pk in reader.feed(stream[i : i + 100])]
    assert packets[0][0].startswith(b"OpusHead") and packets[1][0].startswith(b"OpusTags")
    audio = packets[2:]
    pre_skip = struct.unpack_from("<H", packets[0][0], 10)[0]  # 48 kHz samples
    assert len(audio) == -(-(speech.size + pre_skip // 2) // 480)  # 20 ms packets at 24 kHz
    assert reader.last_granule == packets[-1][1] == speech.size * 2 + pre_skip


def test_response_decoders_one_stream_per_response(speech: PCM16) -> None:
    a, b = speech[:12000], speech[12000:30000]
    decs = ResponseDecoders("opus", 24000)
    out_a = decs.feed("resp_a", encoded("opus", a, 24000))
    out_b = decs.feed("resp_b", encoded("opus", b, 24000))  # flushes resp_a first
    out = np.concatenate([out_a, out_b, decs.finish()])
    assert out.size == a.size + b.size
    assert decs.finish().size == 0
    with pytest.raises(UsageError, match="flac"):
        ResponseDecoders("flac", 24000)


def test_bit_rate_sets_opus_but_not_mp3(speech: PCM16) -> None:
    low, high = (len(encoded("opus", speech, 24000, kbps)) for kbps in (12, 128))
    assert high > 4 * low
    seconds = speech.size / 24000
    # 12 kbit/s of Opus plus one 28-byte Ogg page header per 20 ms packet (11.2 kbit/s).
    assert low * 8 / seconds / 1000 < 12 + 11.2 + 2
    mp3 = {len(encoded("mp3", speech, 24000, kbps)) for kbps in (12, 128)}
    assert len(mp3) == 1  # fixed 128 kbit/s


# --------------------------------------------------------------------------- end to end


async def raw_stream(srv: LocalServer, voice: str, text: str, **session_keys: Any) -> bytes:
    """The concatenated deltas of one response, through a raw WebSocket session."""
    async with session(srv) as ws:
        await configure(ws, voice, mode="commit", **session_keys)
        await send(ws, "input_text_buffer.append", text=text)
        await send(ws, "input_text_buffer.commit")
        events = await until(ws, "response.done")
    assert events[-1]["response"]["status"] == "completed"
    return b"".join(
        pybase64.b64decode(e["delta"]) for e in events if e["type"] == "response.audio.delta"
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rate", [8000, 24000, 48000])
async def test_engine_hands_sinks_the_decoded_stream_bit_exact(
    server: LocalServer, voice: str, fmt: str, rate: int
) -> None:
    stream = await raw_stream(server, voice, TEXT, response_format=fmt, sample_rate=rate)
    assert stream == await raw_stream(server, voice, TEXT, response_format=fmt, sample_rate=rate)
    if fmt != "wav":
        assert ffmpeg_decode(stream, rate).size > rate  # FFmpeg reads it as a whole stream
    reference = decode_all(fmt, stream, rate)
    pcm = np.frombuffer(await raw_stream(server, voice, TEXT, sample_rate=rate), "<i2")
    if fmt == "wav":
        assert np.array_equal(reference, pcm)
    else:
        # mp3 keeps LAME's 1105-sample delay and pads to its frame (no gapless tag in a
        # stream); opus trims both (pre-skip, granule position).
        slack = 1105 + 1152 if fmt == "mp3" else 0
        assert 0 <= reference.size - pcm.size <= slack
    async with Engine(base_url=server.base_url, api_key=server.api_key) as engine:
        sink = ArraySink(max_blocks=4096)
        m = await engine.say(
            voice, TEXT, sinks=[sink], model=VC_MODELS[0], mode="commit",
            response_format=fmt, sample_rate=rate,
        )  # fmt: skip
        got = await sink.read_all()
    assert np.array_equal(got, reference)
    assert m.audio_ms == pytest.approx(1000 * reference.size / rate, abs=1)


async def test_each_response_is_its_own_stream(server: LocalServer, voice: str) -> None:
    first, second = "First sentence here.", "And a second one."
    streams = [await raw_stream(server, voice, t, response_format="mp3") for t in (first, second)]
    expected = np.concatenate([decode_all("mp3", s, 24000) for s in streams])
    async with Engine(base_url=server.base_url, api_key=server.api_key) as engine:
        sink = ArraySink(max_blocks=4096)
        speech = engine.speak(
            voice, sinks=[sink], model=VC_MODELS[0], mode="commit", response_format="mp3"
        )
        async with speech:
            await speech.push(first)
            await speech.commit()
            await speech.push(second)
            await speech.commit()
        got = await sink.read_all()
    assert speech.metrics.responses == 2
    assert np.array_equal(got, expected)


async def test_piper_speaks_every_format(enroll: Enroll) -> None:
    """A real voice through each codec: the decoded audio is as long as the pcm one."""
    async with LocalServer(port=0, backend="piper") as srv:
        voice = await enroll(srv, wav=piper_sample_wav())  # speaks with piper
        lengths = {}
        for fmt in ("pcm", *FORMATS):
            stream = await raw_stream(srv, voice, TEXT, response_format=fmt)
            pcm = np.frombuffer(stream, "<i2") if fmt == "pcm" else decode_all(fmt, stream, 24000)
            lengths[fmt] = pcm.size
        assert all(abs(n - lengths["pcm"]) <= 2400 for n in lengths.values()), lengths


def test_unknown_format_is_refused_before_connecting() -> None:
    with pytest.raises(UsageError, match="response_format"):
        Engine.pool_key("v", model=VC_MODELS[0], response_format="flac")
