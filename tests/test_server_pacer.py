"""The local server's shared pacer and its direct delta writes (issue 11, server side).

The pacer on its own loop (real timers, no server), then real-time sessions over loopback
WebSockets against :class:`LocalServer`: each keeps its own schedule and order while one
pacer serves them all, a cancelled response leaves it, and a client that stops reading
holds its response back (the direct writes keep aiohttp's flow control).
"""

from __future__ import annotations

import asyncio
import time

import pybase64
import pytest

from tests.conftest import Enroll
from tests.test_server_realtime import configure, recv, send, session, until
from tts_stream.server import LocalServer
from tts_stream.server.faults import Counters
from tts_stream.server.pacer import EARLY, Pacer
from tts_stream.server.session import DeltaFrames, Ids, ws_text_header

RATE = 24000


async def test_waiters_resume_in_due_order_never_before_their_time() -> None:
    pacer = Pacer.for_loop()
    assert Pacer.for_loop() is pacer  # one per loop
    woke: list[tuple[int, float]] = []
    t0 = time.monotonic()
    dues = [t0 + d for d in (0.12, 0.03, 0.08, 0.031, 0.2)]

    async def waiter(i: int, due: float) -> None:
        await pacer.sleep_until(due)
        woke.append((i, time.monotonic()))

    await asyncio.gather(*(waiter(i, d) for i, d in enumerate(dues)))
    order = [i for i, _ in woke]
    assert order == sorted(range(len(dues)), key=lambda i: dues[i])
    for i, at in woke:
        assert at >= dues[i] - EARLY
    assert pacer.stats().waiting == 0
    # 0.03 and 0.031 are within EARLY of each other: one wake-up resumed both.
    assert pacer.stats().wakeups < len(dues)


async def test_a_due_time_already_reached_returns_without_waiting() -> None:
    assert Pacer.for_loop().wait(time.monotonic() - 1.0) is None
    assert Pacer.for_loop().wait(time.monotonic() + EARLY / 2) is None


async def test_a_cancelled_waiter_leaves_the_pacer_and_the_others_keep_time() -> None:
    pacer = Pacer.for_loop()
    before = pacer.stats().resumed
    t0 = time.monotonic()
    gone = asyncio.create_task(pacer.sleep_until(t0 + 0.05))
    kept = asyncio.create_task(pacer.sleep_until(t0 + 0.1))
    await asyncio.sleep(0.01)
    assert pacer.stats().waiting == 2
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert pacer.stats().waiting == 1
    await kept
    assert time.monotonic() >= t0 + 0.1 - EARLY
    assert pacer.stats().resumed == before + 1  # the cancelled one was never resumed
    assert pacer.stats().waiting == 0


def test_late_deltas_are_counted_at_both_thresholds() -> None:
    c = Counters()
    c.count_late(0.03)
    c.count_late(0.07)
    assert (c.deltas_late_20ms, c.deltas_late_50ms) == (2, 1)
    snap = c.snapshot()
    assert (snap.deltas_late_20ms, snap.deltas_late_50ms) == (2, 1)


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_ws_text_header_is_rfc6455(size: int) -> None:
    header = ws_text_header(size)
    assert header[0] == 0x81  # FIN, text, no RSV bits (uncompressed), server side: no mask
    if size < 126:
        assert header[1:] == bytes((size,))
    elif size < 65536:
        assert header[1] == 126 and int.from_bytes(header[2:], "big") == size
    else:
        assert header[1] == 127 and int.from_bytes(header[2:], "big") == size


@pytest.mark.parametrize("stamp", [None, 12345.678901])
def test_ws_frame_is_the_delta_in_its_websocket_frame(stamp: float | None) -> None:
    b64 = pybase64.b64encode(b"\1\2" * 2400)
    a = DeltaFrames(Ids(b"s" * 13, 7), "resp_A", "item_B")
    b = DeltaFrames(Ids(b"s" * 13, 7), "resp_A", "item_B")
    payload = a.frame(b64, stamp)
    assert b.ws_frame(b64, stamp) == ws_text_header(len(payload)) + payload


async def test_sessions_sharing_the_pacer_each_keep_their_schedule(enroll: Enroll) -> None:
    """Three real-time sessions started at different moments on one server (one pacer):
    every delta in order, none sent before its own session's schedule minus EARLY."""
    async with LocalServer(pacing="realtime") as srv:
        srv.faults.stamp_deltas = True
        srv.faults.times = None
        voice = await enroll(srv)

        async def one(delay: float, chars: int) -> list[tuple[float, int]]:
            await asyncio.sleep(delay)
            async with session(srv) as ws:
                await configure(ws, voice, mode="commit")
                await send(ws, "input_text_buffer.append", text="x" * chars)
                await send(ws, "input_text_buffer.commit")
                events = await until(ws, "response.done")
            out, before = [], 0
            for e in events:
                if e["type"] == "response.audio.delta":
                    out.append((e["x_sent_monotonic"], before))
                    before += len(pybase64.b64decode(e["delta"])) // 2
            return out

        runs = await asyncio.gather(one(0.0, 12), one(0.035, 9), one(0.07, 15))
    for deltas in runs:
        assert len(deltas) >= 5
        stamps = [s for s, _ in deltas]
        assert stamps == sorted(stamps)
        t0 = stamps[0]
        for sent, before in deltas:
            assert sent - t0 >= before / RATE - EARLY - 1e-3


async def test_cancelled_response_leaves_the_pacer(enroll: Enroll) -> None:
    async with LocalServer(cancel="truncate", pacing="realtime") as srv:
        voice = await enroll(srv)
        async with session(srv) as ws:
            await configure(ws, voice, mode="commit")
            await send(ws, "input_text_buffer.append", text="x" * 200)  # 12 s of audio
            await send(ws, "input_text_buffer.commit")
            await until(ws, "response.audio.delta")
            await send(ws, "response.cancel")
            done = (await until(ws, "response.done"))[-1]
            assert done["response"]["status"] == "incomplete"
            await asyncio.sleep(0.25)  # past the cancelled waiter's due time
            assert Pacer.for_loop().stats().waiting == 0


async def test_a_client_that_stops_reading_holds_its_response_back(enroll: Enroll) -> None:
    """Deltas go straight to the transport; past the high-water mark the response waits for
    the client (as aiohttp's own writer did): nothing is buffered without bound."""
    async with LocalServer() as srv:  # burst: the server would send everything at once
        voice = await enroll(srv)
        async with session(srv) as ws:
            await configure(ws, voice, mode="commit", sample_rate=48000)
            await send(ws, "input_text_buffer.append", text="x" * 3000)  # 180 s, ~23 MB
            await send(ws, "input_text_buffer.commit")
            total = 1800
            await asyncio.sleep(1.5)  # not reading: socket buffers fill, then the server waits
            held = srv.stats().deltas_sent
            assert held < total
            n = 0
            async with asyncio.timeout(60):
                while (event := await recv(ws))["type"] != "response.done":
                    n += event["type"] == "response.audio.delta"
            assert n == total
