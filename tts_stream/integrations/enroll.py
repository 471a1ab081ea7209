"""Voice enrollment for framework users: clone a voice, hand it to either adapter.

Neither Pipecat nor LiveKit Agents has voice enrollment. :func:`clone_voice` checks the
sample locally against every enrollment rule (no network: a bad sample raises
:class:`~tts_stream.SampleRejected` listing every violation, nothing is sent or billed), then
clones it and returns the :class:`~tts_stream.Voice` that ``TtsStreamTTSService(voice=...)``
and ``livekit.TTS(voice=...)`` take; with a ``Voice`` the adapters know its model, so they
skip the lookup. :func:`delete_voice` frees the slot again.

Boundary: the public API of :mod:`tts_stream` only; imports no framework.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from tts_stream import Engine, Voice
from tts_stream.messages import VC_MODELS

__all__ = ["clone_voice", "delete_voice"]


async def clone_voice(
    sample: str | os.PathLike[str] | bytes,
    *,
    preferred_name: str,
    engine: Engine | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    target_model: str = VC_MODELS[0],
    text: str | None = None,
    language: str | None = None,
) -> Voice:
    """Check ``sample`` locally, then clone it (one billed creation); return the voice.

    ``engine``: an open :class:`~tts_stream.Engine`; without one a short-lived engine is
    opened from ``base_url``/``api_key`` (default: ``DASHSCOPE_API_KEY``, the real service).
    The local check is ``engine.voices.create``'s own (it runs before any request); a URL
    sample cannot be checked locally and goes to the service as it is.
    """
    async with _using(engine, base_url, api_key) as used:
        return await used.voices.create(
            sample, preferred_name=preferred_name, target_model=target_model, text=text,
            language=language,
        )  # fmt: skip


async def delete_voice(
    voice: Voice | str,
    *,
    engine: Engine | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
) -> bool:
    """Delete a cloned voice (``True`` if this call deleted it; a missing voice is ``False``)."""
    async with _using(engine, base_url, api_key) as used:
        return await used.voices.delete(voice, missing_ok=True)


@contextlib.asynccontextmanager
async def _using(
    engine: Engine | None, base_url: str | None, api_key: str | None
) -> AsyncIterator[Engine]:
    """``engine`` as it is (the caller closes it), else a short-lived one of our own."""
    if engine is not None:
        yield engine
        return
    async with Engine(base_url=base_url, api_key=api_key) as own:
        yield own
