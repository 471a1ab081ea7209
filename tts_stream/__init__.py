"""tts-stream: an asyncio engine for voice-cloned real-time speech (DashScope Qwen-TTS Realtime)."""

from __future__ import annotations

__all__: list[str] = []
__version__ = "0.1.0"
