"""Micro-benchmark of the per-delta data path between the socket and the sinks.

Measures, in-process and without a server, the cost per item of:

* ``channel``: the reader → pump :class:`~tts_stream.channel.Channel` (``send_nowait`` +
  ``receive_nowait``, and a producer/consumer pair that blocks on a full channel);
* ``handle``: one ``response.audio.delta`` frame through the connection's parser, the
  protocol machine and the base64 decoding up to the consumer's fast path
  (``Connection._handle``, the frame callback's work);
* ``fanout``: ``Fanout.write`` of a 100 ms frame into (a) a sink taking ``write_nowait``
  (idle lane, no queue), (b) an ``ArraySink`` read by a consumer task (the lane's queue and
  task), (c) a drop-oldest lane nobody drains;
* ``recorder_delta``, ``ledger_audio``, ``frame``: the pump's other per-delta calls
  (``Recorder.delta`` with a server stamp, ``Ledger.audio``, ``audio.Frame(...)``);
* ``speech_delta``: the whole per-delta path of ``--streams`` live speeches (default 200,
  as bench.concurrency's first point), round robin, one delta each per round: the frame
  callback's ``_handle`` of a stamped delta through ``Speech._audio_nowait``, the fan-out
  and a sink that stamps every write (bench.concurrency's ``TimingSink``). The speeches
  are real (an :class:`~tts_stream.Engine` on a :class:`~tts_stream.server.LocalServer` in
  this process, sessions opened, no text sent, so the server is idle while the clock
  runs); only the socket read is left out. Many streams, not one in a loop: the objects of
  200 streams do not stay in the CPU's first-level cache as one stream's would.

Usage::

    .venv/bin/python -m bench.hotpath                   # 5 repeats, medians, one JSON line
    .venv/bin/python -m bench.hotpath --repeat 9 --loop uvloop

The figures of each case are the median and the minimum over ``--repeat`` runs of the mean
CPU time per item (``time.process_time``: the machine is shared, wall time would count other
processes; the minimum is the least disturbed run); the load (``os.getloadavg``) is recorded
with them. Only public APIs, except ``Connection._handle`` and its channel (the frame
callback's per-message step has no public entry without a socket).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable

import numpy as np
import orjson

from sinks import ArraySink
from tts_stream.audio import AudioFormat, Frame, SinkStats
from tts_stream.channel import Channel
from tts_stream.config import Endpoint
from tts_stream.connection import Connection
from tts_stream.fanout import Fanout, Policy
from tts_stream.ledger import Ledger
from tts_stream.metrics import Recorder

__all__ = ["main"]

FMT = AudioFormat(24000)
SAMPLES = 2400  # a 100 ms delta at 24 kHz


class NowaitSink:
    """A sink that takes every frame without waiting (like bench.concurrency's TimingSink)."""

    def __init__(self, name: str = "nowait") -> None:
        self.name = name
        self.samples = 0

    async def open(self, fmt: AudioFormat) -> None:
        return None

    async def write(self, frame: Frame) -> None:
        self.write_nowait(frame)

    def write_nowait(self, frame: Frame) -> bool:
        self.samples += len(frame)
        return True

    async def drain(self) -> None:
        return None

    async def interrupt(self) -> int:
        return self.samples

    async def aclose(self) -> None:
        return None

    def stats(self) -> SinkStats:
        return SinkStats(self.name, self.samples, self.samples)


async def bench_channel_nowait(n: int) -> float:
    ch = Channel[int](64)
    t0 = time.process_time()
    for i in range(n):
        ch.send_nowait(i)
        ch.receive_nowait()
    return (time.process_time() - t0) / n


async def bench_channel_blocking(n: int) -> float:
    ch = Channel[int](64)

    async def produce() -> None:
        for i in range(n):
            await ch.send(i)
        ch.close_send()

    t0 = time.process_time()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(produce())
        async for _ in ch:
            pass
    return (time.process_time() - t0) / n


def _delta_frame(*, stamp: bool = False) -> str:
    """A 100 ms delta as the local server sends it (``stamp``: with ``x_sent_monotonic``)."""
    pcm = (np.sin(np.arange(SAMPLES) / 7.0) * 8000).astype("<i2").tobytes()
    event: dict[str, object] = {
        "event_id": "event_1", "type": "response.audio.delta", "response_id": "resp_1",
        "item_id": "item_1", "output_index": 0, "content_index": 0,
    }  # fmt: skip
    if stamp:
        event["x_sent_monotonic"] = time.monotonic()
    event["delta"] = base64.b64encode(pcm).decode()
    return orjson.dumps(event).decode()


async def bench_handle(n: int) -> float:
    endpoint = Endpoint.resolve(base_url="http://127.0.0.1:1", api_key="sk-bench-0123456789")
    conn = Connection(endpoint, model="m", session={"voice": "v"})
    conn._channel = Channel(64)  # what __aenter__ creates before the dial
    conn.deliver_nowait = lambda samples, rid, at, sent_at: True  # a consumer taking it all
    raw = memoryview(_delta_frame().encode())  # what picows hands the frame callback
    handle = conn._handle  # the frame callback's per-message step
    t0 = time.process_time()
    for _ in range(n):
        handle(raw)
    return (time.process_time() - t0) / n


def _frames(n: int) -> list[Frame]:
    block = np.zeros(SAMPLES, np.int16)
    return [Frame(block, i * SAMPLES, "r") for i in range(n)]


async def bench_fanout_nowait(n: int) -> float:
    frames = _frames(n)
    async with Fanout([NowaitSink()], FMT) as fan:
        t0 = time.process_time()
        for f in frames:
            await fan.write(f)
        return (time.process_time() - t0) / n


async def bench_fanout_array(n: int) -> float:
    frames = _frames(n)
    sink = ArraySink(max_blocks=4)

    async def consume() -> None:
        async for _ in sink:
            pass

    async with asyncio.TaskGroup() as tg:
        tg.create_task(consume())
        async with Fanout([sink], FMT, max_buffered_ms=500) as fan:
            t0 = time.process_time()
            for f in frames:
                await fan.write(f)
            await fan.drain()
            elapsed = time.process_time() - t0
    return elapsed / n


async def bench_fanout_lossy(n: int) -> float:
    frames = _frames(n)
    sink = ArraySink(max_blocks=1, name="monitor")  # full at once: the lane drops
    async with Fanout(
        [sink], FMT, policies={"monitor": Policy.DROP_OLDEST}, lossy_buffered_ms=300
    ) as fan:
        t0 = time.process_time()
        for f in frames:
            await fan.write(f)
        elapsed = time.process_time() - t0
        await fan.interrupt()
    return elapsed / n


async def bench_recorder_delta(n: int) -> float:
    """``Recorder.delta`` of a voiced 100 ms delta with a server stamp (the pump's metrics)."""
    block = np.full(SAMPLES, 1000, np.int16)
    rec = Recorder(sample_rate=24000)
    rec.response_created(0.0)
    t0 = time.process_time()
    for i in range(n):
        rec.delta(i * 0.1, block, server_sent_at=i * 0.1 - 0.001)
    return (time.process_time() - t0) / n


async def bench_ledger_audio(n: int) -> float:
    """``Ledger.audio`` of one delta (the offset of its frame)."""
    led = Ledger(24000)
    led.appended("Hello there.")
    led.response_started("resp_1")
    t0 = time.process_time()
    for _ in range(n):
        led.audio(SAMPLES)
    return (time.process_time() - t0) / n


async def bench_frame(n: int) -> float:
    """``audio.Frame`` construction (frozen, slotted dataclass) for one delta."""
    block = np.zeros(SAMPLES, np.int16)
    t0 = time.process_time()
    for i in range(n):
        Frame(block, i, "resp_1", 0.5)
    return (time.process_time() - t0) / n


STREAMS = 200  # --streams of speech_delta


async def bench_speech_delta(n: int) -> float:
    """The whole fast path (module docstring); ``n`` deltas over ``STREAMS`` speeches."""
    from bench.concurrency import TimingSink
    from tts_stream import Engine, Voice
    from tts_stream.messages import VC_MODELS
    from tts_stream.server import LocalServer
    from tts_stream.testing.samplegen import good_sample_wav

    # The server's send stamp, fresh each round (a stale one would put every delta's lag
    # into a new histogram bucket): the frame is the template with the stamp replaced.
    head, _, tail = _delta_frame(stamp=True).encode().partition(b'"x_sent_monotonic":')
    tail = tail[tail.index(b","):]
    async with (
        LocalServer(port=0, backend="tone") as srv,
        Engine(base_url=srv.base_url, api_key=srv.api_key, pool_size=0) as engine,
    ):
        voice = await engine.voices.create(good_sample_wav(), preferred_name="hot",
                                           target_model=VC_MODELS[0])  # fmt: skip
        voice = Voice(voice.name, VC_MODELS[0])
        async with contextlib.AsyncExitStack() as stack:
            speeches = [
                await stack.enter_async_context(engine.speak(voice, sinks=[TimingSink()]))
                for _ in range(STREAMS)
            ]
            await asyncio.sleep(0.05)  # every pump installed its fast path
            handles = [s._attempt.lease.connection._handle for s in speeches]  # type: ignore[union-attr]
            rounds = max(1, n // STREAMS)
            elapsed = 0.0
            for _ in range(rounds):
                stamp = repr(time.monotonic()).encode()
                raw = memoryview(b"".join((head, b'"x_sent_monotonic":', stamp, tail)))
                t0 = time.process_time()
                for handle in handles:
                    handle(raw)
                elapsed += time.process_time() - t0
            for s in speeches:
                assert s.metrics.deltas == rounds, "a delta missed the fast path"
                await s.aclose()
    return elapsed / (rounds * STREAMS)


CASES: dict[str, tuple[Callable[[int], Awaitable[float]], int]] = {
    "recorder_delta": (bench_recorder_delta, 100_000),
    "ledger_audio": (bench_ledger_audio, 200_000),
    "frame": (bench_frame, 200_000),
    "channel_nowait": (bench_channel_nowait, 200_000),
    "channel_blocking": (bench_channel_blocking, 100_000),
    "handle_delta": (bench_handle, 20_000),
    "fanout_nowait": (bench_fanout_nowait, 50_000),
    "fanout_array": (bench_fanout_array, 20_000),
    "fanout_lossy": (bench_fanout_lossy, 50_000),
    "speech_delta": (bench_speech_delta, 40_000),
}


async def run(repeat: int, only: list[str]) -> dict[str, tuple[float, float]]:
    """Per case: (median, min) over ``repeat`` runs of the CPU time per item, in ns."""
    out: dict[str, tuple[float, float]] = {}
    for name, (fn, n) in CASES.items():
        if only and name not in only:
            continue
        await fn(n // 10)  # warm-up
        runs = [await fn(n) for _ in range(repeat)]
        out[name] = (statistics.median(runs) * 1e9, min(runs) * 1e9)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--streams", type=int, default=200, help="speeches of speech_delta")
    args = ap.parse_args(argv)
    global STREAMS
    STREAMS = args.streams
    only = [c for c in args.only.split(",") if c]
    load_before = os.getloadavg()
    if args.loop == "uvloop":
        import uvloop

        result = uvloop.run(run(args.repeat, only))
    else:
        result = asyncio.run(run(args.repeat, only))
    record = {
        "median_ns": {k: round(v[0], 1) for k, v in result.items()},
        "min_ns": {k: round(v[1], 1) for k, v in result.items()},
        "repeat": args.repeat,
        "loop": args.loop,
        "load": [load_before, os.getloadavg()],
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
