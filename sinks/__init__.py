"""Audio sinks for tts-stream: each implements :class:`tts_stream.audio.Sink`.

``WavSink``, ``ArraySink`` and ``RtpSink`` need nothing beyond the core dependencies.
``SoundCardSink`` needs PortAudio (the ``sounddevice`` or ``pyaudio`` extra), so it is imported
lazily: ``import sinks`` works on machines without a sound stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._base import BaseSink, SinkState
from .arrays import ArraySink
from .wav import WavSink

if TYPE_CHECKING:
    from .rtp import RtpSink
    from .soundcard import SoundCardSink

__all__ = ["ArraySink", "BaseSink", "RtpSink", "SinkState", "SoundCardSink", "WavSink"]

_LAZY = {"RtpSink": ".rtp", "SoundCardSink": ".soundcard"}


def __getattr__(name: str) -> Any:
    # PEP 562: the module is imported on first use of the name, then cached as a global.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
