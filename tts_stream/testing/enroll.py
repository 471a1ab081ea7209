"""Enroll a voice on a running local server with one plain HTTP POST (protocol.md §4.2).

For tests and benchmarks that need a voice without going through the client under test
(the enrollment client is itself under test): :func:`enroll_voice` builds the create body
with :mod:`tts_stream.messages`, uploads :func:`~tts_stream.testing.samplegen.good_sample_wav`
(or the WAV given) and returns the voice name. Every network wait is bounded.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from tts_stream.messages import ENROLLMENT_PATH, VC_MODELS, create_voice_request
from tts_stream.samples import data_uri
from tts_stream.server import LocalServer
from tts_stream.testing.samplegen import good_sample_wav

__all__ = ["TIMEOUT", "enroll_voice"]

#: Seconds the whole request may take.
TIMEOUT = 20.0


async def enroll_voice(
    srv: LocalServer,
    *,
    api_key: str | None = None,
    preferred_name: str = "test",
    target_model: str = VC_MODELS[0],
    wav: bytes | None = None,
    **fields: Any,
) -> str:
    """Create a voice on ``srv`` as ``api_key`` (default ``srv.api_key``); its name.

    ``fields`` are more create fields (``text``, ``language``). An answer other than 200
    raises :class:`AssertionError` with the server's body, so a test using it fails there.
    """
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
        if resp.status != 200:
            raise AssertionError(answer)
        name = answer["output"]["voice"]
        if not isinstance(name, str):
            raise AssertionError(answer)
        return name
