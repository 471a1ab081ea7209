"""Sound-card sink: PCM16 to a PortAudio output device, through sounddevice or PyAudio.

The asyncio side copies frames into a preallocated int16 ring buffer; PortAudio's audio
thread copies them out in its callback. The callback never blocks, never allocates audio
buffers and takes no lock: it plays silence when the ring runs dry (and counts an underrun),
applies a ~5 ms linear fade on :meth:`SoundCardSink.interrupt`, and wakes the event loop only
through ``loop.call_soon_threadsafe`` (space freed for a waiting writer; stream complete).
(PyAudio alone insists on a fresh ``bytes`` per callback: see ``_PyAudioStream``.) The stream
starts once ``prefill_ms`` of audio is queued, so the first audio plays smoothly, and stops
after every :meth:`~SoundCardSink.drain`, once the last sample has reached the DAC (the next
write prefills again).

When the device cannot open the stream's rate, it is opened at its default rate and the audio
is resampled with one stateful ``soxr.ResampleStream`` (no per-chunk pops; float32, so the
output is deterministic and independent of the chunking). Both backends share the ring and
all the logic; they are thin adapters around PortAudio's callback API. The ring, the device
listing and the backend import live in :mod:`tts_stream.portaudio`, shared with the
recorder. ``sounddevice``/``pyaudio`` are imported lazily: a missing package or a missing
PortAudio library raises :class:`~tts_stream.errors.MissingDependency` naming what to install.

Boundary: imports ``tts_stream.audio``, ``tts_stream.errors``, ``tts_stream.portaudio`` and the
shared sink base only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import soxr

from tts_stream.audio import PCM16, AudioFormat, SinkStats
from tts_stream.errors import DeviceError, Timeout, TtsStreamError, UsageError
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

from ._base import BaseSink

__all__ = [
    "BACKENDS",
    "DeviceInfo",
    "SoundCardSink",
    "float_to_pcm16",
    "list_output_devices",
    "negotiate_rate",
    "select_device",
]

log = logging.getLogger(__name__)

Backend = Literal["sounddevice", "pyaudio"]

# The callback signals the end of the stream with this return value (True = complete).
FillFn = Callable[[npt.NDArray[np.int16], int, float, bool], bool]


def list_output_devices(*, backend: Backend | str = "sounddevice") -> list[DeviceInfo]:
    """Every PortAudio device with at least one output channel (for ``tts-stream devices``)."""
    return list_devices(import_backend(backend), backend, "output")


# -- backend adapters ---------------------------------------------------------------------


class _Stream(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...  # blocks until the buffers handed to PortAudio have played

    def abort(self) -> None: ...

    def close(self) -> None: ...


def _dac_delay(dac_time: float, current_time: float) -> float:
    # PortAudio's stream clock has its own epoch: only the difference is meaningful. Some
    # host APIs report 0 for outputBufferDacTime; then the callback time is the estimate.
    if dac_time > 0.0 and current_time > 0.0 and dac_time >= current_time:
        return dac_time - current_time
    return 0.0


class _SoundDeviceStream:
    """sounddevice adapter: ``OutputStream`` in callback mode, int16, fixed block size."""

    def __init__(
        self, sd: Any, *, device: int, rate: int, channels: int, blocksize: int, fill: FillFn
    ) -> None:
        self._stop_exc = sd.CallbackStop
        self._fill = fill
        self._stream = sd.OutputStream(
            device=device,
            samplerate=rate,
            channels=channels,
            dtype="int16",
            blocksize=blocksize,
            callback=self._callback,
        )

    def _callback(self, outdata: Any, frames: int, time_info: Any, status: Any) -> None:
        # outdata is a numpy view of PortAudio's own buffer: we write into it in place.
        delay = _dac_delay(time_info.outputBufferDacTime, time_info.currentTime)
        if self._fill(outdata, frames, delay, bool(status.output_underflow)):
            raise self._stop_exc  # paComplete: PortAudio plays this block, then finishes

    def start(self) -> None:
        self._stream.start()

    def stop(self) -> None:
        self._stream.stop()

    def abort(self) -> None:
        self._stream.abort()

    def close(self) -> None:
        self._stream.close()


class _PyAudioStream:
    """PyAudio adapter: ``PyAudio.open(stream_callback=...)``.

    PyAudio insists on a ``bytes`` object as the callback's result (a bytearray or a read-only
    memoryview is refused), so the one allocation per callback this sink cannot avoid is
    ``out.tobytes()``: the block is assembled in a preallocated array, then copied once.
    """

    def __init__(
        self, pyaudio: Any, *, device: int, rate: int, channels: int, blocksize: int, fill: FillFn
    ) -> None:
        self._pa_mod = pyaudio
        self._fill = fill
        self._continue = pyaudio.paContinue
        self._complete = pyaudio.paComplete
        self._underflow_flag = pyaudio.paOutputUnderflow
        self._out = np.zeros((max(blocksize, 4096), channels), dtype=np.int16)
        self._pa = pyaudio.PyAudio()
        try:
            self._stream = self._pa.open(
                format=pyaudio.paInt16,
                channels=channels,
                rate=rate,
                output=True,
                output_device_index=device,
                frames_per_buffer=blocksize,
                stream_callback=self._callback,
                start=False,
            )
        except BaseException:
            self._pa.terminate()
            raise

    def _callback(
        self, in_data: Any, frame_count: int, time_info: dict[str, float], status: int
    ) -> tuple[bytes, int]:
        out = self._out
        if frame_count > out.shape[0]:  # never with a fixed block size; grow once
            self._out = out = np.zeros((frame_count, out.shape[1]), dtype=np.int16)
        block = out[:frame_count]
        delay = _dac_delay(
            time_info.get("output_buffer_dac_time", 0.0), time_info.get("current_time", 0.0)
        )
        done = self._fill(block, frame_count, delay, bool(status & self._underflow_flag))
        return block.tobytes(), self._complete if done else self._continue

    def start(self) -> None:
        self._stream.start_stream()

    def stop(self) -> None:
        self._stream.stop_stream()

    def abort(self) -> None:
        # PyAudio exposes no abort; stopping waits for at most one device buffer.
        self._stream.stop_stream()

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._pa.terminate()


def float_to_pcm16(x: npt.NDArray[np.float32]) -> PCM16:
    """Float samples in [-1, 1) to int16: scaled by 32768, rounded to nearest, clipped."""
    y: npt.NDArray[np.float32] = np.rint(x * np.float32(32768))
    np.clip(y, -32768, 32767, out=y)
    return y.astype(np.int16)


# -- the sink -----------------------------------------------------------------------------


class SoundCardSink(BaseSink):
    """Play the stream on a sound card through PortAudio.

    ``device``: ``None`` for the default output, an index, or a name (exact, else a unique
    case-insensitive substring; the error lists the output devices). ``backend``:
    ``"sounddevice"`` (recommended: needs only the ``libportaudio2`` runtime) or ``"pyaudio"``.

    ``prefill_ms`` of audio is queued before the stream starts (smooth first audio vs. start
    latency); ``ring_ms`` is the ring buffer (``write`` awaits while it is full: back-pressure
    to the fan-out); ``blocksize`` is the frames per callback (default 20 ms; ``0`` lets
    PortAudio choose). ``device_rate`` forces the device's rate (the stream is resampled with
    soxr); by default the stream's own rate is used when the device accepts it, else the
    device's default rate. ``fade_ms`` is the fade-out applied by :meth:`interrupt` (0: cut).
    ``tail_ms`` of silence is played after the last sample before the stream stops (some
    paths, ALSA's pulse plugin among them, drop what they still hold when a stream stops).
    ``timeout`` bounds each wait on the device beyond the audio's own duration.

    :meth:`drain` returns once the last sample has reached the DAC (PortAudio's timing) and
    the stream is stopped; the next :meth:`write` prefills again. :meth:`interrupt` fades out
    what plays next over ``fade_ms``, drops the rest of the queue (and any ``write`` still
    waiting on a full ring), stops the stream, and returns the samples played so far.

    ``stats()``: ``samples_played`` counts samples the callback handed to PortAudio (all of
    them have played once :meth:`drain` or :meth:`interrupt` returns); ``underruns`` counts
    callbacks that had to play silence mid-stream plus PortAudio's output-underflow flags;
    ``first_sample_at`` is the ``time.monotonic()`` at which the first sample reached the DAC:
    the callback's monotonic time plus PortAudio's ``outputBufferDacTime - currentTime``
    (the callback time alone when the host API reports no DAC time).
    """

    def __init__(
        self,
        device: int | str | None = None,
        *,
        backend: Backend | str = "sounddevice",
        prefill_ms: float = 80.0,
        ring_ms: float = 2000.0,
        blocksize: int | None = None,
        device_rate: int | None = None,
        fade_ms: float = 5.0,
        tail_ms: float = 100.0,
        timeout: float = 10.0,
        name: str | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise UsageError(f"unknown sound-card backend {backend!r}; choose one of {BACKENDS}")
        if min(prefill_ms, fade_ms, tail_ms) < 0 or ring_ms <= 0 or timeout <= 0:
            raise UsageError("prefill_ms/fade_ms/tail_ms must be >= 0, ring_ms and timeout > 0")
        if blocksize is not None and blocksize < 0:
            raise UsageError("blocksize must be >= 0")
        where = "default" if device is None else device
        super().__init__(name=name or f"soundcard:{backend}:{where}")
        self.device = device
        self.backend = backend
        self.prefill_ms = prefill_ms
        self.ring_ms = ring_ms
        self.blocksize = blocksize
        self.fade_ms = fade_ms
        self.tail_ms = tail_ms
        self._forced_rate = device_rate
        self._timeout = timeout
        # Filled in by _open (no I/O in __init__).
        self.device_info: DeviceInfo | None = None
        self.device_rate: int | None = None
        self._stream: _Stream | None = None
        self._resampler: Any = None
        self._ring = Ring(1, 1)
        self._prefill = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._space_evt = asyncio.Event()
        self._done_evt = asyncio.Event()
        self._ctl = asyncio.Lock()
        self._running = False
        self._epoch = 0
        self._interrupting = False
        # Shared with the audio callback (see Ring for why plain attributes suffice). Each
        # is written by one side only, except where noted.
        self._draining = False  # loop writes; callback reads
        self._fade_requested = False  # loop sets; callback clears when the fade is done
        self._space_wanted = 0  # loop sets; callback clears before waking the loop
        self._cb_played = 0  # callback only: frames handed to PortAudio (device rate)
        self._cb_underruns = 0  # callback only
        self._cb_first_at: float | None = None  # callback only
        self._cb_end_at = 0.0  # callback only: when the last sample reaches the DAC
        self._cb_completed = False  # callback sets it when it completes the stream
        self._cb_tail = 0  # callback only: frames of silence played since the ring emptied
        self._cb_dropped = 0  # callback only: frames dropped at the end of a fade
        self._tail_frames = 0
        self._cb_rate = 1.0  # device rate, for the callback's arithmetic
        self._dropped_dev = 0  # loop only, while no callback runs or for unqueued frames
        # Fade state and scratch buffers, preallocated in _open (callback only).
        self._fade_total = 0
        self._fade_pos = 0
        self._ramp_idx = np.zeros(0, dtype=np.float32)
        self._gain = np.zeros(0, dtype=np.float32)
        self._scratch = np.zeros((0, 1), dtype=np.float32)

    # -- lifecycle hooks (BaseSink) -------------------------------------------------------

    async def _open(self, fmt: AudioFormat) -> None:
        module = import_backend(self.backend)
        loop = asyncio.get_running_loop()
        self._loop = loop
        info, rate = await self._call(
            lambda: self._choose_device(module, fmt), "the audio device list"
        )
        self.device_info, self.device_rate = info, rate
        self._cb_rate = float(rate)
        self._tail_frames = int(rate * self.tail_ms / 1000)
        ch = fmt.channels
        if rate != fmt.sample_rate:
            # One stateful resampler for the whole stream: resampling chunk by chunk with
            # fresh state would click at every chunk boundary (peers.md §3).
            # float32, not int16: soxr dithers int16 output with random noise, so the same
            # input would never play the same samples twice; float32 output is deterministic
            # and independent of how the stream is cut into chunks.
            self._resampler = soxr.ResampleStream(
                fmt.sample_rate, rate, ch, dtype="float32", quality="HQ"
            )
            log.info("%s: device %r opened at %d Hz, resampling from %d Hz",
                     self.name, info.name, rate, fmt.sample_rate)
        blocksize = rate // 50 if self.blocksize is None else self.blocksize
        capacity = max(int(rate * self.ring_ms / 1000), 2 * max(blocksize, 1))
        self._ring = Ring(capacity, ch)
        # Never wait for more than the ring can hold minus one block, or the stream would
        # never start.
        self._prefill = min(int(rate * self.prefill_ms / 1000), capacity - max(blocksize, 1))
        ramp = int(rate * self.fade_ms / 1000)  # 0: cut without a fade
        self._ramp_idx = np.arange(ramp, dtype=np.float32)
        self._gain = np.zeros(ramp, dtype=np.float32)
        self._scratch = np.zeros((ramp, ch), dtype=np.float32)

        def make() -> _Stream:
            cls = _SoundDeviceStream if self.backend == "sounddevice" else _PyAudioStream
            return cls(
                module, device=info.index, rate=rate, channels=ch, blocksize=blocksize,
                fill=self._fill,
            )

        self._stream = await self._call(make, f"the audio device {info.name!r} to open")
        log.debug("%s: opened %r at %d Hz, ring %d frames, prefill %d, block %d",
                  self.name, info.name, rate, capacity, self._prefill, blocksize)

    def _choose_device(self, module: Any, fmt: AudioFormat) -> tuple[DeviceInfo, int]:
        info = select_device(list_devices(module, self.backend, "output"), self.device)
        if info.max_output_channels < fmt.channels:
            raise UsageError(
                f"device {info.name!r} has {info.max_output_channels} output channel(s), "
                f"the stream needs {fmt.channels}"
            )
        rate = negotiate_rate(
            fmt.sample_rate,
            supported=lambda r: probe_rate(
                module, self.backend, info, r, channels=fmt.channels, kind="output"
            ),
            default_rate=info.default_samplerate,
            forced=self._forced_rate,
        )
        return info, rate

    async def _write(self, samples: PCM16) -> None:
        ch = self.format.channels
        if self._interrupting:
            # Audio of the utterance being interrupted: drop it rather than play it late.
            self._dropped_dev += self._to_device(int(samples.size) // ch)
            return
        data = samples.reshape(-1, ch)
        if self._resampler is not None:
            data = self._resample(data, last=False)
        await self._push(data)

    def _resample(self, data: npt.NDArray[np.int16], *, last: bool) -> npt.NDArray[np.int16]:
        ch = data.shape[1]
        x = data.astype(np.float32) * np.float32(1 / 32768)
        y: npt.NDArray[np.float32] = self._resampler.resample_chunk(
            x if ch > 1 else x[:, 0], last=last
        )
        return float_to_pcm16(y).reshape(-1, ch)

    async def _drain(self) -> None:
        if self._resampler is not None and not self._interrupting:
            tail = self._resample(np.zeros((0, self.format.channels), np.int16), last=True)
            self._resampler.clear()
            await self._push(tail)
        if not self._running:
            if self._ring.level == 0:
                self._sync_counters()
                return
            # Draining from the first callback on: a fast device (the ALSA null plugin runs
            # flat out) must not play silence between start() and the flag.
            await self._start(draining=True)
        else:
            self._draining = True
        budget = self._ring.level / (self.device_rate or 1) + self._timeout
        if not await self._completed(budget):
            await self._stop(abort=True)
            raise Timeout(f"{self.name} to play its queued audio", budget)
        await self._until_played()
        await self._stop()
        self._sync_counters()

    async def _interrupt(self) -> int:
        self._epoch += 1
        self._interrupting = True
        self._space_evt.set()  # a writer blocked on a full ring wakes up and drops the rest
        try:
            if self._resampler is not None:
                self._resampler.clear()
            if self._running:
                self._fade_requested = True
                if not await self._completed(self._timeout):
                    log.warning("%s: no callback for %.1f s, aborting", self.name, self._timeout)
                    await self._stop(abort=True)
                await self._until_played()
                await self._stop()
            # No callback runs now: the loop may move the consumer index.
            ring = self._ring
            self._dropped_dev += ring.level
            ring.tail = ring.head
            self._fade_requested = False
            self._fade_total = self._fade_pos = 0
        finally:
            self._interrupting = False
        self._sync_counters()
        return self._samples_played

    async def _release(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        try:
            if self._running:
                self._running = False
                await self._call(stream.abort, "the audio stream to abort")
        finally:
            await self._call(stream.close, "the audio stream to close")
            self._sync_counters()

    def stats(self) -> SinkStats:
        """A snapshot of the counters, refreshed from the audio callback's."""
        self._sync_counters()
        return super().stats()

    # -- producer side (event loop) -------------------------------------------------------

    async def _push(self, data: npt.NDArray[np.int16]) -> None:
        ring, epoch, pos, total = self._ring, self._epoch, 0, data.shape[0]
        while pos < total:
            if epoch != self._epoch:
                self._dropped_dev += total - pos  # interrupted while waiting for space
                return
            pos += ring.put(data[pos:])
            if not self._running and (ring.level >= self._prefill or pos < total):
                await self._start()
            if pos < total:
                await self._wait_space(min(total - pos, ring.capacity // 2))

    async def _wait_space(self, frames: int) -> None:
        self._space_evt.clear()
        self._space_wanted = frames
        if self._ring.free >= frames:  # freed between the put and now: no wake-up coming
            self._space_wanted = 0
            return
        budget = self._ring.capacity / (self.device_rate or 1) + self._timeout
        try:
            await asyncio.wait_for(self._space_evt.wait(), budget)
        except TimeoutError:
            raise Timeout(f"{self.name} to consume queued audio", budget) from None
        finally:
            self._space_wanted = 0

    async def _start(self, *, draining: bool = False) -> None:
        async with self._ctl:
            if self._running or self._stream is None:
                return
            self._draining = draining
            # Cleared only here, with no stream running: every waiter of the previous run
            # has seen its completion (the flag stays set until the next start).
            self._cb_completed = False
            self._cb_tail = 0
            self._done_evt.clear()
            self._running = True  # before start(): the first callback may run at once
            try:
                await self._call(self._stream.start, "the audio stream to start")
            except BaseException:
                self._running = False
                raise

    async def _stop(self, *, abort: bool = False) -> None:
        async with self._ctl:
            if not self._running or self._stream is None:
                return
            try:
                fn = self._stream.abort if abort else self._stream.stop
                await self._call(fn, "the audio stream to stop")
            finally:
                self._running = False
                self._draining = False

    async def _completed(self, budget: float) -> bool:
        """Wait (at most ``budget`` s) until the callback has completed the running stream.

        The flag is the truth; the event is only a wake-up (a late one from a previous run
        may arrive after a restart), so it is cleared and the flag re-checked before waiting.
        """
        deadline = time.monotonic() + budget
        while not self._cb_completed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._done_evt.clear()
            if self._cb_completed:  # set between the check and the clear: no wake-up lost
                break
            try:
                await asyncio.wait_for(self._done_evt.wait(), remaining)
            except TimeoutError:
                return self._cb_completed
        return True

    async def _until_played(self) -> None:
        # Pa_StopStream does not wait for the device's own buffer everywhere (through ALSA's
        # pulse plugin the last ~50 ms were cut off), so wait until the DAC time of the last
        # sample that the completing callback computed. A deadline, not a guess: time.monotonic
        # plus PortAudio's outputBufferDacTime - currentTime.
        delay = self._cb_end_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(min(delay, self._timeout))

    async def _call(self, fn: Callable[[], Any], what: str) -> Any:
        """Run a blocking PortAudio call in a worker thread, bounded, errors translated."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn), self._timeout)
        except TimeoutError:
            raise Timeout(what, self._timeout) from None
        except (TtsStreamError, asyncio.CancelledError):
            raise
        except Exception as exc:  # PortAudioError, OSError, ValueError from the backends
            raise DeviceError(f"{self.name}: waiting for {what} failed: {exc}") from exc

    def _to_device(self, frames: int) -> int:
        rate = self.device_rate or self.format.sample_rate
        return frames * rate // self.format.sample_rate

    def _from_device(self, frames: int) -> int:
        rate = self.device_rate or self.format.sample_rate
        return frames * self.format.sample_rate // rate

    def _sync_counters(self) -> None:
        if self._fmt is None:
            return
        self._samples_played = min(self._from_device(self._cb_played), self._samples_written)
        self._dropped_samples = self._from_device(self._dropped_dev + self._cb_dropped)
        self._underruns = self._cb_underruns
        self._first_sample_at = self._cb_first_at

    # -- consumer side (PortAudio's audio thread) -----------------------------------------

    def _wake(self, callback: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _fill(
        self, out: npt.NDArray[np.int16], frames: int, dac_delay: float, underflow: bool
    ) -> bool:
        """Fill ``out`` (``frames`` x channels); return True to complete the stream.

        Runs in PortAudio's thread: no blocking calls, no locks, no audio-sized allocation
        (the slices below are views into preallocated arrays).
        """
        ring = self._ring
        tail = ring.tail
        avail = ring.head - tail
        if self._fade_requested:
            return self._fill_fade(out, frames, tail, avail, dac_delay)
        n = avail if avail < frames else frames
        if n:
            self._cb_tail = 0
            ring.copy_out(out, tail, n)
            ring.tail = tail + n  # publish after the copy: the producer may reuse the slots
            self._cb_played += n
            if self._cb_first_at is None:
                self._cb_first_at = time.monotonic() + dac_delay
        done = False
        if n < frames:
            out[n:] = 0
            if self._draining:
                # Play `tail_ms` of silence after the last sample before completing: some
                # paths (ALSA's pulse plugin) drop what is still buffered when the stream
                # stops, so what they drop must be silence.
                self._cb_tail += frames - n
                done = self._cb_tail >= self._tail_frames
            else:
                underflow = True  # the ring ran dry mid-stream: silence was played
        if underflow:
            self._cb_underruns += 1
        wanted = self._space_wanted
        if wanted and ring.capacity - (ring.head - ring.tail) >= wanted:
            self._space_wanted = 0
            self._wake(self._space_evt.set)
        if done:
            self._cb_end_at = time.monotonic() + dac_delay + n / self._cb_rate
            self._cb_completed = True
            self._wake(self._done_evt.set)
        return done

    def _fill_fade(
        self, out: npt.NDArray[np.int16], frames: int, tail: int, avail: int, dac_delay: float
    ) -> bool:
        # A linear ramp from full gain to 0 over the next `fade_ms` of queued audio (or what
        # is queued, if less), spread over as many callbacks as it takes; then the rest of the
        # queue is dropped and the stream completes. Gains are computed in place in
        # preallocated buffers: g[i] = 1 - (pos + i + 1) / total, so the last sample is 0.
        ring = self._ring
        if self._fade_total == 0:
            self._fade_total = min(self._gain.shape[0], avail)
            self._fade_pos = 0
        total, pos = self._fade_total, self._fade_pos
        n = min(frames, total - pos)
        if n > 0:
            g = self._gain[:n]
            np.add(self._ramp_idx[:n], pos + 1, out=g)
            np.multiply(g, -1.0 / total, out=g)
            np.add(g, 1.0, out=g)
            ring.copy_out(out, tail, n)
            s = self._scratch[:n]
            np.multiply(out[:n], g[:, None], out=s)
            np.copyto(out[:n], s, casting="unsafe")
            self._cb_played += n
            self._fade_pos = pos + n
        out[n:] = 0
        if self._fade_pos < total:
            ring.tail = tail + n
            return False
        # Fade complete: drop the rest of the queue, then finish like a drain (a tail of
        # silence, so that a path which drops its buffer on stop only drops silence).
        head = ring.head
        self._cb_dropped += head - (tail + n)
        ring.tail = head
        self._fade_requested = False
        self._fade_total = 0
        self._draining = True  # the loop is waiting for completion; _stop() resets it
        self._cb_tail = frames - n
        if self._cb_tail < self._tail_frames:
            return False
        self._cb_end_at = time.monotonic() + dac_delay + n / self._cb_rate
        self._cb_completed = True
        self._wake(self._done_evt.set)
        return True
