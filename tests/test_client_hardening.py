"""Client hardening (issue 9, defects 3, 7 and 10), against real peers on 127.0.0.1.

* ``prewarm()`` raises when nothing connected: a closed port, a listener that never speaks.
* A key-echoing server (a small aiohttp app below, the hostile peer) puts the API key into
  every field of its HTTP and WebSocket answers: no message, repr, traceback or log record
  of ours may carry it.
* Clear errors before connecting: an unknown model, a misspelt session option; the escape
  hatches for new models and keys; the size rule in bytes and MiB.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
import traceback
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import WSMsgType, web

from tests.conftest import Enroll
from tts_stream import ConnectionFailed, Engine, ServerError, Timeout, UsageError, Voice
from tts_stream.config import Endpoint
from tts_stream.connection import Connection
from tts_stream.enrollment import RetryPolicy, open_voices
from tts_stream.errors import ConnectionLost, HandshakeRejected, TtsStreamError
from tts_stream.messages import ENROLLMENT_PATH, REALTIME_PATH, VC_MODELS
from tts_stream.samples import MAX_BYTES, inspect_sample
from tts_stream.server import LocalServer

MODEL = VC_MODELS[0]
TIMEOUT = 20.0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- prewarm ----------------------------------------------------------------------------------


async def test_prewarm_to_a_closed_port_raises_connection_failed() -> None:
    port = closed_port()
    async with asyncio.timeout(TIMEOUT), Engine(base_url=f"http://127.0.0.1:{port}") as e:
        t0 = time.monotonic()
        with pytest.raises(ConnectionFailed, match=f"127.0.0.1:{port}"):
            await e.prewarm("qwen-tts-vc-x-voice-20260101000000000-0000", 2, model=MODEL)
        assert time.monotonic() - t0 < 5
        assert e.pool_stats().dial_failures == 2


async def test_prewarm_to_a_listener_that_never_answers_raises_timeout() -> None:
    held: list[asyncio.StreamWriter] = []

    async def mute(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)  # accept, read nothing, say nothing

    listener = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with (
            asyncio.timeout(TIMEOUT),
            Engine(base_url=f"http://127.0.0.1:{port}", open_timeout=0.5) as e,
        ):
            with pytest.raises(Timeout, match="WebSocket handshake"):
                await e.prewarm("qwen-tts-vc-x-voice-20260101000000000-0000", model=MODEL)
    finally:
        for w in held:
            w.close()
        listener.close()
        await listener.wait_closed()


async def test_prewarm_that_connects_still_returns(server: LocalServer, enroll: Enroll) -> None:
    voice = Voice(await enroll(server), MODEL)
    async with asyncio.timeout(TIMEOUT), Engine(base_url=server.base_url,
                                                api_key=server.api_key) as e:  # fmt: skip
        await e.prewarm(voice, 2)
        assert e.spares(voice) == 2


# --- the key-echoing server -------------------------------------------------------------------


class EchoServer:
    """Answers every request with the caller's API key in every field it sends back.

    ``ws``: ``"refuse:<status>"`` answers the upgrade with that status; ``"error"`` accepts,
    then answers ``session.update`` with an ``error`` event and a close frame whose reason
    carries the key; ``"close"`` closes (reason with the key) right after session.created.
    ``http_status``: the status of every enrollment answer (200 gives a body without
    ``output``, a protocol violation that quotes the request id).
    """

    def __init__(self) -> None:
        self.ws = "refuse:401"
        self.http_status = 400
        self.seen = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    @staticmethod
    def _key(request: web.Request) -> str:
        return request.headers.get("Authorization", "").removeprefix("Bearer ")

    def _fields(self, key: str) -> dict[str, Any]:
        return {"code": f"InvalidApiKey.{key}", "message": f"Invalid API-key provided: {key}",
                "request_id": f"rid-{key}"}  # fmt: skip

    async def _http(self, request: web.Request) -> web.Response:
        self.seen += 1
        key = self._key(request)
        await request.read()
        return web.json_response(self._fields(key), status=self.http_status,
                                 reason=f"Echo {key}", headers={"x-request-id": key})  # fmt: skip

    async def _realtime(self, request: web.Request) -> web.StreamResponse:
        self.seen += 1
        key = self._key(request)
        if self.ws.startswith("refuse:"):
            status = int(self.ws.split(":")[1])
            return web.json_response(self._fields(key), status=status, reason=f"Echo {key}",
                                     headers={"x-request-id": key, "x-echo": key})  # fmt: skip
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(orjson.dumps({
            "type": "session.created", "event_id": f"event_{key}",
            "session": {"id": f"sess_{key}", "model": MODEL, "voice": key},
        }).decode())  # fmt: skip
        if self.ws == "close":
            await ws.close(code=1008, message=f"bye {key}".encode())
            return ws
        async with asyncio.timeout(TIMEOUT):
            msg = await ws.receive()
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(orjson.dumps({
                "type": "error", "event_id": f"event_{key}",
                "error": {"type": "invalid_request_error", "code": f"invalid_value.{key}",
                          "message": f"voice {key} not found", "param": key,
                          "event_id": key},
            }).decode())  # fmt: skip
        await ws.close(code=1011, message=f"failed {key}".encode())
        return ws

    async def __aenter__(self) -> EchoServer:
        app = web.Application()
        app.router.add_post(ENROLLMENT_PATH, self._http)
        app.router.add_get(REALTIME_PATH, self._realtime)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    async with EchoServer() as srv:
        yield srv


KEY = "sk-echo" + secrets.token_hex(16)


def assert_no_key(exc: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    """The key is in no message, repr, attribute, traceback or log record."""
    texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    texts += [repr(v) for v in vars(exc).values()]
    for rec in caplog.records:
        texts.append(rec.getMessage())
        if rec.exc_info:
            texts.append("".join(traceback.format_exception(*rec.exc_info)))
    # websockets' frame trace shortens long frames ("head...tail"): a piece is a leak too.
    pieces = {KEY[i : i + 12] for i in range(len(KEY) - 11)}
    leaks = [t for t in texts if any(piece in t for piece in pieces)]
    assert not leaks, leaks


async def test_enrollment_errors_redact_every_echoed_field(
    echo: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ep = Endpoint.resolve(base_url=echo.base_url, api_key=KEY)
    async with asyncio.timeout(TIMEOUT), open_voices(ep, retry=RetryPolicy(
            attempts=2, base_delay=0.01, max_delay=0.01)) as voices:  # fmt: skip
        for status in (400, 401, 503, 200):
            echo.http_status = status
            with pytest.raises(TtsStreamError) as info:
                await voices.list()
            assert_no_key(info.value, caplog)
            if isinstance(info.value, ServerError):
                assert info.value.request_id == "rid-sk-***"  # the echo did arrive
                assert info.value.code == "InvalidApiKey.sk-***"
            else:
                assert "request_id=sk-***" in str(info.value)
    assert any("retry 1/1" in r.getMessage() for r in caplog.records)  # the 503 was retried


@pytest.mark.parametrize("status", [401, 403, 429, 503, 400])
async def test_a_refused_handshake_redacts_the_echoed_body(
    echo: EchoServer, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    caplog.set_level(logging.DEBUG)
    echo.ws = f"refuse:{status}"
    ep = Endpoint.resolve(base_url=echo.base_url, api_key=KEY)
    session = {"voice": "v", "mode": "server_commit"}
    with pytest.raises((ServerError, HandshakeRejected)) as info:
        async with asyncio.timeout(TIMEOUT), Connection(ep, model=MODEL, session=session):
            pass
    assert "sk-***" in str(info.value)
    assert_no_key(info.value, caplog)


async def test_the_pool_logs_and_prewarm_raise_without_the_key(
    echo: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    echo.ws = "refuse:503"
    async with asyncio.timeout(TIMEOUT), Engine(base_url=echo.base_url, api_key=KEY) as e:
        with pytest.raises(HandshakeRejected) as info:
            await e.prewarm("qwen-tts-vc-x-voice-20260101000000000-0000", 2, model=MODEL)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("sk-***" in r.getMessage() for r in warnings)  # the pool did log the echo
    assert_no_key(info.value, caplog)


@pytest.mark.parametrize("mode", ["error", "close"])
async def test_echoed_events_and_close_reasons_are_redacted(
    echo: EchoServer, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    caplog.set_level(logging.DEBUG)
    echo.ws = mode
    ep = Endpoint.resolve(base_url=echo.base_url, api_key=KEY)
    session = {"voice": "v", "mode": "server_commit"}
    with pytest.raises((ServerError, ConnectionLost)) as info:
        async with asyncio.timeout(TIMEOUT), Connection(ep, model=MODEL, session=session):
            pass
    exc = info.value
    if isinstance(exc, ServerError):
        assert exc.code == "invalid_value.sk-***" and "voice sk-*** not found" in exc.message
    else:
        assert isinstance(exc, ConnectionLost)
        assert exc.reason == "bye sk-***" and "bye sk-***" in str(exc)
    assert_no_key(exc, caplog)


# --- clear errors -----------------------------------------------------------------------------


async def test_an_unknown_model_is_refused_before_connecting(server: LocalServer) -> None:
    async with asyncio.timeout(TIMEOUT), Engine(base_url=server.base_url,
                                                api_key=server.api_key) as e:  # fmt: skip
        with pytest.raises(UsageError) as info:
            e.speak("some-voice", sinks=[object()], model="qwen3-tts-vc-realtime-2099-01-01")  # type: ignore[list-item]
        with pytest.raises(UsageError):
            await e.prewarm("some-voice", model="qwen-tts-flash")
    msg = str(info.value)
    assert "'qwen3-tts-vc-realtime-2099-01-01'" in msg
    assert all(m in msg for m in VC_MODELS)
    assert "extra_models" in msg
    assert server.stats().handshakes == 0


async def test_extra_models_let_a_new_model_through_and_its_failure_is_named(
    server: LocalServer, enroll: Enroll
) -> None:
    name = await enroll(server)
    new = "qwen3-tts-vc-realtime-2099-01-01"
    async with (
        asyncio.timeout(TIMEOUT),
        Engine(base_url=server.base_url, api_key=server.api_key, extra_models=[new]) as e,
    ):
        # The local server does not know it: session.created, then a close (as the service).
        with pytest.raises(ConnectionLost, match=rf"before session\.updated \(model '{new}'"):
            await e.prewarm(name, model=new)
    assert server.stats().handshakes >= 1


async def test_a_misspelt_session_option_is_refused_with_a_suggestion(
    server: LocalServer, enroll: Enroll
) -> None:
    voice = Voice(await enroll(server), MODEL)
    async with asyncio.timeout(TIMEOUT), Engine(base_url=server.base_url,
                                                api_key=server.api_key) as e:  # fmt: skip
        with pytest.raises(UsageError, match=r"'speach_rate' \(did you mean 'speech_rate'\?\)"):
            await e.prewarm(voice, speach_rate=1.2)
        assert server.stats().handshakes == 0
        # Documented keys pass; a key this client does not know goes through the hatch.
        key = e.pool_key(voice, speech_rate=1.2, extra_session={"x_new_knob": 7})
        assert key.session()["x_new_knob"] == 7 and key.session()["speech_rate"] == 1.2
        lease = await e._pool_or_raise().acquire(key)
        async with lease:
            assert lease.connection.protocol.effective["x_new_knob"] == 7  # the server saw it


def test_the_size_rule_speaks_bytes_and_mib() -> None:
    report = inspect_sample(b"RIFF" + bytes(MAX_BYTES))
    (size,) = [p for p in report.problems if p.rule == "size"]
    assert size.message == (
        "file is 10,485,764 bytes (10.00 MiB); it must be under 10,485,760 bytes (10 MiB)"
    )
