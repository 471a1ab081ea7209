"""Sound-card underruns: how much prefill a loaded event loop needs to play without gaps.

Usage::

    .venv/bin/python -m bench.soundcard_underruns                 # 30 s per run, ~4.5 min
    .venv/bin/python -m bench.soundcard_underruns --seconds 10 --prefill 20 100 --hog 150

Each run plays ``--seconds`` of audio through :class:`sinks.SoundCardSink` (sounddevice,
PortAudio → ALSA pulse plugin → a private PulseAudio null sink, real-time pace; see
tts_stream.testing.audio_env) while the event loop is loaded: the producer delivers 40 ms
frames on an absolute real-time schedule (a service streaming at 1.0x), and a CPU-bound coroutine
hogs the loop for ``hog`` ms once per ``--hog-period`` seconds (a JSON parse, a VAD pass, a
slow callback). While the loop is hogged, nothing is written; the audio callback still runs
(PortAudio's thread gets the GIL every ``sys.getswitchinterval()``), so the ring drains by
``hog`` ms: an underrun occurs when that exceeds what the prefill put ahead of the card.

Where it is measured: ``stats().underruns`` of the sink, i.e. audio callbacks that had to
play silence mid-stream (or got PortAudio's output-underflow flag), and ``first_sample_at``
(the first sample at the DAC, from PortAudio's ``outputBufferDacTime``) minus the time the
first write began. Results: an environment line and one JSON line per run in
``bench/results/soundcard_underruns.jsonl``; a markdown table on stdout.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: make `bench`, `tests` and `sinks` importable
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import os
import sys
import time
from typing import Any

import numpy as np

from bench.common import RESULTS, JsonLines, environment, fmt_ms
from tts_stream.audio import AudioFormat, Frame
from tts_stream.testing.audio_env import pulse_daemon

__all__ = ["main"]

RATE = 24000
FRAME_MS = 40


async def _hog(ms: float, period_s: float, stop: asyncio.Event, hogs: list[float]) -> None:
    """Keep the loop busy (pure Python, holding the GIL between switches) for `ms` per period."""
    next_at = time.monotonic() + period_s
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
            return
        except TimeoutError:
            pass
        t0 = time.monotonic()
        x = 0
        while time.monotonic() - t0 < ms / 1000:
            x += sum(range(200))  # CPU work, no await: the loop is blocked
        hogs.append(time.monotonic() - t0)
        next_at += period_s


async def _run(prefill_ms: float, hog_ms: float, args: argparse.Namespace) -> dict[str, Any]:
    from sinks import SoundCardSink

    n = int(args.seconds * RATE)
    t = np.arange(n) / RATE
    audio = (8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)
    frame = RATE * FRAME_MS // 1000
    sink = SoundCardSink(backend=args.backend, prefill_ms=prefill_ms)
    await sink.open(AudioFormat(RATE))
    stop = asyncio.Event()
    hogs: list[float] = []
    late_max = 0.0
    try:
        async with asyncio.TaskGroup() as tg:
            if hog_ms > 0:
                tg.create_task(_hog(hog_ms, args.hog_period, stop, hogs))
            start = time.monotonic()
            for i, pos in enumerate(range(0, n, frame)):
                due = start + pos / RATE  # absolute schedule: a stall is caught up after
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    late_max = max(late_max, -delay)
                if i == 0:
                    first_write = time.monotonic()
                await sink.write(Frame(audio[pos : pos + frame], offset=pos))
            await sink.drain()
            end = time.monotonic()
            stop.set()
    finally:
        await sink.aclose()
    st = sink.stats()
    return {
        "kind": "run",
        "backend": args.backend,
        "seconds": args.seconds,
        "prefill_ms": prefill_ms,
        "hog_ms": hog_ms,
        "hog_period_s": args.hog_period,
        "hogs": len(hogs),
        "hog_max_ms": max(hogs, default=0.0) * 1000,
        "producer_late_max_ms": late_max * 1000,
        "underruns": st.underruns,
        "samples_written": st.samples_written,
        "samples_played": st.samples_played,
        "first_sample_ms": (st.first_sample_at - first_write) * 1000
        if st.first_sample_at is not None
        else None,
        "wall_s": end - start,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--prefill", type=float, nargs="+", default=[20.0, 60.0, 100.0, 200.0])
    p.add_argument("--hog", type=float, nargs="+", default=[50.0, 150.0])
    p.add_argument("--hog-period", type=float, default=1.0)
    p.add_argument("--backend", default="sounddevice", choices=["sounddevice", "pyaudio"])
    p.add_argument("--out", default=str(RESULTS / "soundcard_underruns.jsonl"))
    args = p.parse_args(argv)

    rows: list[dict[str, Any]] = []
    with pulse_daemon() as server, JsonLines(args.out) as out:
        # PortAudio reads the ALSA configuration when it initialises, i.e. on the first
        # import of the backend inside the sink: the environment is set before that.
        os.environ.update(server.client_env())
        out.write(environment(loop="asyncio", backend=args.backend, device="pulse null sink",
                              switchinterval_s=sys.getswitchinterval()))
        for hog in args.hog:
            for prefill in args.prefill:
                row = asyncio.run(_run(prefill, hog, args))
                out.write(row)
                rows.append(row)
                print(f"prefill {prefill:g} ms, hog {hog:g} ms: {row['underruns']} underruns",
                      file=sys.stderr)

    print(f"\n{args.seconds:g} s of 24 kHz audio per run, 40 ms frames at 1.0x real time, "
          f"loop hogged once per {args.hog_period:g} s ({args.backend}, PulseAudio null sink)\n")
    print("| prefill (ms) | loop hog (ms) | underruns | first sample at DAC (ms) | "
          "played / written |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['prefill_ms']:g} | {r['hog_ms']:g} | {r['underruns']} | "
              f"{fmt_ms(r['first_sample_ms'], 1)} | {r['samples_played']} / "
              f"{r['samples_written']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
