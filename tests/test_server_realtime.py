"""The local server's realtime endpoint over real loopback WebSockets (protocol.md §5, §7).

The client side is plain ``websockets`` (the engine is tested elsewhere): these tests pin the
wire behaviour, compare event order with the §5.7 transcripts, and exercise every fault knob.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import orjson
import pybase64
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import Enroll
from tts_stream.messages import VC_MODELS, parse_server_event
from tts_stream.server import LocalServer

TIMEOUT = 10.0
MODEL = VC_MODELS[0]
RESPONSE_EVENTS = [
    "input_text_buffer.committed",
    "response.created",
    "response.output_item.added",
    "response.content_part.added",
    "response.audio.delta",  # one or more, collapsed by squash()
    "response.audio.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.done",
]
ID_RE = {
    "event": re.compile(r"^event_[0-9A-Za-z]{21}$"),
    "resp": re.compile(r"^resp_[0-9A-Za-z]{21}$"),
    "item": re.compile(r"^item_[0-9A-Za-z]{21}$"),
    "sess": re.compile(r"^sess_[0-9A-Za-z]{21}$"),
}


@asynccontextmanager
async def session(
    srv: LocalServer, *, model: str = MODEL, api_key: str | None = None
) -> AsyncIterator[ClientConnection]:
    headers = {"Authorization": f"Bearer {api_key or srv.api_key}"}
    async with asyncio.timeout(TIMEOUT):
        ws = await connect(
            f"{srv.ws_url}?model={model}",
            additional_headers=headers,
            compression=None,
            max_size=None,
        )
    try:
        yield ws
    finally:
        async with asyncio.timeout(TIMEOUT):
            await ws.close()


async def send(ws: ClientConnection, type_: str, **fields: Any) -> None:
    await ws.send(orjson.dumps({"event_id": f"event_{type_}", "type": type_, **fields}).decode())


async def recv(ws: ClientConnection, wait_s: float = TIMEOUT) -> dict[str, Any]:
    async with asyncio.timeout(wait_s):
        frame = await ws.recv()
    assert isinstance(frame, str), "the server sends text frames only (§5.3)"
    event = orjson.loads(frame)
    parse_server_event(frame)  # every frame parses with the shared vocabulary
    assert isinstance(event, dict)
    return event


async def until(ws: ClientConnection, type_: str) -> list[dict[str, Any]]:
    """Every event up to and including the first of ``type_``."""
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(TIMEOUT):
        while True:
            event = await recv(ws)
            out.append(event)
            if event["type"] == type_:
                return out


async def rest(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every event until the server closes the connection."""
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(TIMEOUT):
        try:
            while True:
                out.append(await recv(ws))
        except ConnectionClosed:
            return out


def squash(events: list[dict[str, Any]]) -> list[str]:
    """Event types with consecutive deltas collapsed into one."""
    out: list[str] = []
    for e in events:
        if not (e["type"] == "response.audio.delta" and out and out[-1] == e["type"]):
            out.append(e["type"])
    return out


def audio_of(events: list[dict[str, Any]]) -> bytes:
    return b"".join(
        pybase64.b64decode(e["delta"]) for e in events if e["type"] == "response.audio.delta"
    )


def characters(events: list[dict[str, Any]]) -> list[int]:
    return [e["response"]["usage"]["characters"] for e in events if e["type"] == "response.done"]


async def configure(ws: ClientConnection, voice: str, **session: Any) -> dict[str, Any]:
    created = await recv(ws)
    assert created["type"] == "session.created"
    await send(ws, "session.update", session={"voice": voice, **session})
    updated = await recv(ws)
    assert updated["type"] == "session.updated", updated
    return updated


# --- the transcripts of §5.7 ---------------------------------------------------------------------


async def test_transcript_a_server_commit(server: LocalServer, voice: str) -> None:
    async with session(server) as ws:
        created = await recv(ws)
        assert created["type"] == "session.created"
        s = created["session"]
        assert {
            k: s[k] for k in ("object", "mode", "model", "voice", "response_format", "sample_rate")
        } == {
            "object": "realtime.session",
            "mode": "server_commit",
            "model": MODEL,
            "voice": "Cherry",
            "response_format": "pcm",
            "sample_rate": 24000,
        }
        assert ID_RE["sess"].match(s["id"]) and ID_RE["event"].match(created["event_id"])
        await send(
            ws,
            "session.update",
            session={
                "voice": voice,
                "mode": "server_commit",
                "response_format": "pcm",
                "sample_rate": 24000,
                "language_type": "English",
            },
        )
        updated = await recv(ws)
        assert updated["type"] == "session.updated"
        assert updated["session"] == {
            "id": s["id"],
            "object": "realtime.session",
            "model": MODEL,
            "voice": voice,
            "language_type": "English",
            "mode": "server_commit",
            "response_format": "pcm",
            "sample_rate": 24000,
        }
        await send(ws, "input_text_buffer.append", text="Right? I love supermarkets like this. ")
        await send(ws, "input_text_buffer.append", text="Especially during the New Year holidays.")
        first = await until(ws, "response.audio.delta")  # the cut happens before finish
        await send(ws, "session.finish")
        events = first + await rest(ws)
        assert ws.close_code == 1000
    assert squash(events) == [*RESPONSE_EVENTS, "session.finished"]
    assert characters(events) == [78]
    created_resp = next(e for e in events if e["type"] == "response.created")["response"]
    assert ID_RE["resp"].match(created_resp["id"]) and created_resp["voice"] == voice
    item = next(e for e in events if e["type"] == "response.output_item.added")["item"]
    assert ID_RE["item"].match(item["id"])
    for e in events:
        assert ID_RE["event"].match(e["event_id"]), e
        if e["type"] == "response.audio.delta":
            assert e["response_id"] == created_resp["id"] and e["item_id"] == item["id"]
    done = events[-2]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"] == [
        {"type": "audio", "transcript": ""}
    ]
    pcm = audio_of(events)
    assert len(pcm) % 2 == 0 and len(pcm) > 24000 * 2  # more than a second of audio
    stats = server.stats()
    assert stats.sessions_finished == 1 and stats.responses == 1


async def test_transcript_b_commit_two_turns_and_clear(server: LocalServer, voice: str) -> None:
    async with session(server, model=MODEL) as ws:
        await configure(ws, voice, mode="commit", language_type="Chinese")
        await send(ws, "input_text_buffer.append", text="您好，")
        await send(ws, "input_text_buffer.append", text="我是千问。")
        await send(ws, "input_text_buffer.commit")
        turn1 = await until(ws, "response.done")
        await send(ws, "input_text_buffer.append", text="This sentence will be discarded.")
        await send(ws, "input_text_buffer.clear")
        cleared = await recv(ws)
        assert cleared["type"] == "input_text_buffer.cleared"
        await send(ws, "input_text_buffer.append", text="How can I help you today?")
        await send(ws, "input_text_buffer.commit")
        turn2 = await until(ws, "response.done")
        await send(ws, "session.finish")
        tail = await rest(ws)
        assert ws.close_code == 1000
    assert squash(turn1) == RESPONSE_EVENTS and squash(turn2) == RESPONSE_EVENTS
    assert characters(turn1 + turn2) == [14, 25]
    assert [e["type"] for e in tail] == ["session.finished"]
    assert turn1[1]["response"]["id"] != turn2[1]["response"]["id"]


async def test_commit_mode_appends_never_trigger(server: LocalServer, voice: str) -> None:
    async with session(server) as ws:
        await configure(ws, voice, mode="commit")
        await send(ws, "input_text_buffer.append", text="One sentence. ")
        await send(ws, "input_text_buffer.append", text="Two sentences.")
        await send(ws, "session.finish")  # finish flushes (implicit commit)
        events = await rest(ws)
    assert squash(events) == [*RESPONSE_EVENTS, "session.finished"]
    assert characters(events) == [len("One sentence. Two sentences.")]


# --- server_commit cut rule ---------------------------------------------------------------


async def test_server_commit_cuts_on_punctuation_each_sentence(
    server: LocalServer, voice: str
) -> None:
    async with session(server) as ws:
        await configure(ws, voice)
        await send(ws, "input_text_buffer.append", text="First sentence.")
        a = await until(ws, "response.done")
        await send(ws, "input_text_buffer.append", text="第二句。")
        b = await until(ws, "response.done")
        await send(ws, "input_text_buffer.append", text="no punctuation yet")
        await send(ws, "session.finish")
        c = await rest(ws)
    assert characters(a) == [15] and characters(b) == [7]
    assert characters(c) == [len("no punctuation yet")]
    assert squash(c) == [*RESPONSE_EVENTS, "session.finished"]


async def test_server_commit_cuts_on_length_and_idle(enroll: Enroll) -> None:
    async with LocalServer(cut_max_chars=10, cut_idle_s=0.2) as srv:
        voice = await enroll(srv)
        async with session(srv) as ws:
            await configure(ws, voice)
            await send(ws, "input_text_buffer.append", text="abcdefghijkl")  # >= 10 chars
            assert characters(await until(ws, "response.done")) == [12]
            started = time.monotonic()
            await send(ws, "input_text_buffer.append", text="idle")  # cut after 0.2 s idle
            assert characters(await until(ws, "response.done")) == [4]
            assert time.monotonic() - started >= 0.15


async def test_text_appended_while_audio_streams(enroll: Enroll) -> None:
    """The synthesizer runs concurrently with receiving; responses never interleave."""
    async with LocalServer(pacing="realtime") as srv:
        voice = await enroll(srv)
        async with session(srv) as ws:
            await configure(ws, voice, mode="commit")
            await send(ws, "input_text_buffer.append", text="A first turn of some length.")
            await send(ws, "input_text_buffer.commit")
            events = await until(ws, "response.audio.delta")
            await send(ws, "input_text_buffer.append", text="Second turn.")  # mid-response
            await send(ws, "input_text_buffer.commit")
            await send(ws, "session.finish")
            events += await rest(ws)
    assert squash(events) == [*RESPONSE_EVENTS, *RESPONSE_EVENTS, "session.finished"]
    assert characters(events) == [28, 12]


async def test_realtime_pacing_follows_the_audio_clock(enroll: Enroll) -> None:
    async with LocalServer(pacing="realtime") as srv:
        voice = await enroll(srv)
        async with session(srv) as ws:
            await configure(ws, voice, mode="commit")
            await send(ws, "input_text_buffer.append", text="x" * 25)  # tone: 60 ms per char
            await send(ws, "input_text_buffer.commit")
            first = await until(ws, "response.audio.delta")
            t0 = time.monotonic()
            events = first + await until(ws, "response.done")
            elapsed = time.monotonic() - t0
    seconds = len(audio_of(events)) / 2 / 24000
    assert seconds >= 1.4
    # The last delta leaves at start + (audio before it) / rate: generous bounds, noisy host.
    assert seconds - 0.1 - 0.3 <= elapsed <= seconds + 2.0


async def test_delta_size_follows_sample_rate_and_delta_ms(enroll: Enroll) -> None:
    async with LocalServer(delta_ms=50) as srv:
        voice = await enroll(srv)
        async with session(srv) as ws:
            await configure(ws, voice, mode="commit", sample_rate=16000)
            await send(ws, "input_text_buffer.append", text="Hello there, general.")
            await send(ws, "input_text_buffer.commit")
            events = await until(ws, "response.done")
    sizes = [
        len(pybase64.b64decode(e["delta"])) for e in events if e["type"] == "response.audio.delta"
    ]
    assert sizes[:-1] == [16000 * 2 // 20] * (len(sizes) - 1)
    assert 0 < sizes[-1] <= 1600 and sizes[-1] % 2 == 0


async def test_wav_format_sends_one_riff_header_per_response(
    server: LocalServer, voice: str
) -> None:
    async with session(server) as ws:
        await configure(ws, voice, mode="commit", response_format="wav", sample_rate=8000)
        await send(ws, "input_text_buffer.append", text="Hello.")
        await send(ws, "input_text_buffer.commit")
        data = audio_of(await until(ws, "response.done"))
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt " and data[36:40] == b"data"
    assert int.from_bytes(data[24:28], "little") == 8000
    assert data.count(b"RIFF") == 1 and len(data) > 44


async def test_volume_scales_the_audio(server: LocalServer, voice: str) -> None:
    peaks = []
    for volume in (50, 10):
        async with session(server) as ws:
            await configure(ws, voice, mode="commit", volume=volume)
            await send(ws, "input_text_buffer.append", text="Same text.")
            await send(ws, "input_text_buffer.commit")
            pcm = np.frombuffer(audio_of(await until(ws, "response.done")), "<i2")
            peaks.append(int(np.abs(pcm.astype(np.int32)).max()))
    assert peaks[1] < peaks[0] * 0.3


# --- session.update validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("mode", "manual"),
        ("language_type", "Klingon"),
        ("response_format", "flac"),
        ("sample_rate", 44100),
        ("sample_rate", "24000"),
        ("speech_rate", 2.5),
        ("pitch_rate", 0.1),
        ("volume", 101),
        ("volume", 5.5),
        ("bit_rate", 5),
        ("bit_rate", 511),
        ("enable_tn", "yes"),
        ("voice", ""),
    ],
)
async def test_session_update_rejects_bad_values(
    server: LocalServer, voice: str, key: str, value: Any
) -> None:
    async with session(server) as ws:
        await configure(ws, voice, mode="commit")
        await send(ws, "session.update", session={"bit_rate": 64, key: value})
        err = await recv(ws)
        assert err["type"] == "error"
        assert err["error"]["code"] == "invalid_value"
        assert err["error"]["param"] == f"session.{key}"
        assert err["error"]["event_id"] == "event_session.update"
        # Atomic: nothing of the rejected update applied; the session goes on.
        await send(ws, "session.update", session={"sample_rate": 16000})
        updated = (await recv(ws))["session"]
        assert updated["mode"] == "commit" and updated["voice"] == voice
        assert "bit_rate" not in updated and updated["sample_rate"] == 16000


async def test_session_update_is_partial_and_echoes_accepted_keys(
    server: LocalServer, voice: str
) -> None:
    async with session(server) as ws:
        await configure(ws, voice)
        await send(
            ws,
            "session.update",
            session={"volume": 80, "enable_tn": True, "speech_rate": 1.5, "language_type": "auto"},
        )
        s = (await recv(ws))["session"]
        assert s["voice"] == voice and s["mode"] == "server_commit"
        assert s["volume"] == 80 and s["enable_tn"] is True and s["speech_rate"] == 1.5
        assert s["language_type"] == "Auto"


async def test_voice_checks(server: LocalServer, voice: str, enroll: Enroll) -> None:
    other_model = await enroll(server, target_model=VC_MODELS[1])
    other_key = "sk-other-tenant"
    server.add_api_key(other_key)
    missing = "qwen-tts-vc-nobody-voice-20260115103000123-a1b2"
    cases = [
        (missing, "The requested voice '{}' is not supported."),
        (other_model, "The requested voice '{}' is not supported."),
        ("Cherry", "[qwen-tts:]Engine return error code: 411"),
    ]
    async with session(server) as ws:
        await recv(ws)
        for name, message in cases:
            await send(ws, "session.update", session={"voice": name})
            err = await recv(ws)
            assert err["type"] == "error"
            assert err["error"]["code"] == "invalid_value"
            assert err["error"]["message"] == message.format(name)
            assert err["error"]["param"] == "session.voice"
    # Another key cannot use the voice either (tenant isolation).
    async with session(server, api_key=other_key) as ws:
        await recv(ws)
        await send(ws, "session.update", session={"voice": voice})
        err = await recv(ws)
        assert err["error"]["message"] == f"The requested voice '{voice}' is not supported."


async def test_text_without_a_cloned_voice_gets_engine_error(server: LocalServer) -> None:
    async with session(server) as ws:
        await recv(ws)
        await send(ws, "input_text_buffer.append", text="Hello.")  # cut, but voice is Cherry
        err = await recv(ws)
        assert err["type"] == "error" and "411" in err["error"]["message"]


async def test_update_after_synthesis_started_is_refused(server: LocalServer, voice: str) -> None:
    async with session(server) as ws:
        await configure(ws, voice, mode="commit")
        await send(ws, "input_text_buffer.append", text="Hi.")
        await send(ws, "input_text_buffer.commit")
        await until(ws, "response.done")
        await send(ws, "session.update", session={"voice": voice})
        err = await recv(ws)
        assert err["type"] == "error" and err["error"]["code"] == "invalid_value"
        assert err["error"]["message"] == (
            "Session update error: session already started or finished or failed."
        )


# --- errors the session survives -----------------------------------------------------------------


async def test_empty_commit_malformed_and_unknown_events_survive(
    server: LocalServer, voice: str
) -> None:
    async with session(server) as ws:
        await configure(ws, voice, mode="commit")
        await send(ws, "input_text_buffer.commit")
        err = await recv(ws)
        assert err["error"] == {
            "type": "invalid_request_error",
            "code": "invalid_value",
            "message": "Input text buffer is empty.",
            "event_id": "event_input_text_buffer.commit",
        }
        for bad in (
            "{not json",
            "[1, 2]",
            '{"no_type": 1}',
            '{"type": "input_text_buffer.append", "text": 5}',
        ):
            await ws.send(bad)
            err = await recv(ws)
            assert err["type"] == "error" and err["error"]["code"] == "invalid_value"
        await ws.send(b"\x00\x01")
        assert (await recv(ws))["type"] == "error"
        for unknown in ("response.create", "response.cancel", "conversation.item.create"):
            await send(ws, unknown)
            err = await recv(ws)
            assert err["error"]["message"] == f"Unsupported event type: '{unknown}'."
        await send(ws, "input_text_buffer.append", text="Still alive.")
        await send(ws, "input_text_buffer.commit")
        assert characters(await until(ws, "response.done")) == [12]
    assert server.stats().errors_sent == 9


async def test_cancel_truncates_when_enabled(enroll: Enroll) -> None:
    async with LocalServer(cancel="truncate", pacing="realtime") as srv:
        voice = await enroll(srv)
        async with session(srv) as ws:
            await configure(ws, voice, mode="commit")
            await send(ws, "response.cancel")  # nothing to cancel yet
            assert "no active response" in (await recv(ws))["error"]["message"]
            await send(ws, "input_text_buffer.append", text="A long text " * 20)
            await send(ws, "input_text_buffer.commit")
            await until(ws, "response.audio.delta")
            await send(ws, "response.cancel")
            events = await until(ws, "response.done")
    done = events[-1]["response"]
    assert done["status"] == "incomplete" and done["usage"]["characters"] == 240
    assert squash(events)[-4:] == RESPONSE_EVENTS[-4:]
    assert len(audio_of(events)) < 240 * 0.06 * 24000 * 2 / 2  # far less than the full text


# --- handshake -----------------------------------------------------------------------------------


async def _handshake_status(url: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as info:
        async with asyncio.timeout(TIMEOUT):
            await connect(url, additional_headers=headers)
    response = info.value.response
    return response.status_code, orjson.loads(response.body or b"{}")


async def test_handshake_auth_and_model(server: LocalServer) -> None:
    url = f"{server.ws_url}?model={MODEL}"
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": server.api_key}):
        status, body = await _handshake_status(url, headers)
        assert status == 401 and body["code"] == "InvalidApiKey"
        assert len(body["request_id"]) == 36
    status, body = await _handshake_status(
        server.ws_url, {"Authorization": f"Bearer {server.api_key}"}
    )
    assert status == 400 and body["code"] == "InvalidParameter"
    stats = server.stats()
    assert stats.handshakes == 4 and stats.handshakes_refused == 4 and stats.sessions_opened == 0


async def test_unknown_model_sends_session_created_then_closes(server: LocalServer) -> None:
    async with session(server, model="qwen-no-such-model") as ws:
        events = await rest(ws)
        assert [e["type"] for e in events] == ["session.created"]
        assert events[0]["session"]["model"] == "qwen-no-such-model"
        assert ws.close_code == 1000


async def test_server_shutdown_closes_sessions_with_1001(enroll: Enroll) -> None:
    srv = await LocalServer().start()
    try:
        voice = await enroll(srv)
        async with session(srv) as ws:
            await configure(ws, voice)
            await srv.aclose()
            await rest(ws)
            assert ws.close_code == 1001
    finally:
        await srv.aclose()
        await srv.aclose()  # idempotent


# --- fault knobs ----------------------------------------------------------------------------------


async def _one_turn(
    srv: LocalServer, voice: str, text: str = "x" * 40
) -> tuple[list[dict[str, Any]], ClientConnection]:
    """Configure, send one commit and read until the server closes; returns events and ws."""
    async with session(srv) as ws:
        await configure(ws, voice, mode="commit")
        await send(ws, "input_text_buffer.append", text=text)
        await send(ws, "input_text_buffer.commit")
        await send(ws, "session.finish")
        events: list[dict[str, Any]] = []
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(TIMEOUT):
                while True:
                    events.append(await recv(ws))
        return events, ws


async def test_fault_drop_after_deltas(server: LocalServer, voice: str) -> None:
    server.faults.set(drop_after_deltas=3, times=1)
    events, ws = await _one_turn(server, voice)
    assert [e["type"] for e in events].count("response.audio.delta") == 3
    assert events[-1]["type"] == "response.audio.delta"
    assert ws.close_code == 1006  # no close frame
    events, ws = await _one_turn(server, voice)  # times=1: the next session is clean
    assert events[-1]["type"] == "session.finished" and ws.close_code == 1000


async def test_fault_close_after_deltas_with_code(server: LocalServer, voice: str) -> None:
    server.faults.set(close_after_deltas=2, close_code=1011, times=1)
    events, ws = await _one_turn(server, voice)
    assert [e["type"] for e in events].count("response.audio.delta") == 2
    assert ws.close_code == 1011


async def test_fault_error_event_at_delta(server: LocalServer, voice: str) -> None:
    server.faults.set(
        error_event_at="delta:3",
        error_code="InternalError",
        error_message="boom",
        error_close_code=1011,
        times=1,
    )
    events, ws = await _one_turn(server, voice)
    assert squash(events)[-2:] == ["response.audio.delta", "error"]
    assert [e["type"] for e in events].count("response.audio.delta") == 2
    assert events[-1]["error"] == {"code": "InternalError", "message": "boom"}
    assert ws.close_code == 1011


@pytest.mark.parametrize("step", ["session.update", "append", "commit"])
async def test_fault_error_event_at_client_step(server: LocalServer, voice: str, step: str) -> None:
    server.faults.set(error_event_at=step, error_code="InternalError", times=1)
    async with session(server) as ws:
        await recv(ws)
        await send(ws, "session.update", session={"voice": voice, "mode": "commit"})
        if step == "session.update":
            assert (await recv(ws))["type"] == "error"
            await send(ws, "session.update", session={"voice": voice, "mode": "commit"})
        assert (await recv(ws))["type"] == "session.updated"
        await send(ws, "input_text_buffer.append", text="Hi.")
        await send(ws, "input_text_buffer.commit")
        await send(ws, "session.finish")
        events = await rest(ws)
    types = squash(events)
    if step == "session.update":
        assert types == [*RESPONSE_EVENTS, "session.finished"]
    elif step == "append":  # the append was replaced by the error: the commit finds nothing
        assert types == ["error", "error", "session.finished"]
        assert events[0]["error"]["code"] == "InternalError"
        assert events[1]["error"]["message"] == "Input text buffer is empty."
    else:  # the commit was replaced: finish flushes the buffered text
        assert types == ["error", *RESPONSE_EVENTS, "session.finished"]


async def test_fault_first_audio_delay_and_delta_interval(server: LocalServer, voice: str) -> None:
    server.faults.set(first_audio_delay_s=0.3, delta_interval_s=0.05, times=1)
    async with session(server) as ws:
        await configure(ws, voice, mode="commit")
        await send(ws, "input_text_buffer.append", text="x" * 10)  # 0.75 s of tone: 8 deltas
        await send(ws, "input_text_buffer.commit")
        t0 = time.monotonic()
        await until(ws, "response.audio.delta")
        first = time.monotonic() - t0
        events = await until(ws, "response.done")
        total = time.monotonic() - t0
    n = [e["type"] for e in events].count("response.audio.delta") + 1
    assert first >= 0.25
    assert total >= 0.25 + (n - 1) * 0.05 * 0.8


async def test_fault_stall_keeps_socket_open_and_silent(server: LocalServer, voice: str) -> None:
    server.faults.set(stall_after_deltas=2, times=1)
    async with session(server) as ws:
        await configure(ws, voice, mode="commit")
        await send(ws, "input_text_buffer.append", text="x" * 40)
        await send(ws, "input_text_buffer.commit")
        events = await until(ws, "response.audio.delta")
        events.append(await recv(ws))
        assert events[-1]["type"] == "response.audio.delta"
        with pytest.raises(TimeoutError):
            await recv(ws, wait_s=0.5)  # stalled: nothing more arrives ...
        await ws.ping()  # ... yet the connection is alive
    assert server.stats().deltas_sent == 2


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (401, "InvalidApiKey"),
        (403, "AccessDenied"),
        (429, "Throttling.RateQuota"),
        (503, "ServiceUnavailable"),
    ],
)
async def test_fault_refuse_handshake(
    server: LocalServer, voice: str, status: int, code: str
) -> None:
    server.faults.set(refuse_handshake=status, times=1)
    url = f"{server.ws_url}?model={MODEL}"
    got, body = await _handshake_status(url, {"Authorization": f"Bearer {server.api_key}"})
    assert (got, body["code"]) == (status, code)
    async with session(server) as ws:  # only the next session was refused
        await configure(ws, voice)


async def test_fault_stamp_deltas_and_omit_committed(server: LocalServer, voice: str) -> None:
    server.faults.set(stamp_deltas=True, omit_committed=True, times=1)
    before = time.monotonic()
    events, _ = await _one_turn(server, voice)
    deltas = [e for e in events if e["type"] == "response.audio.delta"]
    assert deltas and all(before <= e["x_sent_monotonic"] <= time.monotonic() for e in deltas)
    assert "input_text_buffer.committed" not in squash(events)
    events, _ = await _one_turn(server, voice)  # reset after one session
    assert "x_sent_monotonic" not in next(e for e in events if e["type"] == "response.audio.delta")
    assert "input_text_buffer.committed" in squash(events)


async def test_faults_without_times_stay_on_until_reset(server: LocalServer, voice: str) -> None:
    server.faults.close_after_deltas = 1
    for _ in range(2):
        _, ws = await _one_turn(server, voice)
        assert ws.close_code == 1011
    server.faults.reset()
    _, ws = await _one_turn(server, voice)
    assert ws.close_code == 1000
    with pytest.raises(AttributeError):
        server.faults.set(no_such_knob=1)


async def test_stats_count_everything(server: LocalServer, voice: str) -> None:
    assert server.stats().handshakes == 0  # "no request was sent"
    events, _ = await _one_turn(server, voice)
    stats = server.stats()
    deltas = [e for e in events if e["type"] == "response.audio.delta"]
    assert stats.handshakes == stats.sessions_opened == stats.sessions_finished == 1
    assert stats.deltas_sent == len(deltas) and stats.responses == 1
    assert stats.audio_samples_sent == len(audio_of(events)) // 2
    assert stats.client_events == 4 and stats.http_requests == 1 and stats.voices_created == 1


# --- real speech ---------------------------------------------------------------------------------


async def test_espeak_backend_streams_real_speech(enroll: Enroll) -> None:
    async with LocalServer(backend="espeak") as srv:
        voice = await enroll(srv)
        async with session(srv) as ws:
            await configure(ws, voice, mode="commit", language_type="English")
            await send(
                ws,
                "input_text_buffer.append",
                text="Hello, this is a real speech test. It should sound like words.",
            )
            await send(ws, "input_text_buffer.commit")
            await send(ws, "session.finish")
            events = await rest(ws)
    assert squash(events) == [*RESPONSE_EVENTS, "session.finished"]
    pcm = np.frombuffer(audio_of(events), "<i2").astype(np.float64)
    seconds = pcm.size / 24000
    assert 2.0 <= seconds <= 10.0
    frames = pcm[: pcm.size // 480 * 480].reshape(-1, 480)  # 20 ms frames
    rms = np.sqrt((frames**2).mean(axis=1))
    voiced = rms > 500
    assert voiced.mean() > 0.4  # mostly speech ...
    assert (~voiced).mean() > 0.05  # ... with gaps between words, unlike a steady tone


async def test_fault_error_right_after_session_created(server: LocalServer, voice: str) -> None:
    server.faults.set(error_event_at="session.created", error_message="warming up", times=2)
    async with session(server) as ws:
        assert (await recv(ws))["type"] == "session.created"
        assert (await recv(ws))["error"]["message"] == "warming up"
        await send(ws, "session.update", session={"voice": voice})  # the session goes on
        assert (await recv(ws))["type"] == "session.updated"
    server.faults.set(error_event_at="session.created", error_close_code=1011, times=1)
    async with session(server) as ws:
        events = await rest(ws)
        assert [e["type"] for e in events] == ["session.created", "error"]
        assert ws.close_code == 1011


async def test_api_key_never_appears_in_repr_or_logs(
    enroll: Enroll, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import tts_stream.server as server_pkg

    assert server_pkg.__all__ == ["Faults", "LocalServer"]
    key = "sk-secret-key-that-must-not-leak"
    caplog.set_level(logging.DEBUG, logger="tts_stream")
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    async with LocalServer(api_key=key) as srv:
        assert key not in repr(srv) and key not in str(srv)
        voice = await enroll(srv)
        events, _ = await _one_turn(srv, voice)
        assert events[-1]["type"] == "session.finished"
    server_side = [r for r in caplog.records if r.name.startswith(("tts_stream", "aiohttp"))]
    assert server_side
    assert not [r for r in server_side if key in r.getMessage()]


async def test_fault_committed_quirks(server: LocalServer, voice: str) -> None:
    server.faults.set(duplicate_committed=True, times=1)
    events, _ = await _one_turn(server, voice)
    assert squash(events)[:2] == ["input_text_buffer.committed"] * 2


async def test_fault_appends_ignored_during_response(enroll: Enroll) -> None:
    async with LocalServer(pacing="realtime") as srv:
        voice = await enroll(srv)
        srv.faults.set(ignore_appends_during_response=True, times=1)
        async with session(srv) as ws:
            await configure(ws, voice, mode="commit")
            await send(ws, "input_text_buffer.append", text="x" * 20)
            await send(ws, "input_text_buffer.commit")
            events = await until(ws, "response.audio.delta")
            await send(ws, "input_text_buffer.append", text="lost")  # ignored mid-response
            events += await until(ws, "response.done")
            await send(ws, "input_text_buffer.commit")
            err = await recv(ws)
    assert err["error"]["message"] == "Input text buffer is empty."


async def test_plain_get_without_upgrade_is_a_400(server: LocalServer) -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    headers = {"Authorization": f"Bearer {server.api_key}"}
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.get(f"{server.ws_url.replace('ws', 'http', 1)}?model={MODEL}", headers=headers) as r,
    ):
        body = await r.json()
        assert r.status == 400 and body["code"] == "InvalidParameter"
        assert r.headers["x-request-id"] == body["request_id"]


async def test_client_vanishing_mid_response_leaves_the_server_healthy(enroll: Enroll) -> None:
    async with LocalServer(pacing="realtime") as srv:
        voice = await enroll(srv)
        async with session(srv) as ws:
            await configure(ws, voice, mode="commit")
            await send(ws, "input_text_buffer.append", text="x" * 60)
            await send(ws, "input_text_buffer.commit")
            await until(ws, "response.audio.delta")
            ws.transport.abort()  # no close frame from the client either
        events, ws = await _one_turn(srv, voice, text="after")
        assert events[-1]["type"] == "session.finished" and ws.close_code == 1000
        async with session(srv) as ws:  # and a shutdown in the middle of a response
            await configure(ws, voice, mode="commit")
            await send(ws, "input_text_buffer.append", text="x" * 60)
            await send(ws, "input_text_buffer.commit")
            await until(ws, "response.audio.delta")
            await srv.aclose()
            await rest(ws)
            assert ws.close_code == 1001
