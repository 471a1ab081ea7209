"""One realtime connection against the real LocalServer: handshake, configuration, decoding,
bounded delivery, close codes and errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest

from tests.conftest import Enroll
from tts_stream import protocol as p
from tts_stream.config import Endpoint
from tts_stream.connection import Audio, Connection, Item, ResponseBegan
from tts_stream.errors import (
    AuthenticationError,
    ClosedError,
    ConnectionFailed,
    ConnectionLost,
    HandshakeRejected,
    RateLimited,
    ServerError,
)
from tts_stream.messages import VC_MODELS, EnrollmentError, parse_enrollment_error
from tts_stream.server import LocalServer

TIMEOUT = 20.0
MODEL = VC_MODELS[0]


@pytest.fixture
async def voice(server: LocalServer, enroll: Enroll) -> str:
    return await enroll(server)


@asynccontextmanager
async def connected(
    srv: LocalServer, voice: str, *, model: str = MODEL, api_key: str | None = None, **kw: Any
) -> AsyncIterator[Connection]:
    ep = Endpoint.resolve(base_url=srv.base_url, api_key=api_key or srv.api_key)
    session = {"voice": voice, "mode": kw.pop("mode", "server_commit"), "sample_rate": 24000}
    async with asyncio.timeout(TIMEOUT), Connection(ep, model=model, session=session, **kw) as c:
        yield c


async def drain(conn: Connection) -> list[Item]:
    return [item async for item in conn.events]


async def test_session_configured_then_audio_decoded_in_order(
    server: LocalServer, voice: str
) -> None:
    async with connected(server, voice) as conn:
        assert conn.state is p.State.READY and conn.is_usable
        assert conn.extensions == ()  # no compression (the upgrade agreed to no extension)
        await conn.append("Hello there.")
        await conn.finish()
        items = await drain(conn)
    audio = [i for i in items if isinstance(i, Audio)]
    assert isinstance(items[-1], p.SessionComplete)
    assert any(isinstance(i, ResponseBegan) for i in items)
    done = [i for i in items if isinstance(i, p.ResponseFinished)]
    assert done and done[0].characters == len("Hello there.")
    offsets = [a.frame.offset for a in audio]
    sizes = [len(a.frame) for a in audio]
    assert offsets == list(np.cumsum([0, *sizes[:-1]]))
    assert sum(sizes) == server.stats().audio_samples_sent
    assert all(a.frame.samples.dtype == np.int16 for a in audio)
    assert all(a.server_sent_at is None for a in audio)
    times = [a.frame.received_at for a in audio]
    assert times == sorted(times)
    assert conn.closed and conn.protocol.complete
    assert conn.close_code == 1000


@pytest.mark.parametrize(
    ("status", "exc"),
    [(401, AuthenticationError), (403, AuthenticationError), (429, RateLimited),
     (503, HandshakeRejected)],
)  # fmt: skip
async def test_handshake_statuses_map_to_the_error_tree(
    server: LocalServer, voice: str, status: int, exc: type[Exception]
) -> None:
    server.faults.set(refuse_handshake=status, times=1)
    with pytest.raises(exc) as info:
        async with connected(server, voice):
            pass
    assert getattr(info.value, "status", None) == status
    assert server.api_key not in str(info.value)


async def test_unreachable_server_is_a_connection_failure() -> None:
    ep = Endpoint.resolve(base_url="http://127.0.0.1:9", api_key="sk-x")
    with pytest.raises(ConnectionFailed):
        async with asyncio.timeout(TIMEOUT), Connection(ep, model=MODEL, session={"voice": "v"}):
            pass


async def test_refused_configuration_raises_the_server_error(server: LocalServer) -> None:
    with pytest.raises(ServerError, match="not supported"):
        async with connected(server, "qwen-tts-vc-ghost-voice-20260101000000000-0000"):
            pass


async def test_unknown_model_closes_before_configuration(server: LocalServer, voice: str) -> None:
    with pytest.raises(ConnectionLost):
        async with connected(server, voice, model="qwen3-tts-vc-realtime-1999-01-01"):
            pass


async def test_close_code_is_reported(server: LocalServer, voice: str) -> None:
    server.faults.set(close_after_deltas=2, close_code=1011, close_reason="boom")
    async with connected(server, voice) as conn:
        await conn.append("A sentence long enough for several deltas.")
        items = await drain(conn)
    lost = items[-1]
    assert isinstance(lost, p.SessionLost) and lost.code == 1011 and lost.reason == "boom"
    assert sum(isinstance(i, Audio) for i in items) == 2


async def test_abrupt_drop_is_1006(server: LocalServer, voice: str) -> None:
    server.faults.set(drop_after_deltas=1)
    async with connected(server, voice) as conn:
        await conn.append("A sentence long enough for several deltas.")
        items = await drain(conn)
    assert isinstance(items[-1], p.SessionLost) and items[-1].code == 1006
    with pytest.raises(ClosedError):
        await conn.append("after close")


async def test_recoverable_error_keeps_the_session(server: LocalServer, voice: str) -> None:
    async with connected(server, voice, mode="commit") as conn:
        await conn.append("One.")
        await conn.commit()
        await conn.commit()  # empty buffer: an invalid_request_error, the session goes on
        await conn.append(" Two.")
        await conn.finish()
        items = await drain(conn)
    failures = [i for i in items if isinstance(i, p.ServerFailure)]
    assert len(failures) == 1 and not failures[0].fatal
    assert isinstance(items[-1], p.SessionComplete)
    assert sum(isinstance(i, p.ResponseFinished) for i in items) == 2


async def test_missing_committed_and_stamped_deltas(server: LocalServer, voice: str) -> None:
    server.faults.set(omit_committed=True, stamp_deltas=True)
    async with connected(server, voice) as conn:
        await conn.append("Stamped.")
        await conn.finish()
        items = await drain(conn)
    assert not any(isinstance(i, p.BufferCommitted) for i in items)
    audio = [i for i in items if isinstance(i, Audio)]
    assert audio and all(a.server_sent_at is not None for a in audio)
    assert all(a.frame.received_at >= (a.server_sent_at or 0) for a in audio)


async def test_event_channel_is_bounded(server: LocalServer, voice: str) -> None:
    async with connected(server, voice, channel_size=2) as conn:
        text = "A long sentence that makes many deltas of audio for this test."
        await conn.append(text)
        await conn.finish()
        first = await conn.events.receive()  # the reader is blocked on a full channel now
        assert conn.events.statistics().current_buffer_used <= 2
        items = [first, *await drain(conn)]
    assert sum(isinstance(i, Audio) for i in items) == server.stats().deltas_sent > 2


async def test_connection_is_single_use(server: LocalServer, voice: str) -> None:
    async with connected(server, voice) as conn:
        pass
    with pytest.raises(ClosedError):
        await conn.__aenter__()
    await conn.aclose()  # idempotent


async def test_api_key_never_reaches_the_logs(
    server: LocalServer, voice: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        async with connected(server, voice) as conn:
            await conn.append("Secret safe.")
            await conn.finish()
            await drain(conn)
        server.faults.set(refuse_handshake=401, times=1)
        with pytest.raises(AuthenticationError):
            async with connected(server, voice):
                pass
    assert "> GET /api-ws/v1/realtime" in caplog.text  # the handshake trace was logged ...
    assert "Bearer sk-***" in caplog.text
    assert server.api_key not in caplog.text  # ... without the key


def test_the_handshake_and_enrollment_error_bodies_share_one_parser() -> None:
    """A refused upgrade's body is read by ``messages.parse_enrollment_error`` and redacted
    field by field, as enrollment errors are (pure: no server)."""
    key = "sk-echoed-0123456789"
    body = {"code": f"Bad.{key}", "msg": f"key {key} refused", "request_id": f"r-{key}"}
    info = parse_enrollment_error(body).redacted(key)
    assert info == EnrollmentError(
        code="Bad.sk-***", message="key sk-*** refused", request_id="r-sk-***"
    )
    assert parse_enrollment_error(None).redacted(key) == EnrollmentError(None, "", None)
