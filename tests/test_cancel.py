"""``response.cancel`` and barge-in: both server modes, the official SDK, the engine.

* The official SDK's ``cancel_response()`` (it sends ``response.cancel`` and waits for
  nothing) against ``cancel="truncate"``: the response ends at once with ``status``
  ``incomplete`` and the session goes on; against the default ``cancel="error"``: the
  unsupported-event error, as for any undocumented event (protocol.md §5.4).
* The engine's barge-in never sends ``response.cancel`` (undocumented; closing is what stops
  the real service for sure): the sinks go silent first, the socket is closed, the server
  stops sending and no session is left open, whichever cancel mode the server has.
"""

from __future__ import annotations

import asyncio
from typing import Any

import dashscope
import numpy as np
import pytest
from dashscope.audio.qwen_tts_realtime import AudioFormat, QwenTtsRealtime

from sinks import ArraySink
from tts_stream import Engine
from tts_stream.messages import VC_MODELS
from tts_stream.server import LocalServer
from tts_stream.testing.speakers import piper_sample_wav

from .conftest import Enroll
from .test_server_sdk import TIMEOUT, Recorder

LONG = "This sentence is long enough to take a while to speak in real time. " * 6


def sdk_cancel(srv: LocalServer, voice: str) -> Recorder:
    """Commit a long text, cancel once audio flows, then speak once more and finish."""
    rec = Recorder()
    previous, dashscope.api_key = dashscope.api_key, srv.api_key
    try:
        client = QwenTtsRealtime(model=VC_MODELS[0], callback=rec, url=srv.ws_url)
        client.connect()
        raw: Any = getattr(client.ws, "sock", None)
        try:
            rec.wait_for("session.created")
            client.update_session(voice=voice, mode="commit",
                                  response_format=AudioFormat.PCM_24000HZ_MONO_16BIT)  # fmt: skip
            rec.wait_for("session.updated")
            client.append_text(LONG)
            client.commit()
            rec.wait_for("response.audio.delta")
            client.cancel_response()
            rec.wait_for("response.done")
            client.append_text("Short.")
            client.commit()
            client.finish()
            assert rec.finished.wait(TIMEOUT), "no session.finished"
        finally:
            client.close()
            if raw is not None:
                raw.shutdown()
    finally:
        dashscope.api_key = previous
    return rec


@pytest.mark.peer
async def test_sdk_cancel_response_truncates(enroll: Enroll) -> None:
    async with LocalServer(cancel="truncate", pacing="realtime", backend="tone") as srv:
        voice = await enroll(srv)
        async with asyncio.timeout(TIMEOUT * 2):
            rec = await asyncio.to_thread(sdk_cancel, srv, voice)
    done = [e["response"] for e in rec.events if e["type"] == "response.done"]
    assert [d["status"] for d in done] == ["incomplete", "completed"]
    assert done[0]["status_details"]["reason"] == "client_cancelled"
    assert "error" not in rec.types()
    # Far less audio than the whole long text (~60 ms per character with the tone backend).
    assert len(rec.audio) < len(LONG) * 0.06 * 24000 * 2 / 4


@pytest.mark.peer
async def test_sdk_cancel_response_is_an_error_by_default(enroll: Enroll) -> None:
    async with LocalServer(backend="tone") as srv:  # burst: the long response ends quickly
        voice = await enroll(srv)
        async with asyncio.timeout(TIMEOUT * 2):
            rec = await asyncio.to_thread(sdk_cancel, srv, voice)
    errors = [e["error"]["message"] for e in rec.events if e["type"] == "error"]
    assert errors == ["Unsupported event type: 'response.cancel'."]
    done = [e["response"]["status"] for e in rec.events if e["type"] == "response.done"]
    assert done == ["completed", "completed"]  # the long response played to its end


async def wait_until(predicate: Any, what: str, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - the server's counters have no event
            await asyncio.sleep(0.01)
    assert predicate(), what


@pytest.mark.parametrize("cancel", ["error", "truncate"])
async def test_engine_barge_in_silences_and_closes(enroll: Enroll, cancel: str) -> None:
    async with LocalServer(backend="piper", pacing="realtime", cancel=cancel) as srv:  # type: ignore[arg-type]
        voice = await enroll(srv, wav=piper_sample_wav())  # speaks with piper
        async with Engine(base_url=srv.base_url, api_key=srv.api_key, pool_size=0) as engine:
            sink = ArraySink(max_blocks=4096)
            async with asyncio.timeout(TIMEOUT), engine.speak(
                voice, sinks=[sink], model=VC_MODELS[0]
            ) as speech:  # fmt: skip
                await speech.push(LONG)  # ends with a period: the server cuts it
                assert await sink.get() is not None  # audio is playing
                report = await speech.interrupt()
                sent = srv.stats().deltas_sent
                # The socket is closed: the server ends the session and stops sending.
                await wait_until(lambda: srv.stats().sessions_active == 0, "session still open")
                assert srv.stats().deltas_sent - sent <= 1  # at most one already in flight
                await speech.push("After the barge-in.")  # a new session speaks on
            assert 0 < report.played_ms[sink.name] < 10_000
            assert srv.stats().errors_sent == 0  # the engine sent no response.cancel
            tail = await sink.read_all()
            assert tail.size > 0 and np.abs(tail).max() > 0
        await wait_until(lambda: srv.stats().sessions_active == 0, "socket leaked")
