"""Incremental decoding of ``wav``, ``mp3`` and ``opus`` responses into PCM16 frames.

Role: with ``response_format`` other than ``pcm`` the deltas of a response are consecutive
pieces of one encoded stream (protocol.md §5.8). A :class:`StreamDecoder` takes those pieces
as they arrive and returns the PCM16 samples decodable so far, never re-decoding from the
start; :class:`ResponseDecoders` keeps one per response, so the connection hands sinks
exactly the frames it would hand them with ``pcm``.

* ``wav``: the RIFF header (any chunks before ``data``) is parsed and skipped, the rest is
  PCM16 as is.
* ``mp3``: PyAV's MPEG-audio parser cuts the bytes into frames, the fixed-point ``mp3``
  decoder turns them into int16.
* ``opus``: an Ogg page reader of our own (:class:`OggPackets`, pure: PyAV demuxes only
  from a file it can read on demand, not from bytes pushed at it) yields the Opus packets;
  the ``libopus`` decoder runs at 48 kHz with the ``OpusHead`` as extradata (pre-skip
  applied by the decoder; at lower rates its alignment is off by a few ms), the output is
  trimmed to the pages' granule positions (the encoder pads its last frame, a demuxer
  drops that), then a stateful soxr resampler brings it to the session's rate.

Boundary: no I/O, no asyncio; PyAV (a core dependency) is imported on first use.
"""

from __future__ import annotations

import struct
from typing import Any, Final, Protocol

import numpy as np

from .audio import PCM16
from .errors import ProtocolViolation, UsageError

__all__ = ["DECODED_FORMATS", "OggPackets", "ResponseDecoders", "StreamDecoder", "make_decoder"]

DECODED_FORMATS: Final = ("wav", "mp3", "opus")
_EMPTY: Final = np.zeros(0, np.int16)
_EMPTY.flags.writeable = False


class StreamDecoder(Protocol):
    """One response's stream: bytes in (any split), int16 mono samples out."""

    def feed(self, data: bytes) -> PCM16:
        """Decode what ``data`` completes; returns the new samples (maybe none)."""
        ...

    def flush(self) -> PCM16:
        """The stream ended: return the samples still held back."""
        ...


def make_decoder(response_format: str, sample_rate: int) -> StreamDecoder:
    """A fresh decoder for one response of ``response_format`` at ``sample_rate``."""
    if response_format == "wav":
        return WavDecoder()
    if response_format == "mp3":
        return Mp3Decoder(sample_rate)
    if response_format == "opus":
        return OpusDecoder(sample_rate)
    raise UsageError(f"no decoder for response_format {response_format!r}")


class ResponseDecoders:
    """One decoder per response id (a new id starts a new stream)."""

    def __init__(self, response_format: str, sample_rate: int) -> None:
        make_decoder(response_format, sample_rate)  # refuse a bad format now
        self.response_format = response_format
        self.sample_rate = sample_rate
        self._current: tuple[str, StreamDecoder] | None = None

    def feed(self, response_id: str, data: bytes) -> PCM16:
        """Samples of ``data``; a new ``response_id`` flushes the previous stream first."""
        head = _EMPTY
        if self._current is None or self._current[0] != response_id:
            head = self.finish()
            self._current = (response_id, make_decoder(self.response_format, self.sample_rate))
        out = self._current[1].feed(data)
        return out if not head.size else np.concatenate([head, out])

    def finish(self) -> PCM16:
        """The current response ended: its held-back samples (none if there is none)."""
        current, self._current = self._current, None
        return _EMPTY if current is None else current[1].flush()


# --------------------------------------------------------------------------- wav


class WavDecoder:
    """RIFF/WAVE header skipped (PCM16 mono only), then samples; odd bytes carried over."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._in_data = False
        self._carry = b""

    def feed(self, data: bytes) -> PCM16:
        if not self._in_data:
            self._head += data
            start = self._parse_header()
            if start is None:
                return _EMPTY
            data, self._head = bytes(self._head[start:]), bytearray()
            self._in_data = True
        data = self._carry + data
        cut = len(data) - len(data) % 2
        self._carry = data[cut:]
        return np.frombuffer(data[:cut], dtype="<i2")

    def _parse_header(self) -> int | None:
        """Offset of the first sample once the header is complete, else None."""
        head = self._head
        if len(head) < 12:
            return None
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise ProtocolViolation("wav response does not start with a RIFF/WAVE header")
        pos = 12
        while len(head) >= pos + 8:
            kind, size = head[pos : pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
            if kind == b"data":
                return pos + 8
            if kind == b"fmt ":
                if len(head) < pos + 8 + 16:
                    return None
                tag, channels, _, _, _, bits = struct.unpack_from("<HHIIHH", head, pos + 8)
                if tag != 1 or channels != 1 or bits != 16:
                    raise ProtocolViolation(
                        f"wav response is not PCM16 mono (format {tag}, {channels} channels, "
                        f"{bits} bits)"
                    )
            pos += 8 + size + size % 2
        return None

    def flush(self) -> PCM16:
        return _EMPTY


# --------------------------------------------------------------------------- mp3


def _samples(frames: Any) -> PCM16:
    """int16 mono samples of decoded PyAV frames (s16 or s16p, one channel)."""
    parts = [np.asarray(f.to_ndarray(), dtype=np.int16).reshape(-1) for f in frames]
    if not parts:
        return _EMPTY
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class Mp3Decoder:
    """MPEG audio frames parsed out of the byte stream, decoded to int16 (no resampling)."""

    def __init__(self, sample_rate: int) -> None:
        import av

        self._ctx: Any = av.CodecContext.create("mp3", "r")  # fixed point: s16p out
        self.sample_rate = sample_rate

    def _decode(self, packets: Any) -> PCM16:
        frames = []
        for packet in packets:
            frames.extend(self._ctx.decode(packet))
        for frame in frames:
            if frame.sample_rate != self.sample_rate:
                raise ProtocolViolation(
                    f"mp3 response is {frame.sample_rate} Hz, the session is {self.sample_rate}"
                )
        return _samples(frames)

    def feed(self, data: bytes) -> PCM16:
        return self._decode(self._ctx.parse(data))

    def flush(self) -> PCM16:
        out = self._decode(self._ctx.parse(None))
        tail = _samples(self._ctx.decode(None))
        return out if not tail.size else np.concatenate([out, tail])


# --------------------------------------------------------------------------- opus in ogg


class OggPackets:
    """Ogg pages in (any split), logical packets out (RFC 3533), for one stream.

    ``feed`` returns the packets completed by the bytes so far, each with the granule
    position of the page that ends it (-1 when the page ends none).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._partial = bytearray()
        self.last_granule = -1

    def feed(self, data: bytes) -> list[tuple[bytes, int]]:
        self._buf += data
        out: list[tuple[bytes, int]] = []
        buf = self._buf
        while True:
            if len(buf) < 27:
                break
            if buf[:4] != b"OggS":
                raise ProtocolViolation("opus response is not an Ogg stream (no OggS page)")
            nsegs = buf[26]
            if len(buf) < 27 + nsegs:
                break
            lacing = buf[27 : 27 + nsegs]
            size = 27 + nsegs + sum(lacing)
            if len(buf) < size:
                break
            (granule,) = struct.unpack_from("<q", buf, 6)
            pos = 27 + nsegs
            ended: list[bytes] = []
            for lace in lacing:
                self._partial += buf[pos : pos + lace]
                pos += lace
                if lace < 255:
                    ended.append(bytes(self._partial))
                    self._partial.clear()
            if granule >= 0:
                self.last_granule = granule
            out.extend((p, -1) for p in ended[:-1])
            if ended:
                out.append((ended[-1], granule))
            del buf[:size]
        return out


_OPUS_RATE: Final = 48000  # granule positions and pre-skip always count 48 kHz samples


class OpusDecoder:
    """Ogg Opus to int16: libopus at 48 kHz (where its pre-skip handling is exact), then a
    stateful soxr resampler to the session's rate."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._ogg = OggPackets()
        self._ctx: Any = None
        self._pre_skip = 0
        self._headers = 0
        self._decoded = 0  # 48 kHz samples kept so far
        self._resampler: Any = None
        if sample_rate != _OPUS_RATE:
            import soxr

            # float32, not int16: libsoxr dithers integer output at random, and the frames
            # must be the same bytes on every decode of the same stream.
            self._resampler = soxr.ResampleStream(_OPUS_RATE, sample_rate, 1, dtype="float32")

    def _open(self, head: bytes) -> None:
        import av

        if not head.startswith(b"OpusHead") or len(head) < 19:
            raise ProtocolViolation("opus response does not start with an OpusHead packet")
        self._pre_skip = struct.unpack_from("<H", head, 10)[0]
        ctx = av.CodecContext.create("libopus", "r")
        ctx.sample_rate = _OPUS_RATE
        ctx.layout = "mono"
        ctx.extradata = head
        self._ctx = ctx

    def feed(self, data: bytes) -> PCM16:
        import av

        parts: list[PCM16] = []
        for packet, granule in self._ogg.feed(data):
            if self._headers < 2:  # OpusHead, then OpusTags
                if self._headers == 0:
                    self._open(packet)
                self._headers += 1
                continue
            pcm = _samples(self._ctx.decode(av.Packet(packet)))
            if granule >= 0:
                # A page's granule position is where its last packet ends: the encoder pads
                # the final frame, and this trims the padding as a demuxer does.
                pcm = pcm[: max(0, granule - self._pre_skip - self._decoded)]
            self._decoded += pcm.size
            # Per packet: the resampler sees the same blocks however the bytes were split,
            # so the output is bit-identical to decoding the whole stream at once.
            parts.append(self._resample(pcm, last=False))
        return _EMPTY if not parts else np.concatenate(parts)

    def _resample(self, pcm: PCM16, *, last: bool) -> PCM16:
        if self._resampler is None:
            return pcm
        y = self._resampler.resample_chunk(pcm.astype(np.float32), last=last)
        out: PCM16 = np.clip(np.rint(y), -32768, 32767).astype(np.int16)
        return out

    def flush(self) -> PCM16:
        return self._resample(_EMPTY, last=True)
