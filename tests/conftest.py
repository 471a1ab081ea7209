"""Shared fixtures: a running local server and a cloned voice on it.

* ``server``: a :class:`~tts_stream.server.LocalServer` on 127.0.0.1:0 with the ``tone``
  backend (burst pacing, temporary data dir), closed after the test. Other options: start
  your own ``async with LocalServer(...)`` in the test.
* ``enroll``: ``await enroll(srv, api_key=None, preferred_name="test", target_model=VC_MODELS[0],
  wav=None) -> str`` creates a voice with a plain HTTP POST (protocol.md §4.2) from
  ``samplegen.good_sample_wav()`` and returns its name; it fails the test on an error answer.
* ``voice``: a voice enrolled on ``server`` for ``VC_MODELS[0]`` by ``server.api_key``.

Every network wait here is bounded (``TIMEOUT`` seconds).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from tests.samplegen import good_sample_wav
from tts_stream.messages import ENROLLMENT_PATH, VC_MODELS, create_voice_request
from tts_stream.samples import data_uri
from tts_stream.server import LocalServer

TIMEOUT = 20.0

Enroll = Callable[..., Awaitable[str]]


@pytest.fixture
async def server() -> AsyncIterator[LocalServer]:
    """A running tone-backend LocalServer on 127.0.0.1:0 with a temporary data dir."""
    async with LocalServer(port=0, backend="tone") as srv:
        yield srv


async def _enroll(
    srv: LocalServer,
    *,
    api_key: str | None = None,
    preferred_name: str = "test",
    target_model: str = VC_MODELS[0],
    wav: bytes | None = None,
    **fields: Any,
) -> str:
    body = create_voice_request(
        target_model=target_model,
        preferred_name=preferred_name,
        audio_data=data_uri(wav if wav is not None else good_sample_wav(), "audio/wav"),
        **fields,
    )
    headers = {"Authorization": f"Bearer {api_key or srv.api_key}"}
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.post(srv.base_url + ENROLLMENT_PATH, json=body, headers=headers) as resp,
    ):
        answer = await resp.json()
        assert resp.status == 200, answer
        name = answer["output"]["voice"]
        assert isinstance(name, str)
        return name


@pytest.fixture
def enroll() -> Enroll:
    """``await enroll(srv, **options) -> voice name`` (see the module docstring)."""
    return _enroll


@pytest.fixture
async def voice(server: LocalServer) -> str:
    """A voice on ``server`` for ``VC_MODELS[0]``, owned by ``server.api_key``."""
    return await _enroll(server)
