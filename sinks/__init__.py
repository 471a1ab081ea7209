"""Audio sinks for tts-stream: each implements :class:`tts_stream.audio.Sink`."""

from __future__ import annotations

__all__: list[str] = []
