"""The official ``dashscope`` SDK (2.0.2) against the local server, unchanged but for the URL.

``QwenTtsRealtime`` runs its own websocket-client thread and blocking calls, so each SDK flow
runs in a worker thread (``asyncio.to_thread``) while the server keeps the event loop; every
wait on the SDK side is bounded by a ``threading.Event`` timeout. Enrollment is a plain HTTP
POST, as the product documentation does it (the SDK has no helper for qwen-voice-enrollment).
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator
from typing import Any

import dashscope
import pytest
from dashscope.audio.qwen_tts_realtime import (
    AudioFormat,
    QwenTtsRealtime,
    QwenTtsRealtimeCallback,
)

from tts_stream.messages import VC_MODELS
from tts_stream.server import LocalServer

pytestmark = pytest.mark.peer

TIMEOUT = 20.0
MODEL = VC_MODELS[0]


class Recorder(QwenTtsRealtimeCallback):
    """Collects every event the SDK hands to its callback, from the SDK's thread."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.audio = bytearray()
        self.finished = threading.Event()
        self.closed = threading.Event()
        self.close_code: int | None = None
        self._seen: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def on_event(self, message: Any) -> None:
        with self._lock:
            self.events.append(message)
            if message.get("type") == "response.audio.delta":
                self.audio += base64.b64decode(message["delta"])
            self._seen.setdefault(message.get("type", ""), threading.Event()).set()
        if message.get("type") == "session.finished":
            self.finished.set()

    def on_close(self, close_status_code: Any, close_msg: Any) -> None:
        self.close_code = close_status_code
        self.closed.set()

    def wait_for(self, type_: str) -> None:
        with self._lock:
            event = self._seen.setdefault(type_, threading.Event())
        assert event.wait(TIMEOUT), f"no {type_} within {TIMEOUT} s"

    def types(self) -> list[str]:
        with self._lock:
            return [e["type"] for e in self.events]


@pytest.fixture
def sdk_key(server: LocalServer) -> Iterator[str]:
    """``dashscope.api_key`` set to the server's key for the test, then restored."""
    previous = dashscope.api_key
    dashscope.api_key = server.api_key
    try:
        yield server.api_key
    finally:
        dashscope.api_key = previous


def sdk_session(server: LocalServer, voice: str, mode: str, texts: list[str]) -> Recorder:
    """One SDK session (blocking; run it in a thread)."""
    rec = Recorder()
    client = QwenTtsRealtime(model=MODEL, callback=rec, url=server.ws_url)
    client.connect()
    # websocket-client 1.9 leaks the socket when the *server* closes (send_close() clears
    # ``connected``, so close() returns before shutdown()); keep a handle to close it ourselves.
    raw: Any = getattr(client.ws, "sock", None)
    sdk: Any = client  # the SDK is untyped
    try:
        rec.wait_for("session.created")
        client.update_session(
            voice=voice,
            response_format=AudioFormat.PCM_24000HZ_MONO_16BIT,
            mode=mode,
            language_type="English",
        )
        rec.wait_for("session.updated")
        for text in texts:
            client.append_text(text)
        if mode == "commit":
            client.commit()
            rec.wait_for("response.done")
            client.cancel_response()  # the SDK offers it; the server answers with an error
            rec.wait_for("error")
        client.finish()
        assert rec.finished.wait(TIMEOUT), "no session.finished"
        assert rec.closed.wait(TIMEOUT), "the server did not close after session.finished"
        assert sdk.get_session_id() is not None
        assert sdk.get_first_audio_delay() is not None
    finally:
        client.close()
        client.thread.join(TIMEOUT)
        if raw is not None:
            raw.shutdown()
    return rec


@pytest.mark.parametrize("mode", ["server_commit", "commit"])
async def test_official_sdk_streams_audio(
    server: LocalServer, voice: str, sdk_key: str, mode: str
) -> None:
    texts = ["Right? I love supermarkets like this. ", "Especially during the New Year holidays."]
    async with asyncio.timeout(TIMEOUT * 2):
        rec = await asyncio.to_thread(sdk_session, server, voice, mode, texts)
    types = rec.types()
    assert types[0] == "session.created" and types[1] == "session.updated"
    assert types[-1] == "session.finished"
    assert "response.audio.delta" in types and types.count("response.done") == 1
    done = next(e for e in rec.events if e["type"] == "response.done")
    assert done["response"]["usage"]["characters"] == 78
    assert len(rec.audio) > 24000 * 2 and len(rec.audio) % 2 == 0
    assert rec.close_code == 1000
    if mode == "commit":
        err = next(e for e in rec.events if e["type"] == "error")
        assert err["error"]["message"] == "Unsupported event type: 'response.cancel'."
    stats = server.stats()
    assert stats.sessions_opened == stats.sessions_finished == 1
