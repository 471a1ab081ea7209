"""Adapters that put tts-stream inside voice-bot frameworks.

* :mod:`tts_stream.integrations.pipecat`: ``TtsStreamTTSService``, a Pipecat ``TTSService``
  (extra ``[pipecat]``);
* :mod:`tts_stream.integrations.livekit`: ``TTS``, a LiveKit Agents ``tts.TTS`` (extra
  ``[livekit]``);
* :mod:`tts_stream.integrations.enroll`: clone a voice (local sample check first) for either.

Boundary: these modules use the public API of :mod:`tts_stream` and the sink base of
:mod:`sinks`, like any application; the engine never imports them. Each framework is
imported only by its own module, and a missing one raises
:class:`~tts_stream.errors.MissingDependency` naming the extra. This package imports nothing
itself.
"""

from __future__ import annotations

__all__: list[str] = []
