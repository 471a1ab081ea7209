"""Audio vocabulary shared by the engine and every sink (pure: no asyncio, no clock).

:class:`AudioFormat` describes a PCM stream, :class:`Frame` is one decoded slice of it,
:class:`Sink` is the tiny protocol every sink implements, and the helpers here (rechunking,
pacing deadlines, onset detection) are shared so no sink re-implements them. Time is always an
argument: callers pass ``now`` / ``start`` read from their own monotonic clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = [
    "AudioFormat",
    "Frame",
    "NonBlockingSink",
    "PCM16",
    "RatePreferringSink",
    "Rechunker",
    "ReusableSink",
    "Sink",
    "SinkStats",
    "deadline",
    "first_voiced_index",
    "is_open",
    "nowait_writer",
    "open_format",
    "pcm16",
    "preferred_sample_rate",
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
        return len(self.samples)  # a 1-D array: its shape[0], without a shape tuple


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

    These members are required. A sink may also have any of the optional members stated by
    :class:`NonBlockingSink` (``write_nowait``), :class:`ReusableSink` (``is_open`` and
    ``format``) and :class:`RatePreferringSink` (``preferred_sample_rate``);
    ``sinks.BaseSink`` has them all, with defaults. The engine asks for them only through
    :func:`nowait_writer`, :func:`open_format` and :func:`preferred_sample_rate`, so a plain
    object with only the required members is a complete sink.
    """

    name: str

    async def open(self, fmt: AudioFormat) -> None: ...

    async def write(self, frame: Frame) -> None: ...

    async def drain(self) -> None: ...

    async def interrupt(self) -> int: ...

    async def aclose(self) -> None: ...

    def stats(self) -> SinkStats: ...


class NonBlockingSink(Sink, Protocol):
    """Optional member ``write_nowait(frame) -> bool``, synchronous.

    It either delivers ``frame`` exactly as ``await write(frame)`` would (same output,
    counters, ``first_sample_at``; a failure raises what ``write`` would raise) without
    waiting, and returns True; or it does nothing at all and returns False (the caller then
    uses ``write``). Misuse is not a refusal: before ``open`` and after ``aclose`` it raises as
    ``write`` does (:class:`~tts_stream.errors.ClosedError` once closed), never False. The
    fan-out uses it to hand a frame to an idle lossless lane's sink without a queue.
    """

    def write_nowait(self, frame: Frame) -> bool: ...


class ReusableSink(Sink, Protocol):
    """Optional members ``is_open`` and ``format``: a sink its owner may open before a speech
    and keep open across speeches (a sound card is not reopened per sentence).

    The fan-out neither opens nor closes a sink whose ``is_open`` is true, and refuses it
    unless its ``format`` (read only while open) is the speech's. A sink without ``is_open``
    counts as not open: the speech opens and closes it.
    """

    @property
    def is_open(self) -> bool: ...

    @property
    def format(self) -> AudioFormat: ...


class RatePreferringSink(Sink, Protocol):
    """Optional member ``preferred_sample_rate``: the stream rate this sink plays best at (an
    8 kHz telephony leg), or None for any. When every sink of a speech prefers the same
    supported rate, the engine asks the server for it instead of resampling."""

    @property
    def preferred_sample_rate(self) -> int | None: ...


# The optional members are read here and nowhere else. Not ``isinstance`` against
# ``runtime_checkable`` protocols: on Python 3.11 each such check walks the protocol's
# members and costs 60-170 us (measured), and these run for every speech.


def nowait_writer(sink: Sink) -> Callable[[Frame], bool] | None:
    """The sink's ``write_nowait`` (:class:`NonBlockingSink`), or None if it has none."""
    fn = getattr(sink, "write_nowait", None)
    return cast("Callable[[Frame], bool]", fn) if callable(fn) else None


def open_format(sink: Sink) -> AudioFormat | None:
    """The ``format`` of an open :class:`ReusableSink`; None when the sink is not open or
    has no ``format``."""
    if not is_open(sink):
        return None
    fmt = getattr(sink, "format", None)
    return fmt if isinstance(fmt, AudioFormat) else None


def is_open(sink: Sink) -> bool:
    """The sink's ``is_open`` (:class:`ReusableSink`); False for a sink without it."""
    flag = getattr(sink, "is_open", False)
    return bool(flag() if callable(flag) else flag)


def preferred_sample_rate(sink: Sink) -> int | None:
    """The sink's ``preferred_sample_rate`` (:class:`RatePreferringSink`), else None."""
    rate = getattr(sink, "preferred_sample_rate", None)
    return rate if isinstance(rate, int) and not isinstance(rate, bool) else None


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
