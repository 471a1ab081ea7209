"""Shared fixtures: a running local server and a cloned voice on it.

* ``server``: a :class:`~tts_stream.server.LocalServer` on 127.0.0.1:0 with the ``tone``
  backend (burst pacing, temporary data dir), closed after the test. Other options: start
  your own ``async with LocalServer(...)`` in the test.
* ``enroll``: ``await enroll(srv, api_key=None, preferred_name="test", target_model=VC_MODELS[0],
  wav=None) -> str`` creates a voice with a plain HTTP POST (protocol.md §4.2) from
  ``samplegen.good_sample_wav()`` and returns its name; it fails the test on an error answer
  (:func:`tts_stream.testing.enroll.enroll_voice`, which benchmarks use too).
* ``voice``: a voice enrolled on ``server`` for ``VC_MODELS[0]`` by ``server.api_key``.

Every network wait here is bounded (``TIMEOUT`` seconds).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tts_stream.server import LocalServer
from tts_stream.testing.enroll import TIMEOUT, enroll_voice

__all__ = ["TIMEOUT", "Enroll"]

Enroll = Callable[..., Awaitable[str]]


@pytest.fixture
async def server() -> AsyncIterator[LocalServer]:
    """A running tone-backend LocalServer on 127.0.0.1:0 with a temporary data dir."""
    async with LocalServer(port=0, backend="tone") as srv:
        yield srv


@pytest.fixture
def enroll() -> Enroll:
    """``await enroll(srv, **options) -> voice name`` (see the module docstring)."""
    return enroll_voice


@pytest.fixture
async def voice(server: LocalServer) -> str:
    """A voice on ``server`` for ``VC_MODELS[0]``, owned by ``server.api_key``."""
    return await enroll_voice(server)
