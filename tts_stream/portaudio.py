"""PortAudio plumbing shared by the sound-card sink (output) and the recorder (input).

What both directions need and nothing else: the lazy import of a backend (``sounddevice`` or
``pyaudio``) with one install line when it or the PortAudio library is missing, device
listing and selection for either direction, the rate negotiation, and the preallocated
single-producer/single-consumer :class:`Ring` that lets a PortAudio callback exchange audio
with the event loop without blocking, locking or allocating. For playback the loop produces
and the callback consumes (``sinks/soundcard.py``); for capture it is the other way round
(``tts_stream/record.py``).

Boundary: numpy and ``tts_stream.errors`` only; the backends are imported on first use.
``sinks`` may import this module (tests/test_boundaries.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from tts_stream.errors import MissingDependency, UsageError

__all__ = [
    "BACKENDS",
    "DeviceInfo",
    "Kind",
    "Ring",
    "import_backend",
    "list_devices",
    "negotiate_rate",
    "probe_rate",
    "select_device",
]

Backend = Literal["sounddevice", "pyaudio"]
Kind = Literal["output", "input"]
BACKENDS: tuple[str, ...] = ("sounddevice", "pyaudio")

_INSTALL = {
    "sounddevice": "pip install 'tts-stream[sounddevice]'",
    "pyaudio": "pip install 'tts-stream[pyaudio]' (building it needs apt-get install "
    "portaudio19-dev)",
}
_PORTAUDIO_LIB = "apt-get install libportaudio2"


@dataclass(frozen=True)
class DeviceInfo:
    """One PortAudio device, as listed by :func:`list_devices`."""

    index: int
    name: str
    max_output_channels: int
    default_samplerate: float
    is_default: bool  # the default device of the direction it was listed for
    max_input_channels: int = 0


def import_backend(backend: str) -> Any:
    """Import the backend module, translating what is missing into one install line."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown sound-card backend {backend!r}; choose one of {BACKENDS}")
    try:
        if backend == "sounddevice":
            import sounddevice as module
        else:
            import pyaudio as module
    except ModuleNotFoundError as exc:
        raise MissingDependency(f"{backend} is not installed: {_INSTALL[backend]}") from exc
    except (ImportError, OSError) as exc:
        # sounddevice raises OSError("PortAudio library not found"); PyAudio's extension
        # module fails to load with ImportError when libportaudio.so.2 is absent.
        raise MissingDependency(
            f"{backend} cannot load the PortAudio library ({exc}): {_PORTAUDIO_LIB}"
        ) from exc
    return module


# -- device listing and selection ---------------------------------------------------------


def list_devices(module: Any, backend: str, kind: Kind) -> list[DeviceInfo]:
    """Every device of an imported backend with at least one channel in direction ``kind``."""
    if backend == "sounddevice":
        return _sd_devices(module, kind)
    pa = module.PyAudio()
    try:
        return _pa_devices(pa, kind)
    finally:
        pa.terminate()


def _sd_devices(sd: Any, kind: Kind) -> list[DeviceInfo]:
    try:
        default = int(sd.query_devices(kind=kind)["index"])
    except sd.PortAudioError:
        default = -1  # no default device of this kind
    out = []
    for d in sd.query_devices():
        info = DeviceInfo(
            index=int(d["index"]),
            name=str(d["name"]),
            max_output_channels=int(d["max_output_channels"]),
            default_samplerate=float(d["default_samplerate"]),
            is_default=int(d["index"]) == default,
            max_input_channels=int(d["max_input_channels"]),
        )
        if _channels(info, kind) > 0:
            out.append(info)
    return out


def _pa_devices(pa: Any, kind: Kind) -> list[DeviceInfo]:
    try:
        get_default = (
            pa.get_default_output_device_info if kind == "output"
            else pa.get_default_input_device_info
        )  # fmt: skip
        default = int(get_default()["index"])
    except OSError:
        default = -1
    devices = []
    for i in range(pa.get_device_count()):
        d = pa.get_device_info_by_index(i)
        info = DeviceInfo(
            index=int(d["index"]),
            name=str(d["name"]),
            max_output_channels=int(d["maxOutputChannels"]),
            default_samplerate=float(d["defaultSampleRate"]),
            is_default=int(d["index"]) == default,
            max_input_channels=int(d["maxInputChannels"]),
        )
        if _channels(info, kind) > 0:
            devices.append(info)
    return devices


def _channels(info: DeviceInfo, kind: Kind) -> int:
    return info.max_output_channels if kind == "output" else info.max_input_channels


def _describe(devices: list[DeviceInfo], kind: Kind) -> str:
    if not devices:
        return f"no {kind} devices (is an ALSA/PulseAudio device configured?)"
    return ", ".join(
        f"{d.index} {d.name!r}" + (" (default)" if d.is_default else "") for d in devices
    )


def select_device(
    devices: list[DeviceInfo], device: int | str | None, kind: Kind = "output"
) -> DeviceInfo:
    """Pick ``device`` (index, exact name, or unique case-insensitive substring) or the default."""
    if device is None:
        for d in devices:
            if d.is_default:
                return d
        raise UsageError(
            f"there is no default {kind} device; available: {_describe(devices, kind)}"
        )
    if isinstance(device, int):
        for d in devices:
            if d.index == device:
                return d
        raise UsageError(
            f"no {kind} device with index {device}; available: {_describe(devices, kind)}"
        )
    wanted = device.casefold()
    exact = [d for d in devices if d.name.casefold() == wanted]
    if exact:
        return exact[0]
    matches = [d for d in devices if wanted in d.name.casefold()]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UsageError(
            f"{kind} device name {device!r} is ambiguous: {_describe(matches, kind)}; "
            "give an index or a longer name"
        )
    raise UsageError(f"no {kind} device matches {device!r}; available: {_describe(devices, kind)}")


def probe_rate(
    module: Any, backend: str, device: DeviceInfo, rate: int, *, channels: int, kind: Kind
) -> bool:
    """Whether the device can open an int16 stream at ``rate`` (PortAudio's format check)."""
    if backend == "sounddevice":
        check = module.check_output_settings if kind == "output" else module.check_input_settings
        try:
            check(device=device.index, channels=channels, dtype="int16", samplerate=rate)
        except module.PortAudioError:
            return False
        return True
    pa = module.PyAudio()
    try:
        return bool(
            pa.is_format_supported(rate, **{
                f"{kind}_device": device.index,
                f"{kind}_channels": channels,
                f"{kind}_format": module.paInt16,
            })
        )  # fmt: skip
    except ValueError:  # PyAudio raises ValueError("Invalid sample rate") instead of False
        return False
    finally:
        pa.terminate()


def negotiate_rate(
    stream_rate: int, *, supported: Callable[[int], bool], default_rate: float, forced: int | None
) -> int:
    """The rate to open the device at: ``forced``, else the stream's, else the device default."""
    if forced is not None:
        return int(forced)
    if supported(stream_rate):
        return stream_rate
    return int(round(default_rate))


# -- the ring buffer ----------------------------------------------------------------------


class Ring:
    """Single-producer/single-consumer ring of int16 frames, preallocated.

    ``head`` (frames ever written) is only advanced by the producer, ``tail`` (frames ever
    consumed) only by the consumer, except while the stream is stopped, when no callback runs.
    One side is PortAudio's audio thread, the other the event loop. Why no lock is needed in
    CPython: each side writes the audio first and publishes its index afterwards with one
    attribute store; the GIL makes that store atomic and orders it after the copy (taking and
    releasing the GIL is a full memory barrier), so the other side sees either the old index
    (and leaves those frames alone) or the new one (and the frames are complete). A stale
    index is always conservative: the producer sees less free space, the consumer fewer
    frames. Neither :meth:`put` nor :meth:`get` allocates: slices are views.
    """

    __slots__ = ("capacity", "data", "head", "tail")

    def __init__(self, frames: int, channels: int) -> None:
        self.capacity = frames
        self.data = np.zeros((frames, channels), dtype=np.int16)
        self.head = 0
        self.tail = 0

    @property
    def level(self) -> int:
        return self.head - self.tail

    @property
    def free(self) -> int:
        return self.capacity - (self.head - self.tail)

    def put(self, src: npt.NDArray[np.int16]) -> int:
        """Producer: copy as many frames of ``src`` as fit; return how many."""
        head = self.head
        n = min(self.capacity - (head - self.tail), int(src.shape[0]))
        if n <= 0:
            return 0
        start = head % self.capacity
        first = min(n, self.capacity - start)
        self.data[start : start + first] = src[:first]
        if n > first:
            self.data[: n - first] = src[first:n]
        self.head = head + n  # publish after the copy
        return n

    def copy_out(self, out: npt.NDArray[np.int16], tail: int, n: int) -> None:
        """Consumer: copy ``n`` frames starting at ``tail`` into ``out[:n]`` (no allocation)."""
        start = tail % self.capacity
        first = min(n, self.capacity - start)
        out[:first] = self.data[start : start + first]
        if n > first:
            out[first:n] = self.data[: n - first]

    def get(self, out: npt.NDArray[np.int16]) -> int:
        """Consumer: move up to ``len(out)`` queued frames into ``out``; return how many."""
        tail = self.tail
        n = min(self.head - tail, int(out.shape[0]))
        if n > 0:
            self.copy_out(out, tail, n)
            self.tail = tail + n  # publish after the copy: the producer may reuse the slots
        return n
