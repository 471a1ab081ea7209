"""tts-stream: an asyncio engine for voice-cloned real-time speech (DashScope Qwen-TTS Realtime).

The public API (DESIGN.md "Public API"): :class:`Engine` with ``voices``, ``check_sample``,
``speak``, ``say`` and ``prewarm``; the :class:`Speech` it creates; the audio vocabulary
sinks implement (:class:`Sink`, :class:`Frame`, :class:`AudioFormat`, :class:`SinkStats`);
metrics records; the exception tree; and :func:`run` for entry points (uvloop if installed).
Sinks live in the separate ``sinks`` package; the local server in ``tts_stream.server``.
"""

from __future__ import annotations

__version__ = "0.1.0"  # before the imports: config.py reads it

from .audio import AudioFormat, Frame, Sink, SinkStats  # noqa: E402
from .engine import Engine, run  # noqa: E402
from .enrollment import Voice  # noqa: E402
from .errors import (  # noqa: E402
    AuthenticationError,
    ClosedError,
    ConnectionFailed,
    ConnectionLost,
    DeviceError,
    HandshakeRejected,
    MissingDependency,
    ModelMismatch,
    ProtocolViolation,
    QuotaExceeded,
    RateLimited,
    SampleRejected,
    ServerError,
    Timeout,
    TtsStreamError,
    UsageError,
    VoiceNotFound,
)
from .fanout import Policy  # noqa: E402
from .metrics import AcquireInfo, Summary, UtteranceMetrics, summarize_records  # noqa: E402
from .pool import PoolStats  # noqa: E402
from .speech import InterruptReport, Speech, SpeechOptions  # noqa: E402

__all__ = [
    "AcquireInfo",
    "AudioFormat",
    "AuthenticationError",
    "ClosedError",
    "ConnectionFailed",
    "ConnectionLost",
    "DeviceError",
    "Engine",
    "Frame",
    "HandshakeRejected",
    "InterruptReport",
    "MissingDependency",
    "ModelMismatch",
    "Policy",
    "PoolStats",
    "ProtocolViolation",
    "QuotaExceeded",
    "RateLimited",
    "SampleRejected",
    "ServerError",
    "Sink",
    "SinkStats",
    "Speech",
    "SpeechOptions",
    "Summary",
    "Timeout",
    "TtsStreamError",
    "UsageError",
    "UtteranceMetrics",
    "Voice",
    "VoiceNotFound",
    "__version__",
    "run",
    "summarize_records",
]
