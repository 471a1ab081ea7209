"""Response formats: bytes on the wire versus client CPU to decode, per second of audio.

Run (regenerates bench/results/formats.{jsonl,md})::

    .venv/bin/python -m bench.formats            # --backend piper --repeat 15

The local server runs in its own process (``--backend``, burst pacing). One raw WebSocket
session per format speaks the same paragraph at 24 kHz; the deltas are kept as they came.
Then, in this process, each format's deltas go through exactly what the engine does per
delta: base64 decoding, then (for wav/mp3/opus) the incremental decoder of
``tts_stream.decode`` (``ResponseDecoders``), ``--repeat`` times; the CPU time
(``time.process_time``) of each pass is divided by the audio's duration. Figures:

* ``wire_kB_per_s``: WebSocket text-frame bytes of the ``response.audio.delta`` events per
  second of audio (JSON envelope and base64 included: what crosses the network);
* ``payload_kbit_per_s``: the encoded audio itself (before base64);
* ``decode_ms_per_s``: client CPU milliseconds per second of audio (median of the passes),
  and its ratio to ``pcm``.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: make `bench` importable
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pybase64
from websockets.asyncio.client import connect

from bench.common import ServerProcess, environment, save_results
from tts_stream import Engine
from tts_stream.decode import ResponseDecoders
from tts_stream.messages import VC_MODELS
from tts_stream.testing.samplegen import good_sample_wav

RESULTS = Path(__file__).resolve().parent / "results"
TEXT = (
    "The morning was bright and calm, and the boats left the harbour early. By noon a cool "
    "wind came from the west and the clouds grew dark. Everyone hurried home before the "
    "first heavy drops of rain began to fall."
)
CASES: tuple[tuple[str, int | None], ...] = (
    ("pcm", None), ("wav", None), ("mp3", None), ("opus", 128), ("opus", 64), ("opus", 32),
    ("opus", 16),
)  # fmt: skip
RATE = 24000


async def fetch(srv: ServerProcess, voice: str, fmt: str, kbps: int | None) -> list[bytes]:
    """The raw delta frames of one response."""
    session: dict[str, Any] = {"voice": voice, "mode": "commit", "response_format": fmt,
                               "sample_rate": RATE}  # fmt: skip
    if kbps is not None:
        session["bit_rate"] = kbps
    url = f"{srv.ws_url}?model={VC_MODELS[0]}"
    headers = {"Authorization": f"Bearer {srv.api_key}"}
    frames: list[bytes] = []
    async with asyncio.timeout(120):
        async with connect(url, additional_headers=headers, compression=None,
                           max_size=None) as ws:  # fmt: skip
            for event in ({"type": "session.update", "session": session},
                          {"type": "input_text_buffer.append", "text": TEXT},
                          {"type": "input_text_buffer.commit"}):  # fmt: skip
                await ws.send(orjson.dumps({"event_id": "event_bench", **event}).decode())
            while True:
                raw = await ws.recv()
                data = raw.encode() if isinstance(raw, str) else raw
                kind = orjson.loads(data)["type"]
                if kind == "response.audio.delta":
                    frames.append(data)
                elif kind == "response.done":
                    return frames
                elif kind == "error":
                    raise RuntimeError(data.decode())


def decode_pass(fmt: str, frames: list[bytes]) -> tuple[float, int]:
    """CPU seconds to turn the frames into PCM as the engine does, and the sample count."""
    decoders = None if fmt == "pcm" else ResponseDecoders(fmt, RATE)
    deltas = [orjson.loads(f)["delta"] for f in frames]  # JSON parsing is the same for all
    n = 0
    t0 = time.process_time()
    for delta in deltas:
        data = pybase64.b64decode(delta, validate=True)
        if decoders is None:
            n += np.frombuffer(data, "<i2").size
        else:
            n += decoders.feed("resp", data).size
    if decoders is not None:
        n += decoders.finish().size
    return time.process_time() - t0, n


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with ServerProcess(backend=args.backend, stamp_deltas=False) as srv:
        async with Engine(base_url=srv.base_url, api_key=srv.api_key) as engine:
            sample = RESULTS / "formats-sample.wav"
            sample.write_bytes(good_sample_wav())
            try:
                voice = (await engine.voices.create(sample, preferred_name="bench")).name
            finally:
                sample.unlink()
        for fmt, kbps in CASES:
            frames = await fetch(srv, voice, fmt, kbps)
            payload = sum(len(pybase64.b64decode(orjson.loads(f)["delta"])) for f in frames)
            cpu, samples = [], 0
            for _ in range(args.repeat):
                seconds, samples = decode_pass(fmt, frames)
                cpu.append(seconds)
            audio_s = samples / RATE
            rows.append({
                "kind": "format", "format": fmt, "bit_rate_kbps": kbps, "audio_s": audio_s,
                "deltas": len(frames),
                "wire_kB_per_s": sum(map(len, frames)) / audio_s / 1000,
                "payload_kbit_per_s": payload * 8 / audio_s / 1000,
                "decode_ms_per_s": 1000 * statistics.median(cpu) / audio_s,
                "decode_ms_per_s_min": 1000 * min(cpu) / audio_s,
            })  # fmt: skip
    base = next(r for r in rows if r["format"] == "pcm")
    for r in rows:
        r["wire_ratio"] = r["wire_kB_per_s"] / base["wire_kB_per_s"]
        r["cpu_ratio"] = r["decode_ms_per_s"] / base["decode_ms_per_s"]
    return rows


def table(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [
        f"Formats ({env['time_utc']}, commit {str(env['git_commit'])[:7]}, backend "
        f"{env['backend']}, load {', '.join(f'{x:.2f}' for x in env['loadavg'])}; per second "
        "of 24 kHz audio)",
        "",
        "| format | bit_rate | wire kB/s | × pcm | payload kbit/s | decode CPU ms/s | × pcm |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['bit_rate_kbps'] or '–'} | {r['wire_kB_per_s']:.1f} | "
            f"{r['wire_ratio']:.3f} | {r['payload_kbit_per_s']:.1f} | "
            f"{r['decode_ms_per_s']:.3f} | {r['cpu_ratio']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="piper")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--out", type=Path, default=RESULTS / "formats")
    args = ap.parse_args()
    env = environment(loop="asyncio", backend=args.backend, uptime=os.getloadavg())
    rows = asyncio.run(run(args))
    save_results(args.out, env, rows, table(rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
