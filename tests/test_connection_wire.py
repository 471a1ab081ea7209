"""The connection's frame handling against a small raw peer (websockets' server on
127.0.0.1) for what the local server never sends: fragmented messages, binary frames, a
redirect, a bad frame; and the consumer's fast path (``deliver_nowait``) against the real
LocalServer: taken, refused, and back-pressure with paused reading."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from tests.conftest import Enroll
from tts_stream import protocol as p
from tts_stream.audio import PCM16
from tts_stream.config import Endpoint
from tts_stream.connection import Audio, Connection, Item
from tts_stream.errors import HandshakeRejected
from tts_stream.messages import VC_MODELS
from tts_stream.server import LocalServer

TIMEOUT = 20.0
MODEL = VC_MODELS[0]
KEY = "sk-peer-0123456789"
PCM = (np.arange(2400, dtype=np.int16) * 7).astype("<i2")


def _event(kind: str, **fields: Any) -> str:
    return orjson.dumps({"type": kind, "event_id": f"event_{kind}", **fields}).decode()


def _delta_text(response_id: str = "resp_1") -> str:
    b64 = base64.b64encode(PCM.tobytes()).decode()
    return _event("response.audio.delta", response_id=response_id, delta=b64)


def _pieces(text: str, n: int) -> Iterable[str]:
    step = len(text) // n + 1
    return [text[i : i + step] for i in range(0, len(text), step)]


Script = Callable[[ServerConnection], Any]


async def _session(ws: ServerConnection, body: Script) -> None:
    """session.created, answer session.update, then ``body``, then finish normally."""
    await ws.send(_event("session.created", session={"id": "sess_1", "model": MODEL}))
    update = orjson.loads(await ws.recv())
    assert update["type"] == "session.update"
    await ws.send(_event("session.updated", session=update["session"]))
    await ws.send(_event("response.created", response={"id": "resp_1"}))
    await body(ws)
    await ws.send(_event("response.done", response={"id": "resp_1", "status": "completed"}))
    await ws.send(_event("session.finished"))
    await ws.close()


@asynccontextmanager
async def peer(
    body: Script, process_request: Callable[..., Response | None] | None = None
) -> AsyncIterator[Endpoint]:
    async def handler(ws: ServerConnection) -> None:
        await _session(ws, body)

    async with serve(handler, "127.0.0.1", 0, process_request=process_request) as srv:
        port = next(iter(srv.sockets)).getsockname()[1]
        yield Endpoint.resolve(base_url=f"http://127.0.0.1:{port}", api_key=KEY)


async def items_of(ep: Endpoint, **kw: Any) -> list[Item]:
    async with (
        asyncio.timeout(TIMEOUT),
        Connection(ep, model=MODEL, session={"voice": "v"}, **kw) as conn,
    ):
        return [item async for item in conn.events]


async def test_a_fragmented_delta_is_reassembled() -> None:
    async def body(ws: ServerConnection) -> None:
        await ws.send(_pieces(_delta_text(), 5))  # one message in five frames
        await ws.send(_delta_text())

    async with peer(body) as ep:
        items = await items_of(ep)
    audio = [i for i in items if isinstance(i, Audio)]
    assert len(audio) == 2
    assert all(np.array_equal(a.samples, PCM) for a in audio)
    assert [a.offset for a in audio] == [0, len(PCM)]
    assert isinstance(items[-1], p.SessionComplete)


async def test_a_binary_frame_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    async def body(ws: ServerConnection) -> None:
        await ws.send(b"\x00\x01" * 50)  # binary: text only on this API
        await ws.send([b"\x00" * 30, b"\x01" * 20])  # a fragmented binary message
        await ws.send(_delta_text())

    caplog.set_level(logging.WARNING)
    async with peer(body) as ep:
        items = await items_of(ep)
    assert sum(isinstance(i, Audio) for i in items) == 1
    assert isinstance(items[-1], p.SessionComplete)
    sizes = [r.getMessage() for r in caplog.records if "ignoring a binary frame" in r.getMessage()]
    assert sizes == ["ignoring a binary frame (100 bytes): text only",
                     "ignoring a binary frame (50 bytes): text only"]  # fmt: skip


async def test_an_echoed_key_in_a_delta_is_redacted() -> None:
    async def body(ws: ServerConnection) -> None:
        await ws.send(_delta_text(f"resp_{KEY}"))
        await ws.send(_pieces(_delta_text(f"resp_{KEY}"), 3))

    async with peer(body) as ep:
        items = await items_of(ep)
    audio = [i for i in items if isinstance(i, Audio)]
    assert [a.response_id for a in audio] == ["resp_sk-***"] * 2


async def test_a_malformed_message_is_a_protocol_violation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body(ws: ServerConnection) -> None:
        await ws.send(_pieces(_event("response.audio.delta", response_id="resp_1",
                                     delta="not base64!"), 3))  # fmt: skip
        await asyncio.sleep(TIMEOUT)  # the client closes first

    caplog.set_level(logging.WARNING)
    async with peer(body) as ep:
        items = await items_of(ep)
    lost = items[-1]
    assert isinstance(lost, p.SessionLost) and lost.code == 1002
    assert "not valid base64" in lost.reason
    assert any("protocol violation" in r.getMessage() for r in caplog.records)


async def test_a_redirect_is_not_followed() -> None:
    """The Authorization header never goes to another address: a 3xx is a refusal."""

    def redirect(ws: ServerConnection, request: Request) -> Response:
        headers = Headers([("Location", "ws://127.0.0.1:9/elsewhere"), ("Content-Length", "0")])
        return Response(302, "Found", headers, b"")

    async def body(ws: ServerConnection) -> None:
        raise AssertionError("never upgraded")

    async with peer(body, process_request=redirect) as ep:
        with pytest.raises(HandshakeRejected) as info:
            await items_of(ep)
    assert info.value.status == 302


# --- the consumer's fast path, against the real local server ---------------------------------


@pytest.fixture
async def voice(server: LocalServer, enroll: Enroll) -> str:
    return await enroll(server)


def _endpoint(srv: LocalServer) -> Endpoint:
    return Endpoint.resolve(base_url=srv.base_url, api_key=srv.api_key)


TEXT = "A long sentence that makes many deltas of audio for this test of the fast path."


async def test_the_fast_path_takes_every_delta_when_it_can(
    server: LocalServer, voice: str
) -> None:
    taken: list[tuple[PCM16, str]] = []

    def take(samples: PCM16, rid: str, at: float, sent_at: float | None) -> bool:
        taken.append((samples, rid))
        return True

    ep = _endpoint(server)
    async with asyncio.timeout(TIMEOUT), Connection(ep, model=MODEL,
                                                    session={"voice": voice}) as conn:  # fmt: skip
        conn.deliver_nowait = take
        await conn.append(TEXT)
        await conn.finish()
        items = [i async for i in conn.events]
    queued = [i for i in items if isinstance(i, Audio)]  # behind response.created, say
    assert len(taken) + len(queued) == server.stats().deltas_sent > 2
    assert len(taken) > len(queued)
    assert sum(len(s) for s, _ in taken) + sum(len(a.samples) for a in queued) == (
        server.stats().audio_samples_sent
    )
    assert isinstance(items[-1], p.SessionComplete)


async def test_a_refused_delta_queues_and_the_fast_path_waits_for_an_empty_channel(
    server: LocalServer, voice: str
) -> None:
    """Refusals go into the channel (2 items here; reading pauses behind it); the fast path
    is not asked again until the consumer has emptied the channel, so order holds across
    both paths."""
    calls: list[int] = []  # the channel's length at each call
    seen = [0]  # samples the consumer has got so far, through either path
    box: list[Connection] = []  # the connection, for the consumer below

    def every_other(samples: PCM16, rid: str, at: float, sent_at: float | None) -> bool:
        calls.append(len(box[0].events))
        if len(calls) % 2:
            return False  # refused: queued as an Audio
        seen[0] += len(samples)
        return True

    ep = _endpoint(server)
    queued: list[Audio] = []
    async with (
        asyncio.timeout(TIMEOUT),
        Connection(ep, model=MODEL, session={"voice": voice}, channel_size=2) as conn,
    ):
        box.append(conn)
        conn.deliver_nowait = every_other
        await conn.append(TEXT)
        await conn.finish()
        await asyncio.sleep(0.3)  # nobody reads: the channel fills, reading pauses
        assert conn.events.statistics().current_buffer_used <= 2
        async for item in conn.events:
            if isinstance(item, Audio):
                assert item.offset == seen[0]  # nothing taken by the fast path overtook it
                seen[0] += len(item.samples)
                queued.append(item)
            last = item
    assert calls and all(n == 0 for n in calls)  # only ever asked on an empty channel
    assert len(queued) >= (len(calls) + 1) // 2  # every refusal, plus what queued behind
    assert server.stats().deltas_sent == len(queued) + len(calls) // 2
    assert seen[0] == server.stats().audio_samples_sent
    assert isinstance(last, p.SessionComplete)


async def test_delta_frames_of_any_json_shape_decode_alike() -> None:
    # The connection splits a compact delta frame with "delta" last without parsing its
    # base64 as JSON; every other spelling of the same event (spaces, "delta" first, an
    # escaped "/" in the base64, a field after it) takes the full parse: same samples.
    b64 = base64.b64encode(PCM.tobytes()).decode()
    RID = "resp_1"  # noqa: N806 (the peer's response)
    assert "/" in b64  # the escape below changes the text
    compact = _delta_text()
    frames = [
        compact,
        compact.replace('","delta":"', '", "delta": "'),
        orjson.dumps({"delta": b64, "type": "response.audio.delta", "response_id": RID}).decode(),
        compact.replace(b64, b64.replace("/", "\\/")),
        compact[:-1] + ',"item_id":"item_1"}',
    ]
    assert compact.endswith('"}') and ',"delta":"' in compact

    async def body(ws: ServerConnection) -> None:
        for text in frames:
            await ws.send(text)

    async with peer(body) as ep:
        items = await items_of(ep)
    audio = [i for i in items if isinstance(i, Audio)]
    assert len(audio) == len(frames)
    assert all(np.array_equal(a.samples, PCM) for a in audio)
    assert [a.offset for a in audio] == [i * len(PCM) for i in range(len(frames))]
