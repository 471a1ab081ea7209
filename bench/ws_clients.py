"""WebSocket client libraries compared on the realtime delta stream (issue 11, part 3).

Question: how much of the per-delta CPU is the WebSocket reader, and would a C-accelerated
client (aiohttp's, with its C frame reader, or picows, written in Cython) cut it by the 20 %
that would justify switching the one ``connection.py`` boundary away from ``websockets``?

Method. A server process (``python -m bench.ws_clients serve``, websockets, uvloop) sends a
pre-built burst of ``response.audio.delta`` events shaped exactly like the local server's
(base64 PCM16 at 24 kHz, ``--chunk-ms`` per delta, default 100 ms) to every connection, then
closes. Each client runs in a **fresh process** of its own that connects, receives every
message and measures its own ``time.process_time()`` from the first to the last message, so
the figure is CPU per message of the client process only (robust on a shared, loaded
machine, unlike wall time). Two workloads per client: ``recv`` (the transport alone) and
``decode`` (the same plus the engine's per-delta decode: orjson, pybase64 with
``validate=True``, ``np.frombuffer``). Rounds alternate the clients; medians over rounds.

Two sending modes: ``burst`` (default; many messages per socket read, the parser's best case)
and ``--rate R`` (messages paced on an absolute schedule, so each arrives in its own read, as
with a few hundred real-time streams: the per-read loop overhead counts too).

Run: ``.venv/bin/python -m bench.ws_clients`` (burst, about a minute) and
``.venv/bin/python -m bench.ws_clients --rate 1000 --messages 5000`` (paced, about 3 minutes).
Results: ``bench/results/ws_clients{,_paced}.jsonl`` and ``.md``. picows is in the ``bench``
extra.

Boundary: benchmark only; imports nothing of ``tts_stream`` but the wire shape of a delta.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
import orjson
import pybase64

from bench.common import REPO, RESULTS, JsonLines, environment, run_loop, write_text

CLIENTS = ("websockets", "aiohttp", "picows")
WORKLOADS = ("recv", "decode")


def delta_event(chunk_ms: int, rate: int = 24000) -> bytes:
    """One ``response.audio.delta`` event as the local server sends it (protocol.md §6.8)."""
    pcm = (np.sin(np.arange(rate * chunk_ms // 1000) / 7.0) * 8000).astype("<i2").tobytes()
    return orjson.dumps(
        {
            "event_id": "event_0123456789abcdef",
            "type": "response.audio.delta",
            "response_id": "resp_0123456789abcdef",
            "item_id": "item_0123456789abcdef",
            "output_index": 0,
            "content_index": 0,
            "delta": pybase64.b64encode(pcm).decode("ascii"),
        }
    )


# ---------------------------------------------------------------------------- server
async def _serve(port: int, messages: int, chunk_ms: int, rate: float) -> None:
    from websockets.asyncio.server import ServerConnection, serve

    text = delta_event(chunk_ms).decode("ascii")
    loop = asyncio.get_running_loop()

    async def handler(ws: ServerConnection) -> None:
        start = loop.time()
        for i in range(messages):
            if rate > 0:  # absolute schedule: one message per socket read at the client
                await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            await ws.send(text)
        await ws.close()

    async with serve(handler, "127.0.0.1", port, compression=None, max_size=None) as srv:
        sock_port = next(iter(srv.sockets)).getsockname()[1]
        print(json.dumps({"port": sock_port}), flush=True)
        # Stop when the parent closes our stdin (never outlive the benchmark).
        await loop.run_in_executor(None, sys.stdin.read)


# ---------------------------------------------------------------------------- clients
def _decode(raw: str | bytes) -> int:
    event = orjson.loads(raw)
    pcm = pybase64.b64decode(event["delta"], validate=True)
    return int(np.frombuffer(pcm, dtype="<i2").size)


async def _client_websockets(url: str, decode: bool) -> tuple[int, float]:
    from websockets.asyncio.client import connect

    n = 0
    start = 0.0
    async with connect(url, compression=None, max_size=None) as ws:
        async for raw in ws:
            if n == 0:
                start = time.process_time()
            if decode:
                _decode(raw)
            n += 1
    return n, time.process_time() - start


async def _client_aiohttp(url: str, decode: bool) -> tuple[int, float]:
    import aiohttp

    n = 0
    start = 0.0
    async with aiohttp.ClientSession() as session, session.ws_connect(
        url, compress=0, max_msg_size=0, autoping=True
    ) as ws:
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            if n == 0:
                start = time.process_time()
            if decode:
                _decode(msg.data)
            n += 1
    return n, time.process_time() - start


async def _client_picows(url: str, decode: bool) -> tuple[int, float]:
    import picows

    counter = {"n": 0, "start": 0.0}

    class Listener(picows.WSListener):
        def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
            if frame.msg_type == picows.WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()
                return
            if counter["n"] == 0:
                counter["start"] = time.process_time()
            if decode:
                _decode(frame.get_payload_as_bytes())
            counter["n"] += 1

    transport, _ = await picows.ws_connect(Listener, url, max_frame_size=64 * 1024 * 1024)
    await transport.wait_disconnected()
    return int(counter["n"]), time.process_time() - float(counter["start"])


async def _run_client(kind: str, url: str, decode: bool) -> dict[str, Any]:
    fn = {"websockets": _client_websockets, "aiohttp": _client_aiohttp, "picows": _client_picows}
    n, cpu_s = await fn[kind](url, decode)
    return {"client": kind, "messages": n, "cpu_s": cpu_s}


# ---------------------------------------------------------------------------- driver
def _child(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.ws_clients", *args]


def measure(
    rounds: int, messages: int, chunk_ms: int, rate: float, loop: str
) -> list[dict[str, Any]]:
    server = subprocess.Popen(
        _child("serve", "--messages", str(messages), "--chunk-ms", str(chunk_ms),
               "--rate", str(rate), "--loop", loop),
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None
        port = json.loads(server.stdout.readline())["port"]
        url = f"ws://127.0.0.1:{port}/"
        rows = []
        for r in range(rounds):
            order = CLIENTS[r % len(CLIENTS):] + CLIENTS[: r % len(CLIENTS)]
            for workload in WORKLOADS:
                for kind in order:
                    out = subprocess.run(
                        _child("client", kind, url, "--workload", workload, "--loop", loop),
                        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
                    )
                    row = json.loads(out.stdout)
                    if row["messages"] != messages:
                        raise RuntimeError(f"{kind} received {row['messages']} of {messages}")
                    row.update(round=r, workload=workload, loadavg=os.getloadavg()[0],
                               us_per_msg=row["cpu_s"] / messages * 1e6)
                    rows.append(row)
                    print(f"round {r} {workload:6} {kind:10} {row['us_per_msg']:6.1f} µs/msg",
                          flush=True)
        return rows
    finally:
        if server.stdin:
            server.stdin.close()
        server.wait(timeout=10)


def report(rows: list[dict[str, Any]], chunk_ms: int, messages: int, rate: float) -> str:
    sending = f"paced at {rate:g} messages/s" if rate > 0 else "burst"
    lines = [
        f"CPU of the client process per {chunk_ms} ms delta (µs, median of rounds; "
        f"{messages} messages per run, {sending})",
        "",
        "| client | recv | recv + decode | recv vs websockets | recv+decode vs websockets |",
        "|---|---|---|---|---|",
    ]
    med = {
        (k, w): statistics.median(r["us_per_msg"] for r in rows
                                  if r["client"] == k and r["workload"] == w)
        for k in CLIENTS for w in WORKLOADS
    }
    for k in CLIENTS:
        lines.append(
            f"| {k} | {med[k, 'recv']:.1f} | {med[k, 'decode']:.1f} | "
            f"{med[k, 'recv'] / med['websockets', 'recv']:.2f}x | "
            f"{med[k, 'decode'] / med['websockets', 'decode']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    sv = sub.add_parser("serve")
    cl = sub.add_parser("client")
    cl.add_argument("kind", choices=CLIENTS)
    cl.add_argument("url")
    cl.add_argument("--workload", choices=WORKLOADS, default="recv")
    for p in (ap, sv, cl):
        p.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    for p in (ap, sv):
        p.add_argument("--messages", type=int, default=20000)
        p.add_argument("--chunk-ms", type=int, default=100)
        p.add_argument("--rate", type=float, default=0.0,
                       help="messages per second (0: burst, many messages per read)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        run_loop(_serve(0, args.messages, args.chunk_ms, args.rate), args.loop)
        return 0
    if args.cmd == "client":
        row = run_loop(_run_client(args.kind, args.url, args.workload == "decode"), args.loop)
        print(json.dumps(row))
        return 0
    rows = measure(args.rounds, args.messages, args.chunk_ms, args.rate, args.loop)
    name = "ws_clients" if args.rate <= 0 else "ws_clients_paced"
    with JsonLines(RESULTS / f"{name}.jsonl") as out:
        out.write(environment(loop=args.loop, chunk_ms=args.chunk_ms, messages=args.messages,
                              rate=args.rate))
        for row in rows:
            out.write(row)
    text = report(rows, args.chunk_ms, args.messages, args.rate)
    write_text(RESULTS / f"{name}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
