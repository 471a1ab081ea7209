"""The sound card's audio-thread side: the callback that plays the ring, and the streams.

:class:`Playback` is everything PortAudio's audio thread touches: the preallocated
:class:`~tts_stream.portaudio.Ring` the event loop fills, the flags the loop sets (draining,
fade requested, space wanted), the counters only the callback writes, and :meth:`Playback.fill`,
the callback itself. It never blocks, never allocates audio buffers and takes no lock: it plays
silence when the ring runs dry (and counts an underrun), fades out over a preallocated ramp
when asked, and tells the loop about freed space and the end of the stream only through the
two callables it was given (the sink passes ``loop.call_soon_threadsafe`` wrappers).
``_SoundDeviceStream`` and ``_PyAudioStream`` are the thin adapters that run ``fill`` inside
each backend's callback API (:func:`open_stream`).

Boundary: numpy and :mod:`tts_stream.portaudio` only; no asyncio (the loop side, device
selection and resampling are in :mod:`sinks.soundcard`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from tts_stream.portaudio import Ring

__all__ = ["FillFn", "Playback", "Stream", "open_stream"]

# The callback signals the end of the stream with this return value (True = complete).
FillFn = Callable[[npt.NDArray[np.int16], int, float, bool], bool]


class Playback:
    """The ring and the state shared between the event loop and the audio callback.

    Each attribute is written by one side only, except where noted (see :class:`Ring` for
    why plain attributes suffice). ``rate`` is the device rate; ``tail_frames`` the silence
    played after the last sample before a drain completes; ``ramp`` the fade length in frames
    (0: an interrupt cuts without a fade). ``on_space`` and ``on_done`` are called from the
    audio thread and must only schedule work on the loop.
    """

    def __init__(
        self,
        frames: int,
        channels: int,
        *,
        rate: float,
        tail_frames: int,
        ramp: int,
        on_space: Callable[[], None],
        on_done: Callable[[], None],
    ) -> None:
        self.ring = Ring(frames, channels)
        self.rate = rate
        self.tail_frames = tail_frames
        self._on_space = on_space
        self._on_done = on_done
        self.draining = False  # loop writes; callback reads (and sets it after a fade)
        self.fade_requested = False  # loop sets; callback clears when the fade is done
        self.space_wanted = 0  # loop sets; callback clears before waking the loop
        self.played = 0  # callback only: frames handed to PortAudio (device rate)
        self.underruns = 0  # callback only
        self.first_at: float | None = None  # callback only: monotonic time at the DAC
        self.end_at = 0.0  # callback only: when the last sample reaches the DAC
        self.completed = False  # callback sets it when it completes the stream
        self.tail = 0  # callback only: frames of silence played since the ring emptied
        self.dropped = 0  # callback only: frames dropped at the end of a fade
        # Fade state and scratch buffers, preallocated here (callback only).
        self._fade_total = 0
        self._fade_pos = 0
        self._ramp_idx = np.arange(ramp, dtype=np.float32)
        self._gain = np.zeros(ramp, dtype=np.float32)
        self._scratch = np.zeros((ramp, channels), dtype=np.float32)

    def restart(self, *, draining: bool) -> None:
        """Loop, with no stream running: reset the per-run flags before ``start()``."""
        self.draining = draining
        self.completed = False
        self.tail = 0

    def discard(self) -> int:
        """Loop, with no stream running: drop what is queued and any fade; return the frames."""
        ring = self.ring
        dropped = ring.level
        ring.tail = ring.head
        self.fade_requested = False
        self._fade_total = self._fade_pos = 0
        return dropped

    # -- the callback (PortAudio's audio thread) ------------------------------------------

    def fill(
        self, out: npt.NDArray[np.int16], frames: int, dac_delay: float, underflow: bool
    ) -> bool:
        """Fill ``out`` (``frames`` x channels); return True to complete the stream.

        Runs in PortAudio's thread: no blocking calls, no locks, no audio-sized allocation
        (the slices below are views into preallocated arrays).
        """
        ring = self.ring
        tail = ring.tail
        avail = ring.head - tail
        if self.fade_requested:
            return self._fill_fade(out, frames, tail, avail, dac_delay)
        n = avail if avail < frames else frames
        if n:
            self.tail = 0
            ring.copy_out(out, tail, n)
            ring.tail = tail + n  # publish after the copy: the producer may reuse the slots
            self.played += n
            if self.first_at is None:
                self.first_at = time.monotonic() + dac_delay
        done = False
        if n < frames:
            out[n:] = 0
            if self.draining:
                # Play `tail_ms` of silence after the last sample before completing: some
                # paths (ALSA's pulse plugin) drop what is still buffered when the stream
                # stops, so what they drop must be silence.
                self.tail += frames - n
                done = self.tail >= self.tail_frames
            else:
                underflow = True  # the ring ran dry mid-stream: silence was played
        if underflow:
            self.underruns += 1
        wanted = self.space_wanted
        if wanted and ring.capacity - (ring.head - ring.tail) >= wanted:
            self.space_wanted = 0
            self._on_space()
        if done:
            self._complete(dac_delay, n)
        return done

    def _fill_fade(
        self, out: npt.NDArray[np.int16], frames: int, tail: int, avail: int, dac_delay: float
    ) -> bool:
        # A linear ramp from full gain to 0 over the next `fade_ms` of queued audio (or what
        # is queued, if less), spread over as many callbacks as it takes; then the rest of the
        # queue is dropped and the stream completes. Gains are computed in place in
        # preallocated buffers: g[i] = 1 - (pos + i + 1) / total, so the last sample is 0.
        ring = self.ring
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
            self.played += n
            self._fade_pos = pos + n
        out[n:] = 0
        if self._fade_pos < total:
            ring.tail = tail + n
            return False
        # Fade complete: drop the rest of the queue, then finish like a drain (a tail of
        # silence, so that a path which drops its buffer on stop only drops silence).
        head = ring.head
        self.dropped += head - (tail + n)
        ring.tail = head
        self.fade_requested = False
        self._fade_total = 0
        self.draining = True  # the loop is waiting for completion; its stop resets it
        self.tail = frames - n
        if self.tail < self.tail_frames:
            return False
        self._complete(dac_delay, n)
        return True

    def _complete(self, dac_delay: float, last: int) -> None:
        self.end_at = time.monotonic() + dac_delay + last / self.rate
        self.completed = True
        self._on_done()


# -- backend adapters ---------------------------------------------------------------------


class Stream(Protocol):
    """What the sink needs of an open PortAudio output stream."""

    def start(self) -> None: ...

    def stop(self) -> None: ...  # blocks until the buffers handed to PortAudio have played

    def abort(self) -> None: ...

    def close(self) -> None: ...


def open_stream(
    module: Any, backend: str, *, device: int, rate: int, channels: int, blocksize: int,
    fill: FillFn,
) -> Stream:  # fmt: skip
    """An int16 output stream of the imported ``backend`` whose callback is ``fill``."""
    cls = _SoundDeviceStream if backend == "sounddevice" else _PyAudioStream
    return cls(module, device=device, rate=rate, channels=channels, blocksize=blocksize,
               fill=fill)  # fmt: skip


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
