"""RTP pacing: how far actual packet times stray from the 20 ms grid, for 1-200 streams.

Usage::

    .venv/bin/python -m bench.rtp_pacing                  # 1, 50, 200 streams x asyncio, uvloop
    .venv/bin/python -m bench.rtp_pacing --streams 1 10 --seconds 5 --loops asyncio
    .venv/bin/python -m bench.rtp_pacing --streams 200 1000 --loops uvloop --input-rate 8000
    .venv/bin/python -m bench.rtp_pacing --cost --streams 200   # CPU per packet, no timing

``--cost`` measures what a packet costs the sender's CPU apart from any scheduling: N sinks
(8 kHz in, PCMU) take 100 ms frames with ``write_nowait`` (the write path: encoding, cutting,
queueing), then the clock's callback ``on_clock`` is called by hand once per stream and packet
time, each call sending the one packet due (the send path: header, ``send`` system call to a
socket nobody reads, accounting), with the time of each call the due time the previous one
returned; ``time.process_time`` around each path, best of 5 rounds.

Each run opens N :class:`sinks.RtpSink` (PCMU; 24 kHz input resampled to 8 kHz by default,
``--input-rate 8000`` for the engine's telephony path, where the server synthesizes at 8 kHz
and nothing is resampled) on one event loop, all paced by the loop's one ``RtpClock``. It
starts the streams at random offsets within one packet time (calls do not start in
lock-step), feeds 100 ms frames as fast as back-pressure allows, and drains. Where it is
measured: at a receiving UDP socket in a *separate process* (so the receiver takes no GIL or
loop time from the sender), using the kernel's receive timestamps (``SO_TIMESTAMPNS``), i.e.
when the packet reached the receiving socket over loopback. The
deviation of packet k of a talk spurt is ``(t_k - t_0) - k * ptime``; positive = late.
Results: one JSON line per run plus one environment line per loop type in
``bench/results/rtp_pacing.jsonl``; a markdown table on stdout (for bench/README.md).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: make `bench` and `sinks` importable
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import random
import select
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, JsonLines, environment, fmt_ms, proc_cpu_s, run_loop, summarize
from sinks import RtpSink
from sinks.rtp_clock import RtpClock
from tts_stream.audio import AudioFormat, Frame

__all__ = ["main"]

PTIME_MS = 20
RATE_IN = 24000
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


# --- receiver (separate process) --------------------------------------------------------------


def _receiver(conn: multiprocessing.connection.Connection) -> None:
    """Bind, report the port, record (ssrc, seq, marker, kernel ns) until told to stop.

    Cheap per packet, since at 1000 streams (50,000 packets/s) the receiver shares the cores
    with the sender: the socket is non-blocking and drained until empty after each wait
    (a socket with a timeout polls before every receive: one more system call per packet),
    and each packet's header and kernel timestamp are appended as raw bytes, parsed with
    numpy at the end. The timestamps are the kernel's (taken on arrival), so reading late
    does not change them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:  # a deep buffer: 1000 streams x 50 pps must never overflow while we record
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    conn.send(sock.getsockname()[1])
    heads, stamps = bytearray(), bytearray()
    recv, anc_size, no_stamp = sock.recvmsg, socket.CMSG_SPACE(16), bytes(16)
    stopping = False
    while True:
        try:
            while True:
                data, anc, _flags, _addr = recv(2048, anc_size)
                heads += data[:12]
                stamps += anc[0][2][:16] if anc and anc[0][1] == SO_TIMESTAMPNS else no_stamp
        except BlockingIOError:
            pass
        if stopping:
            break
        if not select.select([sock], [], [], 0.2)[0]:
            stopping = conn.poll()
    sock.close()
    head = np.frombuffer(bytes(heads), dtype=np.dtype(
        [("b0", "u1"), ("b1", "u1"), ("seq", ">u2"), ("ts", ">u4"), ("ssrc", ">u4")]))
    sec_ns = np.frombuffer(bytes(stamps), dtype=np.int64).reshape(-1, 2)
    rows = np.empty((len(head), 4), dtype=np.int64)
    rows[:, 0], rows[:, 1], rows[:, 2] = head["ssrc"], head["seq"], head["b1"] >> 7
    rows[:, 3] = sec_ns[:, 0] * 1_000_000_000 + sec_ns[:, 1]
    conn.send(rows)


# --- sender --------------------------------------------------------------------------------


def tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)


async def send_streams(
    port: int, n: int, seconds: float, *, seed: int, rate_in: int = RATE_IN
) -> dict[str, Any]:
    rng = random.Random(seed)
    audio = tone(seconds, rate_in)
    frames = [audio[i : i + rate_in // 10] for i in range(0, len(audio), rate_in // 10)]
    for f in frames:
        f.flags.writeable = False
    sinks = [RtpSink("127.0.0.1", port, ssrc=i + 1, ptime_ms=PTIME_MS) for i in range(n)]
    for s in sinks:
        await s.open(AudioFormat(rate_in))
    cpu0, wall0 = time.process_time(), time.monotonic()

    async def call(sink: RtpSink) -> None:
        await asyncio.sleep(rng.uniform(0, PTIME_MS / 1000))  # the call starts at a random phase
        for f in frames:
            await sink.write(Frame(f))
        await sink.drain()

    try:
        async with asyncio.timeout(seconds * 3 + 30), asyncio.TaskGroup() as tg:
            for s in sinks:
                tg.create_task(call(s))
    finally:
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        clock = RtpClock.for_loop().stats()
        for s in sinks:
            await s.aclose()
    return {
        "clock_wakeups": clock.wakeups,
        "clock_max_wakeup_lateness_ms": clock.max_wakeup_lateness_ms,
        "sender_cpu_s": round(cpu, 3),
        "wall_s": round(wall, 3),
        "sender_cpu_pct": round(100 * cpu / wall, 1),
        "underruns": sum(s.stats().underruns for s in sinks),
        "packets_sent": sum(s.rtp_stats().packets_sent for s in sinks),
        "send_errors": sum(s.rtp_stats().send_errors for s in sinks),
    }


WARMUP_PACKETS = 50  # the first second of each spurt: 200 calls starting at once


def deviations_ms(
    rows: np.ndarray, *, anchor: str = "earliest"
) -> tuple[np.ndarray, np.ndarray]:
    """Per packet: lateness against its talk spurt's grid; per stream: the last packet's.

    ``anchor="earliest"`` (the headline figure): steady state, i.e. packets after the first
    :data:`WARMUP_PACKETS` of the spurt, on the grid ``t0 + k * ptime`` anchored at the
    earliest of them, so every value is lateness >= 0. ``"first"`` (the figure of runs
    before the shared clock): every packet against the grid anchored at the spurt's first
    packet, so the start-up (all streams opening and filling their buffers at once) is
    included, and a late first packet makes on-time ones look early (negative).
    """
    devs: list[np.ndarray] = []
    last: list[float] = []
    for ssrc in np.unique(rows[:, 0]):
        r = rows[rows[:, 0] == ssrc]
        seq = np.unwrap(r[:, 1].astype(np.float64), period=65536).astype(np.int64)
        order = np.argsort(seq, kind="stable")
        seq, marker, ns = seq[order], r[order, 2], r[order, 3]
        starts = np.flatnonzero(marker)
        if not starts.size or starts[0] != 0:
            starts = np.concatenate([[0], starts])
        bounds = [*starts.tolist(), len(seq)]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            k = seq[a:b] - seq[a]
            dev = (ns[a:b] - ns[a]) / 1e6 - k * PTIME_MS
            if anchor == "earliest":
                dev = dev[k >= WARMUP_PACKETS]
                if not dev.size:
                    continue
                dev = dev - dev.min()
            devs.append(dev)
        if devs:
            last.append(float(devs[-1][-1]))
    return np.concatenate(devs) if devs else np.zeros(0), np.array(last)


def one_run(
    loop: str, n: int, seconds: float, seed: int, rate_in: int = RATE_IN
) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(child,), daemon=True)
    proc.start()
    try:
        if not parent.poll(30):
            raise TimeoutError("receiver did not start")
        port = parent.recv()
        assert proc.pid is not None
        rx_cpu0 = proc_cpu_s(proc.pid)
        sent = run_loop(send_streams(port, n, seconds, seed=seed, rate_in=rate_in), loop)
        # the receiver's CPU over the same window: it competes with the sender for the cores
        rx_cpu = proc_cpu_s(proc.pid) - rx_cpu0
        parent.send("stop")
        if not parent.poll(60):
            raise TimeoutError("receiver did not report")
        rows: np.ndarray = parent.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    dev, last = deviations_ms(rows)
    dev_first, _ = deviations_ms(rows, anchor="first")
    expected = n * round(seconds * 1000 / PTIME_MS)
    summary = summarize(dev.tolist())
    return {
        "kind": "rtp_pacing",
        "loop": loop,
        "streams": n,
        "seconds": seconds,
        "ptime_ms": PTIME_MS,
        "codec": "pcmu",
        "input_rate": rate_in,
        "phase_grid_ms": round(getattr(RtpClock, "phase_grid", 0.0) * 1e3, 3),
        "measured_at": "receiver socket, separate process, kernel SO_TIMESTAMPNS",
        "packets_received": int(len(rows)),
        "packets_expected": expected,
        "deviation_ms": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in
                         summary.items()},  # fmt: skip
        "deviation_grid_anchor": f"earliest packet of the spurt after {WARMUP_PACKETS}",
        "deviation_from_first_packet_ms": {
            k: (round(v, 3) if isinstance(v, float) else v)
            for k, v in summarize(dev_first.tolist()).items()
        },
        "min_deviation_ms": round(float(dev_first.min()), 3) if dev_first.size else None,
        "max_abs_drift_ms": round(float(np.abs(last).max()), 3) if last.size else None,
        "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        **sent,
        "receiver_cpu_pct": round(100 * rx_cpu / sent["wall_s"], 1),
        "clock_wakeups_per_s": round(sent["clock_wakeups"] / sent["wall_s"]),
    }


# --- CPU per packet, independent of scheduling ---------------------------------------------


async def packet_cost(port: int, n: int, frames: int = 8, rounds: int = 5) -> dict[str, Any]:
    """Best-of-``rounds`` CPU microseconds per packet of the write and the send path.

    With many streams the first packets are more than 0.5 s "late" by the time the send path
    gets to them (the write path took that long): the one re-anchoring per stream and round
    this causes is not logged here, so the log does not weigh on the figure."""
    logging.getLogger("sinks.rtp").setLevel(logging.ERROR)
    sinks = [RtpSink("127.0.0.1", port, ssrc=i + 1, prebuffer_ms=0) for i in range(n)]
    for s in sinks:
        await s.open(AudioFormat(8000))
    frame = Frame(tone(0.1, 8000))
    per_frame = 5  # 100 ms of 20 ms packets
    best_write = best_send = float("inf")
    try:
        for _ in range(rounds):
            t0 = time.process_time()
            for _ in range(frames):
                for s in sinks:
                    if not s.write_nowait(frame):
                        raise RuntimeError("queue full: fewer frames per round")
            t_write = time.process_time() - t0
            now = time.monotonic()
            due = dict.fromkeys(sinks, now)
            t0 = time.process_time()
            for _ in range(frames * per_frame):
                for s in sinks:
                    nxt = s.on_clock(due[s], due[s])
                    due[s] = now if nxt is None else nxt
            t_send = time.process_time() - t0
            packets = n * frames * per_frame
            best_write = min(best_write, t_write / packets * 1e6)
            best_send = min(best_send, t_send / packets * 1e6)
            await asyncio.sleep(0.05)
    finally:
        for s in sinks:
            await s.interrupt()
            await s.aclose()
    return {
        "kind": "rtp_packet_cost", "streams": n,
        "write_us_per_packet": round(best_write, 2), "send_us_per_packet": round(best_send, 2),
        "total_us_per_packet": round(best_write + best_send, 2),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }


def cost_run(loop: str, n: int) -> dict[str, Any]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink_hole:
        sink_hole.bind(("127.0.0.1", 0))  # never read: the kernel drops what overflows
        result = run_loop(packet_cost(sink_hole.getsockname()[1], n), loop)
    return {"loop": loop, **result}


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| loop | streams | packets rx/expected | p50 ms | p99 ms | max ms | min ms "
        "| last-packet drift ms | underruns | sender CPU % | receiver CPU % | wake-ups/s "
        "| input Hz | load 1 min |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [
        f"| {r['loop']} | {r['streams']} | {r['packets_received']}/{r['packets_expected']} "
        f"| {fmt_ms(r['deviation_ms']['p50'])} | {fmt_ms(r['deviation_ms']['p99'])} "
        f"| {fmt_ms(r['deviation_ms']['max'])} | {fmt_ms(r['min_deviation_ms'])} "
        f"| {fmt_ms(r['max_abs_drift_ms'])} | {r['underruns']} | {r['sender_cpu_pct']} "
        f"| {r['receiver_cpu_pct']} | {r['clock_wakeups_per_s']} | {r['input_rate']} "
        f"| {r['loadavg_1min_before_after'][0]} |"
        for r in results
    ]
    return "\n".join([head, *rows])


def cost_main(loops: list[str], streams: list[int], out_path: Path) -> int:
    with JsonLines(out_path) as out:
        for loop in loops:
            out.write(environment(loop=loop, bench="rtp_pacing --cost"))
            for n in streams:
                r = cost_run(loop, n)
                out.write(r)
                print(f"{loop:8s} {n:4d} streams: write {r['write_us_per_packet']} us, "
                      f"send {r['send_us_per_packet']} us, total {r['total_us_per_packet']} "
                      f"us per packet (load {r['loadavg_1min']})", flush=True)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 50, 200])
    p.add_argument("--seconds", type=float, default=10.0, help="audio per stream")
    p.add_argument("--loops", nargs="+", default=["asyncio", "uvloop"],
                   choices=["asyncio", "uvloop"])  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS / "rtp_pacing.jsonl")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--input-rate", type=int, default=RATE_IN, choices=[8000, 16000, 24000],
                   help="rate written to the sinks (8000: no resampling, the telephony path)")
    p.add_argument("--phase-grid-ms", type=float, default=None,
                   help="RtpClock.phase_grid in ms (0: no snapping; default: the clock's)")
    p.add_argument("--cost", action="store_true",
                   help="CPU per packet of the write and send paths, no timing (see above)")
    args = p.parse_args(argv)
    if args.phase_grid_ms is not None:
        if not hasattr(RtpClock, "phase_grid"):
            raise SystemExit("--phase-grid-ms: this tree's RtpClock has no phase grid")
        RtpClock.phase_grid = args.phase_grid_ms / 1000
    if args.cost:
        return cost_main(args.loops, args.streams, args.out)
    results = []
    with JsonLines(args.out) as out:
        for loop in args.loops:
            out.write(environment(loop=loop, bench="rtp_pacing"))
            for n in args.streams:
                r = one_run(loop, n, args.seconds, args.seed, args.input_rate)
                out.write(r)
                results.append(r)
                print(f"{loop:8s} {n:4d} streams: p50 {r['deviation_ms']['p50']} ms, "
                      f"p99 {r['deviation_ms']['p99']} ms, max {r['deviation_ms']['max']} ms, "
                      f"sender CPU {r['sender_cpu_pct']} %, receiver {r['receiver_cpu_pct']} %",
                      flush=True)  # fmt: skip
    print()
    print(table(results))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
