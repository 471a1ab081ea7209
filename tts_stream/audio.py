"""Audio vocabulary shared by the engine and every sink (pure: no asyncio, no clock).

:class:`AudioFormat` describes a PCM stream, :class:`Frame` is one decoded slice of it,
:class:`Sink` is the tiny protocol every sink implements, and the helpers here (rechunking,
pacing deadlines, onset detection) are shared so no sink re-implements them. Time is always an
argument: callers pass ``now`` / ``start`` read from their own monotonic clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = [
    "AudioFormat",
    "Frame",
    "PCM16",
    "Rechunker",
    "Sink",
    "SinkStats",
    "deadline",
    "first_voiced_index",
    "pcm16",
]

PCM16 = npt.NDArray[np.int16]


@dataclass(frozen=True)
class AudioFormat:
    """Signed 16-bit little-endian PCM, ``channels`` interleaved (the service sends mono)."""

    sample_rate: int = 24000
    channels: int = 1

    @property
    def bytes_per_second(self) -> int:
        return self.sample_rate * self.channels * 2

    def samples(self, ms: float) -> int:
        """Number of samples (per channel) in ``ms`` milliseconds."""
        return int(round(self.sample_rate * ms / 1000.0))

    def ms(self, samples: int) -> float:
        """Duration of ``samples`` samples (per channel) in milliseconds."""
        return samples * 1000.0 / self.sample_rate


@dataclass(frozen=True, eq=False, slots=True)
class Frame:
    """One slice of an utterance's audio.

    ``offset`` is the index of the first sample within the utterance, ``response_id`` the
    server response it belongs to, ``received_at`` the monotonic time its delta arrived.
    """

    samples: PCM16
    offset: int = 0
    response_id: str = ""
    received_at: float = 0.0

    def __len__(self) -> int:
        return int(self.samples.shape[0])


@dataclass(frozen=True)
class SinkStats:
    """A snapshot of one sink's counters (samples are per channel)."""

    name: str
    samples_written: int = 0
    samples_played: int = 0
    dropped_samples: int = 0
    underruns: int = 0
    first_sample_at: float | None = None  # monotonic time the first sample left the sink


@runtime_checkable
class Sink(Protocol):
    """What the fan-out needs from a sink.

    Lifecycle: ``open(fmt)`` → ``write(frame)``… → ``drain()`` (everything written has left
    the sink: played, sent, stored) → ``aclose()`` (drains, then releases; idempotent).
    ``interrupt()`` stops at once, drops whatever is queued and returns the number of samples
    that actually left the sink. ``write`` may await (back-pressure); after ``aclose`` it raises
    :class:`~tts_stream.errors.ClosedError`.

    Optional (not a member of this protocol; the fan-out looks it up with ``getattr``):
    ``write_nowait(frame) -> bool``, synchronous. It either delivers ``frame`` exactly as
    ``await write(frame)`` would (same output, counters, ``first_sample_at``; a failure raises
    what ``write`` would raise) without waiting, and returns True; or it does nothing at all
    and returns False (the caller then uses ``write``). Misuse is not a refusal: before
    ``open`` and after ``aclose`` it raises as ``write`` does
    (:class:`~tts_stream.errors.ClosedError` once closed), it never returns False for that.
    """

    name: str

    async def open(self, fmt: AudioFormat) -> None: ...

    async def write(self, frame: Frame) -> None: ...

    async def drain(self) -> None: ...

    async def interrupt(self) -> int: ...

    async def aclose(self) -> None: ...

    def stats(self) -> SinkStats: ...


def pcm16(data: bytes | bytearray | memoryview) -> PCM16:
    """View little-endian PCM16 bytes as an int16 array (zero-copy; odd tail byte refused)."""
    if len(data) % 2:
        raise ValueError(f"PCM16 data has an odd number of bytes ({len(data)})")
    return np.frombuffer(data, dtype="<i2")


def deadline(start: float, samples_sent: int, sample_rate: int) -> float:
    """When sample number ``samples_sent`` is due: an absolute schedule, never a sum of sleeps."""
    return start + samples_sent / sample_rate


def first_voiced_index(samples: PCM16, threshold: int = 328) -> int | None:
    """Index of the first sample whose magnitude reaches ``threshold`` (-40 dBFS by default)."""
    hits = np.flatnonzero(np.abs(samples.astype(np.int32)) >= threshold)
    return int(hits[0]) if hits.size else None


class Rechunker:
    """Cuts a stream of arbitrary-size arrays into blocks of exactly ``block`` samples."""

    def __init__(self, block: int) -> None:
        if block <= 0:
            raise ValueError("block must be positive")
        self.block = block
        self._pending: list[PCM16] = []
        self._pending_len = 0

    @property
    def pending(self) -> int:
        """Samples held back, waiting to complete a block."""
        return self._pending_len

    def push(self, samples: PCM16) -> list[PCM16]:
        """Add samples; return every block completed by them."""
        if samples.size == 0:
            return []
        self._pending.append(samples)
        self._pending_len += int(samples.size)
        if self._pending_len < self.block:
            return []
        data = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        n = (data.size // self.block) * self.block
        blocks = [data[i : i + self.block] for i in range(0, n, self.block)]
        rest = data[n:]
        self._pending = [rest] if rest.size else []
        self._pending_len = int(rest.size)
        return blocks

    def flush(self, pad: bool = False) -> PCM16 | None:
        """Return the remainder (zero-padded to a full block if ``pad``), or ``None``."""
        if not self._pending_len:
            return None
        data = np.concatenate(self._pending)
        self._pending, self._pending_len = [], 0
        if pad and data.size < self.block:
            data = np.concatenate([data, np.zeros(self.block - data.size, np.int16)])
        return data

    def clear(self) -> None:
        self._pending, self._pending_len = [], 0
