"""The local server's cost per delta and its pacing accuracy, with a client that costs little.

``bench.concurrency`` measures the server next to the engine, which takes most of the second
core at 500 streams; here the client is a bare aiohttp WebSocket per stream (C frame reader,
no engine, no decoding), so the server's figures stand on their own up to 1000 streams.

Method. The local server runs in its own process (``bench.common.ServerProcess``: tone
backend, ``pacing="realtime"``, 100 ms deltas, ``stamp_deltas``, uvloop, collector off).
For each N: N sockets are opened and configured (not timed), then each stream, at its slot of
a ``--ramp-s`` ramp, appends ``--seconds`` of text and commits; the client reads every event
until ``response.done``. The *steady* window runs from the last stream's first delta to the
first stream's last delta (every stream playing): server CPU over it (``/proc/<pid>/stat``)
divided by the deltas received in it gives **server CPU per delta** (× 10 = per second of
audio). Pacing: per delta, *wire lateness* = its arrival minus (the stream's first arrival +
the audio before it); the server also counts the deltas it sent more than 20 / 50 ms after
their due time (``ServerStats.deltas_late_20ms`` / ``_50ms``; "–" for a server without them).

Run::

    .venv/bin/python -m bench.server_pacing --levels 200,500,1000 --out /tmp/sp.jsonl

Boundary: benchmark only; the client speaks the wire protocol directly (aiohttp).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: make `bench` importable
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import (
    JsonLines,
    ServerProcess,
    environment,
    fmt_ms,
    proc_cpu_s,
    raise_nofile_limit,
    run_loop,
    summarize,
)
from bench.concurrency import MODEL, _enroll, utterance_text

__all__ = ["main"]

RATE = 24000


class _Stream:
    """One bare client socket: arrival times of its deltas and their sizes in samples."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.arrivals: list[tuple[float, int]] = []  # (monotonic, samples before this delta)
        self.samples = 0

    async def speak(self, text: str, delay: float) -> None:
        await asyncio.sleep(delay)
        await self.ws.send_str(json.dumps({"type": "input_text_buffer.append", "text": text}))
        await self.ws.send_str(json.dumps({"type": "input_text_buffer.commit"}))
        async for msg in self.ws:
            now = time.monotonic()
            data = msg.data
            if '"response.audio.delta"' in data[:200]:
                # base64 length -> PCM16 samples, without decoding (the client stays cheap)
                b64 = len(data) - data.index('"delta":"') - 11
                self.arrivals.append((now, self.samples))
                self.samples += b64 * 3 // 4 // 2
            elif '"response.done"' in data[:200]:
                return


def _stats(srv: ServerProcess) -> dict[str, Any] | None:
    """The server's counters; None from a tree whose harness cannot ask for them (main)."""
    ask = getattr(srv, "stats", None)
    return ask() if ask is not None else None


async def _open(session: aiohttp.ClientSession, url: str, key: str, voice: str) -> _Stream:
    ws = await session.ws_connect(url, headers={"Authorization": f"Bearer {key}"},
                                  max_msg_size=0, autoping=True)  # fmt: skip
    await ws.receive()  # session.created
    await ws.send_str(
        json.dumps(
            {
                "type": "session.update",
                "session": {
                    "voice": voice,
                    "mode": "commit",
                    "response_format": "pcm",
                    "sample_rate": RATE,
                },
            }
        )
    )
    msg = await ws.receive()
    if '"session.updated"' not in msg.data:
        raise RuntimeError(f"session.update refused: {msg.data[:200]}")
    return _Stream(ws)


async def _point(
    srv: ServerProcess, voice: str, n: int, args: argparse.Namespace
) -> dict[str, Any]:
    url = srv.ws_url + f"?model={MODEL}"
    text = utterance_text(args.seconds)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        sem = asyncio.Semaphore(50)

        async def dial() -> _Stream:
            async with sem:
                return await _open(session, url, srv.api_key, voice)

        streams = await asyncio.gather(*(dial() for _ in range(n)))
        before = _stats(srv)
        cpu0, t0 = proc_cpu_s(srv.pid), time.monotonic()
        samples: list[tuple[float, float]] = []

        async def sample() -> None:
            while True:
                samples.append((time.monotonic(), proc_cpu_s(srv.pid)))
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(s.speak(text, args.ramp_s * i / n) for i, s in enumerate(streams)))
        sampler.cancel()
        cpu1, t1 = proc_cpu_s(srv.pid), time.monotonic()
        after = _stats(srv)
        for s in streams:
            await s.ws.close()
    return _summarize(streams, samples, n=n, stats=(before, after), cpu_s=cpu1 - cpu0,
                      wall_s=t1 - t0, args=args)  # fmt: skip


def _summarize(
    streams: list[_Stream],
    samples: list[tuple[float, float]],
    *,
    n: int,
    stats: tuple[dict[str, Any] | None, dict[str, Any] | None],
    cpu_s: float,
    wall_s: float,
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    start = max(s.arrivals[0][0] for s in streams)  # every stream playing ...
    end = min(s.arrivals[-1][0] for s in streams)  # ... until the first one ends
    inside = [(t, c) for t, c in samples if start <= t <= end]
    late = [
        (t - s.arrivals[0][0] - before_samples / RATE) * 1000.0
        for s in streams
        for t, before_samples in s.arrivals
    ]
    steady = util = None
    if len(inside) >= 2:
        (ta, ca), (tb, cb) = inside[0], inside[-1]
        deltas_in = sum(ta <= t <= tb for s in streams for t, _ in s.arrivals)
        steady = (cb - ca) / max(deltas_in, 1) * 1e6
        util = (cb - ca) / (tb - ta)
    total = sum(len(s.arrivals) for s in streams)
    point: dict[str, Any] = {
        "kind": "point", "n": n, "seconds": args.seconds, "wall_s": wall_s,
        "deltas": total,
        "server_cpu_us_per_delta_steady": steady,
        "server_cpu_us_per_delta_whole": cpu_s / max(1, total) * 1e6,
        "server_cpu_util_steady": util,
        "wire_lateness_ms": summarize(late),
        "wire_late_20ms": sum(x > 20 for x in late),
        "wire_late_50ms": sum(x > 50 for x in late),
        "load_1min": os.getloadavg()[0],
    }  # fmt: skip
    before, after = stats
    if before and after and "deltas_late_20ms" in after:
        for key in ("deltas_late_20ms", "deltas_late_50ms"):
            point["server_" + key] = after[key] - before.get(key, 0)
    return point


def report(points: list[dict[str, Any]]) -> str:
    lines = [
        "| N | server CPU per delta, steady (µs) | per s of audio (ms) | server CPU util "
        "(cores) | wire lateness p50 / p99 / max (ms) | late on the wire >20 / >50 ms "
        "| server's own count >20 / >50 ms | load |",
        "|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for p in points:
        us = p["server_cpu_us_per_delta_steady"]
        wl = p["wire_lateness_ms"]
        lines.append(
            f"| {p['n']} | {fmt_ms(us, 1)} | {fmt_ms(us / 100 if us else None, 2)} | "
            f"{fmt_ms(p['server_cpu_util_steady'], 2)} | {fmt_ms(wl.get('p50'), 1)} / "
            f"{fmt_ms(wl.get('p99'), 1)} / {fmt_ms(wl.get('max'), 1)} | "
            f"{p['wire_late_20ms']} / {p['wire_late_50ms']} of {p['deltas']} | "
            f"{p.get('server_deltas_late_20ms', '–')} / {p.get('server_deltas_late_50ms', '–')} "
            f"| {p['load_1min']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.server_pacing")
    parser.add_argument("--levels", default="200,500,1000")
    parser.add_argument("--seconds", type=float, default=5.0, help="audio per stream")
    parser.add_argument("--ramp-s", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/server_pacing.jsonl"))
    args = parser.parse_args(argv)
    raise_nofile_limit()
    points = []
    server = ServerProcess(pacing="realtime", delta_ms=100.0, stamp_deltas=True, gc_mode="off")
    with server as srv, JsonLines(args.out) as jl:
        jl.write(environment(loop="uvloop", bench="server_pacing", server=srv.options,
                             args={k: str(v) for k, v in vars(args).items()}))  # fmt: skip
        voice = run_loop(_enroll(srv), "asyncio")
        for n in (int(x) for x in args.levels.split(",") if x.strip()):
            point = run_loop(_point(srv, voice, n, args), "uvloop")
            jl.write(point)
            points.append(point)
            sys.stderr.write(
                f"N={n:5d} server {fmt_ms(point['server_cpu_us_per_delta_steady'], 1)} µs/delta"
                f" steady, wire late >20 ms {point['wire_late_20ms']}/{point['deltas']}\n"
            )
    table = report(points)
    args.out.with_suffix(".md").write_text(table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
