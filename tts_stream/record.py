"""Microphone capture for clone samples: the mirror of the sound-card sink.

PortAudio's audio thread copies each input block into a preallocated int16 :class:`Ring`
(shared with ``sinks/soundcard.py`` through :mod:`tts_stream.portaudio`); the callback never
blocks, takes no lock and allocates no audio buffer (PyAudio hands it a fresh ``bytes``,
which is viewed, not copied twice). When the loop falls behind and the ring is full, the
block's remainder is dropped and counted, never waited for. The event loop is woken only
through ``loop.call_soon_threadsafe``, and only when a reader waits.

:func:`record_sample` drives a :class:`Microphone` and a pure :class:`~tts_stream.meter.Meter`:
a silent lead-in measures the noise floor, then it records until ``stop`` is set, the
``seconds`` limit or 20 s (the longest recommended sample), trims the silence around the
speech, writes the WAV atomically (a temporary file in the same directory, fsynced, then
renamed: no half-written file ever carries the target name) and checks it with
:func:`~tts_stream.samples.inspect_sample`. Time is counted in samples, never read from a
clock; every wait on the device is bounded, and a device that stops delivering (unplugged,
its sound server gone) raises :class:`~tts_stream.errors.DeviceError`.

Boundary: imports ``tts_stream.portaudio``, ``meter``, ``samples`` and ``errors``; never the
engine or ``sinks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tts_stream.errors import DeviceError, Timeout, TtsStreamError, UsageError
from tts_stream.meter import LiveStatus, Meter
from tts_stream.portaudio import (
    BACKENDS,
    DeviceInfo,
    Ring,
    import_backend,
    list_devices,
    negotiate_rate,
    probe_rate,
    select_device,
)
from tts_stream.samples import (
    MIN_SAMPLE_RATE,
    RECOMMENDED_DURATION_S,
    SampleReport,
    inspect_sample,
    speech_span,
)

__all__ = [
    "Microphone",
    "MicrophoneStats",
    "Recording",
    "list_input_devices",
    "record_sample",
    "trim_silence",
    "write_wav_atomic",
]

log = logging.getLogger(__name__)

PCM16 = npt.NDArray[np.int16]
PutFn = Callable[[PCM16, bool], None]  # (block, PortAudio flagged an overflow)
_TRIM_MARGIN_S = 0.25  # silence kept before the first and after the last word


def list_input_devices(*, backend: str = "sounddevice") -> list[DeviceInfo]:
    """Every PortAudio device with at least one input channel (``tts-stream devices --input``)."""
    return list_devices(import_backend(backend), backend, "input")


@dataclass(frozen=True)
class MicrophoneStats:
    """Counters of a :class:`Microphone` (frames at the device rate)."""

    frames: int  # delivered by PortAudio
    dropped: int  # lost because the ring was full (the loop fell behind)
    overflows: int  # blocks PortAudio flagged as input overflow


class _SoundDeviceInput:
    def __init__(self, sd: Any, *, device: int, rate: int, blocksize: int,
                 put: PutFn, finished: Callable[[], None]) -> None:  # fmt: skip
        self._put = put
        self._stream = sd.InputStream(
            device=device, samplerate=rate, channels=1, dtype="int16", blocksize=blocksize,
            callback=self._callback, finished_callback=finished,
        )  # fmt: skip

    def _callback(self, indata: Any, frames: int, time_info: Any, status: Any) -> None:
        # indata is a numpy view of PortAudio's buffer: copied once, into the ring.
        self._put(indata, bool(status.input_overflow))

    def start(self) -> None:
        self._stream.start()

    def close(self) -> None:
        try:
            self._stream.abort()
        finally:
            self._stream.close()


class _PyAudioInput:
    def __init__(self, pyaudio: Any, *, device: int, rate: int, blocksize: int,
                 put: PutFn, finished: Callable[[], None]) -> None:  # fmt: skip
        self._put = put
        self._continue = pyaudio.paContinue
        self._overflow = pyaudio.paInputOverflow
        self._pa = pyaudio.PyAudio()
        try:
            self._stream = self._pa.open(
                format=pyaudio.paInt16, channels=1, rate=rate, input=True,
                input_device_index=device, frames_per_buffer=blocksize,
                stream_callback=self._callback, start=False,
            )  # fmt: skip
        except BaseException:
            self._pa.terminate()
            raise

    def _callback(
        self, in_data: bytes, frame_count: int, time_info: Any, status: int
    ) -> tuple[None, int]:
        self._put(np.frombuffer(in_data, np.int16).reshape(-1, 1), bool(status & self._overflow))
        return None, self._continue

    def start(self) -> None:
        self._stream.start_stream()

    def close(self) -> None:
        try:
            self._stream.stop_stream()
            self._stream.close()
        finally:
            self._pa.terminate()


class Microphone:
    """Capture int16 mono from a PortAudio input device; an async context manager.

    ``device``: ``None`` for the default input, an index or a name (as for the sound-card
    sink). ``sample_rate``: asked of the device; when it refuses, its default rate is used if
    that is at least 24 kHz (the clone-sample minimum), else :class:`UsageError`. ``ring_ms``
    of audio can wait for the loop; ``timeout`` bounds every wait on the device.
    """

    def __init__(
        self,
        device: int | str | None = None,
        *,
        sample_rate: int = 24000,
        backend: str = "sounddevice",
        blocksize: int | None = None,
        ring_ms: float = 2000.0,
        timeout: float = 3.0,
    ) -> None:
        if backend not in BACKENDS:
            raise UsageError(f"unknown sound-card backend {backend!r}; choose one of {BACKENDS}")
        if sample_rate < MIN_SAMPLE_RATE:
            raise UsageError(f"sample_rate must be at least {MIN_SAMPLE_RATE} Hz for a clone "
                             f"sample, not {sample_rate}")  # fmt: skip
        if ring_ms <= 0 or timeout <= 0:
            raise UsageError("ring_ms and timeout must be > 0")
        self.device = device
        self.backend = backend
        self.requested_rate = sample_rate
        self.blocksize = blocksize
        self.ring_ms = ring_ms
        self.timeout = timeout
        # Filled in by open() (no I/O in __init__).
        self.device_info: DeviceInfo | None = None
        self.rate = 0
        self._stream: _SoundDeviceInput | _PyAudioInput | None = None
        self._ring = Ring(1, 1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._data_evt = asyncio.Event()
        # Shared with the callback (see Ring for why plain attributes suffice).
        self._wanted = False  # loop sets; callback clears before waking the loop
        self._finished = False  # PortAudio's finished callback sets it
        self._cb_frames = 0  # callback only
        self._cb_dropped = 0  # callback only
        self._cb_overflows = 0  # callback only

    async def __aenter__(self) -> Microphone:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Choose the device and rate, open the stream and start capturing."""
        if self._stream is not None:
            return
        module = import_backend(self.backend)
        self._loop = asyncio.get_running_loop()
        info, rate = await self._call(lambda: self._choose(module), "the input device list")
        self.device_info, self.rate = info, rate
        blocksize = rate // 50 if self.blocksize is None else self.blocksize
        self._ring = Ring(max(int(rate * self.ring_ms / 1000), 4 * max(blocksize, 1)), 1)

        def make() -> _SoundDeviceInput | _PyAudioInput:
            cls = _SoundDeviceInput if self.backend == "sounddevice" else _PyAudioInput
            return cls(module, device=info.index, rate=rate, blocksize=blocksize,
                       put=self._put, finished=self._on_finished)  # fmt: skip

        stream = await self._call(make, f"the input device {info.name!r} to open")
        try:
            await self._call(stream.start, f"the input device {info.name!r} to start")
        except BaseException:
            await self._call(stream.close, "the input stream to close")
            raise
        self._stream = stream
        log.debug("recording from %r at %d Hz, block %d", info.name, rate, blocksize)

    def _choose(self, module: Any) -> tuple[DeviceInfo, int]:
        info = select_device(list_devices(module, self.backend, "input"), self.device, "input")
        rate = negotiate_rate(
            self.requested_rate,
            supported=lambda r: probe_rate(module, self.backend, info, r, channels=1, kind="input"),
            default_rate=info.default_samplerate,
            forced=None,
        )
        if rate < MIN_SAMPLE_RATE:
            raise UsageError(
                f"input device {info.name!r} cannot record at {self.requested_rate} Hz and its "
                f"default rate is {rate} Hz; a clone sample needs at least {MIN_SAMPLE_RATE} Hz"
            )
        return info, rate

    async def read_into(self, out: PCM16) -> int:
        """Move the captured frames (up to ``len(out)``) into ``out``; wait for at least one.

        Raises :class:`DeviceError` when the device stopped or delivered nothing for
        ``timeout`` seconds (unplugged, or its sound server went away).
        """
        ring = self._ring
        while ring.level == 0:
            if self._stream is None:
                raise DeviceError("the microphone is not open")
            if self._finished:
                raise DeviceError(f"the input device {self._name()} stopped (disconnected?)")
            self._data_evt.clear()
            self._wanted = True
            if ring.level:  # arrived between the check and the flag: no wake-up coming
                break
            try:
                await asyncio.wait_for(self._data_evt.wait(), self.timeout)
            except TimeoutError:
                raise DeviceError(
                    f"the input device {self._name()} delivered no audio for "
                    f"{self.timeout:g} s (disconnected, or its sound server stopped?)"
                ) from None
            finally:
                self._wanted = False
        return ring.get(out.reshape(-1, 1))

    def stats(self) -> MicrophoneStats:
        return MicrophoneStats(self._cb_frames, self._cb_dropped, self._cb_overflows)

    async def aclose(self) -> None:
        """Stop and close the stream (idempotent); queued frames are discarded."""
        stream, self._stream = self._stream, None
        if stream is not None:
            await self._call(stream.close, "the input stream to close")

    def _name(self) -> str:
        return repr(self.device_info.name) if self.device_info else "(none)"

    async def _call(self, fn: Callable[[], Any], what: str) -> Any:
        """Run a blocking PortAudio call in a worker thread, bounded, errors translated."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn), self.timeout + 5.0)
        except TimeoutError:
            raise Timeout(what, self.timeout + 5.0) from None
        except (TtsStreamError, asyncio.CancelledError):
            raise
        except Exception as exc:  # PortAudioError, OSError, ValueError from the backends
            raise DeviceError(f"waiting for {what} failed: {exc}") from exc

    # -- PortAudio's audio thread -------------------------------------------------------

    def _put(self, block: PCM16, overflow: bool) -> None:
        """Copy one input block into the ring: no blocking, no lock, no allocation."""
        n = self._ring.put(block)
        frames = int(block.shape[0])
        self._cb_frames += frames
        if n < frames:
            self._cb_dropped += frames - n
        if overflow:
            self._cb_overflows += 1
        if self._wanted:
            self._wanted = False
            self._wake()

    def _on_finished(self) -> None:
        self._finished = True
        self._wake()

    def _wake(self) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(self._data_evt.set)


# -- files ------------------------------------------------------------------------------------


def trim_silence(samples: PCM16, rate: int, *, margin_s: float = _TRIM_MARGIN_S) -> PCM16:
    """``samples`` from ``margin_s`` before the first to ``margin_s`` after the last speech.

    Speech as the hard rules see it (:func:`~tts_stream.samples.speech_span`); with no
    speech at all, the samples are returned whole (the check will say why).
    """
    span = speech_span(samples, rate)
    if span is None:
        return samples
    start = max(0, int((span[0] - margin_s) * rate))
    end = min(samples.size, int((span[1] + margin_s) * rate))
    return samples[start:end]


def write_wav_atomic(path: str | os.PathLike[str], samples: PCM16, rate: int) -> Path:
    """Write a 16-bit mono WAV so that ``path`` is either absent, the old file, or complete.

    The data goes to a temporary file next to ``path``, is flushed to the disk, then renamed
    over ``path``. On any failure (a full disk, an interrupt) the temporary file is removed
    and the error raised as :class:`OSError` naming ``path``.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent or ".", prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            with wave.open(f, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(rate)
                w.writeframes(np.ascontiguousarray(samples, dtype="<i2").tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, f"cannot write {str(target)!r}: {exc.strerror}") from exc
        raise
    return target


# -- the recording session ----------------------------------------------------------------------


@dataclass(frozen=True)
class Recording:
    """What :func:`record_sample` produced: the file, its check, and how it was captured."""

    path: Path
    report: SampleReport
    sample_rate: int
    recorded_s: float  # captured, lead-in included
    duration_s: float  # written, after trimming
    status: LiveStatus  # the meter at the end
    stats: MicrophoneStats
    device: str


async def record_sample(
    path: str | os.PathLike[str],
    *,
    device: int | str | None = None,
    seconds: float | None = None,
    sample_rate: int = 24000,
    backend: str = "sounddevice",
    lead_in_s: float = 1.0,
    stop: asyncio.Event | None = None,
    on_status: Callable[[LiveStatus], None] | None = None,
    update_s: float = 0.1,
    device_timeout: float = 3.0,
) -> Recording:
    """Record a clone sample from a microphone into ``path`` (16-bit mono WAV) and check it.

    Records ``lead_in_s`` of silence (the noise floor), then until ``stop`` is set, ``seconds``
    have elapsed after the lead-in, or 20 s have. ``on_status`` is called with the meter's
    status every ``update_s`` seconds of audio; a device silent for ``device_timeout`` seconds
    raises :class:`DeviceError`. Leading and trailing silence is trimmed; the
    file is written atomically (:func:`write_wav_atomic`). Cancelling writes nothing.
    """
    lo, hi = RECOMMENDED_DURATION_S
    limit = hi if seconds is None else float(seconds)
    if not 0 < limit <= hi:
        raise UsageError(f"seconds must be in (0, {hi:.0f}], not {seconds}")
    target = Path(path)
    if not target.parent.is_dir():
        raise UsageError(f"cannot record to {str(target)!r}: no such directory")
    async with Microphone(device, sample_rate=sample_rate, backend=backend,
                          timeout=device_timeout) as mic:  # fmt: skip
        rate = mic.rate
        total = int((lead_in_s + limit) * rate)
        buf = np.zeros(total, np.int16)
        meter = Meter(rate, lead_in_s)
        every, next_update, pos = max(1, int(update_s * rate)), 0, 0
        while pos < total and not (stop is not None and stop.is_set()):
            n = await mic.read_into(buf[pos:])
            meter.feed(buf[pos : pos + n])
            pos += n
            if on_status is not None and pos >= next_update:
                next_update = pos + every
                on_status(meter.status())
        stats = mic.stats()
        name = mic.device_info.name if mic.device_info else "?"
    if stats.dropped:
        log.warning("%d frames were dropped: the event loop fell behind the device", stats.dropped)
    status = meter.status()
    if on_status is not None:
        on_status(status)
    captured = buf[int(lead_in_s * rate) : pos]  # the lead-in is never part of the sample
    kept = trim_silence(captured, rate)
    await asyncio.to_thread(write_wav_atomic, target, kept, rate)
    report = await asyncio.to_thread(inspect_sample, target)
    return Recording(
        path=target, report=report, sample_rate=rate, recorded_s=pos / rate,
        duration_s=kept.size / rate, status=status, stats=stats, device=name,
    )  # fmt: skip
