"""Response encoders of the local server: PCM16 in, one ``mp3`` or ``opus`` stream out.

Role: with ``response_format`` ``mp3`` or ``opus`` each response is one encoded stream whose
consecutive pieces are the deltas (protocol.md §5.8). :func:`make_encoder` gives an encoder
per response; :meth:`Encoder.encode` returns the bytes the container has ready after the
samples so far (no buffering beyond the codec's own frame), :meth:`Encoder.flush` the end.

* ``mp3``: LAME through PyAV's bundled FFmpeg, raw MPEG audio frames (no ID3 tag, no Xing
  frame: a stream has no length to put there). Bit rate 128 kbit/s: protocol.md §5.4 says
  ``bit_rate`` is only meaningful for ``opus`` (the SDK's comments say mp3 too; the
  documentation wins here).
* ``opus``: libopus in Ogg (the container is undocumented, §9; Ogg is the one every player
  reads), one Ogg page per 20 ms packet so each delta carries whole pages as soon as they
  exist. ``bit_rate`` (kbit/s, default 128) sets the encoder's rate.

``wav`` and ``pcm`` need no encoder (the realtime handler writes a streaming RIFF header,
then PCM).
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

from tts_stream.audio import PCM16
from tts_stream.errors import UsageError

__all__ = ["DEFAULT_BIT_RATE_KBPS", "MP3_BIT_RATE_KBPS", "Encoder", "make_encoder"]

DEFAULT_BIT_RATE_KBPS: Final = 128
"""The documented default of ``session.bit_rate`` (protocol.md §5.4)."""
MP3_BIT_RATE_KBPS: Final = 128

_CODECS: Final = {"mp3": ("mp3", "libmp3lame"), "opus": ("ogg", "libopus")}


class _Bytes:
    """The file object the muxer writes into; ``take`` hands out what it wrote since."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        return len(data)

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


class Encoder:
    """One response's encoded stream (see the module docstring)."""

    def __init__(self, response_format: str, sample_rate: int, bit_rate_kbps: int) -> None:
        import av

        if response_format not in _CODECS:
            raise UsageError(f"no encoder for response_format {response_format!r}")
        container, codec = _CODECS[response_format]
        self._out = _Bytes()
        options = {"page_duration": "20000"} if container == "ogg" else {
            "id3v2_version": "0", "write_xing": "0"}  # fmt: skip
        # flush_packets: the muxer hands every packet to _Bytes at once (no 32 kB buffer).
        # bitexact: no random Ogg serial number, no version strings: the same audio always
        # gives the same bytes (reproducible tests and benchmarks).
        self._container: Any = av.open(
            self._out, mode="w", format=container, container_options={
                "flush_packets": "1", "fflags": "+bitexact", **options})  # fmt: skip
        stream: Any = self._container.add_stream(codec, rate=sample_rate, layout="mono")
        kbps = bit_rate_kbps if response_format == "opus" else MP3_BIT_RATE_KBPS
        stream.bit_rate = kbps * 1000
        self._stream = stream
        self._rate = sample_rate
        self._pts = 0
        self._closed = False

    def encode(self, pcm: PCM16 | bytes | bytearray | memoryview) -> bytes:
        """Encode int16 mono samples; returns the stream bytes ready now (maybe none)."""
        import av

        samples = np.frombuffer(pcm, dtype="<i2") if not isinstance(pcm, np.ndarray) else pcm
        if not samples.size:
            return b""
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples, dtype=np.int16).reshape(1, -1),
            format="s16",
            layout="mono",
        )
        frame.sample_rate = self._rate
        frame.pts = self._pts
        self._pts += samples.size
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        return self._out.take()

    def flush(self) -> bytes:
        """End the stream: the codec's last frames and the container's trailer."""
        if self._closed:
            return b""
        self._closed = True
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._out.take()

    def close(self) -> None:
        """Release the codec without finishing the stream (a cancelled response)."""
        if not self._closed:
            self._closed = True
            self._container.close()


def make_encoder(response_format: str, sample_rate: int, bit_rate_kbps: int) -> Encoder:
    """An encoder for one response (``mp3`` or ``opus``)."""
    return Encoder(response_format, sample_rate, bit_rate_kbps)
