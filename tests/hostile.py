"""Hostile clone samples and raw-socket HTTP helpers (shared by the abuse tests and
``bench/server_abuse.py``).

* :func:`absurd_rate_wav`: a WAV whose header claims 4,294,967,295 Hz (576 KB of samples).
* :func:`long_mp3`: a two-hour 8 kbit/s MP3 (7.2 MB; 9.6 MB as a data URI) without a Xing
  header, so its duration comes from the bit rate, as FFmpeg reports it.
* :func:`raw_request`: the bytes of an HTTP/1.1 request (or only its first ``cut`` bytes).
"""

from __future__ import annotations

import functools
import io
import struct

import av
import numpy as np

from tests import samplegen

__all__ = ["absurd_rate_wav", "long_mp3", "raw_request"]


@functools.cache
def absurd_rate_wav(size: int = 576 * 1024, rate: int = 0xFFFFFFFF) -> bytes:
    """16-bit mono PCM of ``size`` bytes of noise whose header says ``rate`` Hz."""
    body = np.random.default_rng(0).integers(-3000, 3000, size // 2).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, (rate * 2) & 0xFFFFFFFF, 2, 16)
    riff = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    riff += b"data" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", len(riff)) + riff


@functools.cache
def long_mp3(copies: int = 240) -> bytes:
    """``copies`` x 30 s of reading as one 8 kbit/s 24 kHz MP3 stream (240: two hours)."""
    pcm = samplegen.speech(30.0)
    buf = io.BytesIO()
    options = {"write_xing": "0", "id3v2_version": "0"}
    with av.open(buf, "w", format="mp3", options=options) as container:
        stream = container.add_stream("libmp3lame", rate=24000, layout="mono")
        stream.bit_rate = 8000
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(pcm.reshape(1, -1)), format="s16", layout="mono"
        )
        frame.sample_rate, frame.pts = 24000, 0
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue() * copies  # CBR frames concatenate into one longer stream


def raw_request(
    path: str,
    body: bytes = b"",
    *,
    api_key: str | None = None,
    headers: dict[str, str] | None = None,
    length: int | None = None,
) -> bytes:
    """An HTTP/1.1 POST with ``Content-Length: length`` (default: the body's length)."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if api_key is not None:
        lines.append(f"Authorization: Bearer {api_key}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
