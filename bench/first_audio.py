"""First-audio latency: tts-stream (warm pool, cold) versus the official dashscope SDK.

Run (one command regenerates bench/results/first_audio.{jsonl,png,md})::

    .venv/bin/python -m bench.first_audio            # --n 200 --warmup 20 by default

The local server runs in its own process (tone backend, burst pacing, no synthesis delay,
``stamp_deltas`` on). Three ways of doing the same work are interleaved round-robin, so drift
in machine load hits all three alike:

* ``warm``: ``engine.speak`` on an Engine with a warm spare (``prewarm``), push the text;
* ``cold``: an Engine with ``pool_size=0`` (connect + ``session.update`` + ``session.updated``
  per utterance), push the text;
* ``sdk``: ``QwenTtsRealtime`` (dashscope 2.0.2): ``connect``, ``update_session``,
  ``append_text``, wait for the first ``response.audio.delta`` (its callback); run in a
  worker thread, timed inside that thread.

One monotonic clock (``time.monotonic``, CLOCK_MONOTONIC, system-wide on Linux). For every
utterance two figures: ``from_text_ms`` (first text handed over: ``speech.push`` /
``append_text``) and ``from_start_ms`` (before anything: ``engine.speak`` / ``connect``).
The end point is the first sample *written into the sink* (an ArraySink whose ``write`` is
stamped once it returns) for tts-stream, and the *arrival of the first delta in the SDK
callback* for the SDK (before any base64 decoding: this favours the SDK, which hands the
user undecoded JSON). ``engine_added_ms`` is the first sample in the sink minus the moment
the server sent the first delta (the server's ``x_sent_monotonic`` stamp): loopback, the
WebSocket read, JSON + base64, the pump, the fan-out and the sink. By default the text is
short enough for a single delta, so the server stamp of *that* delta is exact
(``metrics.server_lag_ms_max`` is the lag of the only delta).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: make `bench` and `tests` importable
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import gc
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS,
    GcPauses,
    JsonLines,
    ServerProcess,
    cdf_plot,
    environment,
    fmt_ms,
    run_loop,
    summarize,
    write_text,
)
from sinks import ArraySink
from tts_stream import Engine, Frame, Voice
from tts_stream.messages import VC_MODELS

__all__ = ["StampedArraySink", "engine_once", "main", "sdk_once"]

MODEL = VC_MODELS[0]
MODES = ("warm", "cold", "sdk")
TIMEOUT = 20.0


class StampedArraySink(ArraySink):
    """An ArraySink that stamps when the first frame has been written into it."""

    def __init__(self) -> None:
        super().__init__(max_blocks=100_000)
        self.first_write_at: float | None = None
        self.first_received_at: float | None = None

    async def write(self, frame: Frame) -> None:
        await super().write(frame)
        if self.first_write_at is None and len(frame):
            self.first_write_at = time.monotonic()
            self.first_received_at = frame.received_at


async def _drain(sink: ArraySink) -> int:
    n = 0
    async for block in sink:
        n += int(block.size)
    return n


async def engine_once(
    engine: Engine, voice: Voice, text: str, mode: str, gcp: GcPauses
) -> dict[str, Any]:
    sink = StampedArraySink()
    async with asyncio.TaskGroup() as tg:
        consumer = tg.create_task(_drain(sink))
        async with asyncio.timeout(TIMEOUT):
            t_start = time.monotonic()
            speech = engine.speak(voice, sinks=[sink])
            async with speech:
                t_text = time.monotonic()
                await speech.push(text)
        # the speech closed the sink it opened: the consumer ends by itself
    samples = consumer.result()
    m = speech.metrics
    first = sink.first_write_at
    rec: dict[str, Any] = {
        "kind": "utterance",
        "mode": mode,
        "from_text_ms": None if first is None else (first - t_text) * 1000.0,
        "from_start_ms": None if first is None else (first - t_start) * 1000.0,
        "metrics_first_audio_ms": m.first_audio_ms,
        "metrics_sink_first_sample_ms": m.sink_first_sample_ms.get(sink.name),
        "acquire_ms": m.acquire_ms,
        "was_warm": m.was_warm,
        "deltas": m.deltas,
        "samples": samples,
        "server_lag_ms": m.server_lag_ms_max if m.deltas == 1 else m.server_lag_ms_p50,
        "lag_exact": m.deltas == 1,
        "error": m.error,
        "gc_pause_ms": gcp.during(t_start, first) if first is not None else None,
    }
    lag = rec["server_lag_ms"]
    if first is not None and sink.first_received_at is not None and lag is not None:
        # first sample in the sink - server send stamp of the first delta
        rec["pipeline_ms"] = (first - sink.first_received_at) * 1000.0
        rec["engine_added_ms"] = rec["pipeline_ms"] + lag
    return rec


def sdk_once(ws_url: str, voice: str, text: str) -> dict[str, Any]:
    """One utterance through the official SDK (blocking; runs in a worker thread)."""
    from dashscope.audio.qwen_tts_realtime import (
        AudioFormat,
        QwenTtsRealtime,
        QwenTtsRealtimeCallback,
    )

    first = threading.Event()
    done = threading.Event()
    stamp: dict[str, Any] = {}

    class Callback(QwenTtsRealtimeCallback):
        def on_event(self, message: Any) -> None:
            kind = message.get("type")
            if kind == "response.audio.delta" and not first.is_set():
                stamp["at"] = time.monotonic()
                stamp["sent"] = message.get("x_sent_monotonic")
                first.set()
            elif kind == "error":
                stamp["error"] = str(message.get("error"))
                done.set()

        def on_close(self, close_status_code: Any, close_msg: Any) -> None:
            # Wait for the server's close: calling close() earlier leaves websocket-client's
            # thread in a 10 s select (setup cost outside the measurement, but slow runs).
            done.set()

    t_start = time.monotonic()
    tts = QwenTtsRealtime(model=MODEL, callback=Callback(), url=ws_url)
    tts.connect()
    try:
        t_connected = time.monotonic()
        tts.update_session(voice=voice, response_format=AudioFormat.PCM_24000HZ_MONO_16BIT,
                           mode="server_commit")  # fmt: skip
        t_text = time.monotonic()
        tts.append_text(text)
        ok = first.wait(TIMEOUT)
        tts.finish()
        done.wait(TIMEOUT)
    finally:
        with contextlib.suppress(Exception):
            tts.close()
        thread = getattr(tts, "thread", None)
        if thread is not None:
            thread.join(TIMEOUT)
    at = stamp.get("at") if ok else None
    sent = stamp.get("sent")
    return {
        "kind": "utterance",
        "mode": "sdk",
        "from_text_ms": None if at is None else (at - t_text) * 1000.0,
        "from_start_ms": None if at is None else (at - t_start) * 1000.0,
        "connect_ms": (t_connected - t_start) * 1000.0,
        "sdk_first_audio_delay_ms": tts.get_first_audio_delay(),  # type: ignore[no-untyped-call]
        "sdk_added_ms": None if at is None or sent is None else (at - float(sent)) * 1000.0,
        "error": stamp.get("error") if ok else "no audio within the timeout",
    }


async def run(args: argparse.Namespace, srv: ServerProcess, gcp: GcPauses) -> list[dict[str, Any]]:
    import dashscope

    dashscope.api_key = srv.api_key  # the SDK reads a global
    from tts_stream.testing.samplegen import good_sample_wav

    records: list[dict[str, Any]] = []
    modes = [m for m in MODES if m in args.modes]
    async with (
        Engine(base_url=srv.base_url, api_key=srv.api_key, pool_size=1) as warm,
        Engine(base_url=srv.base_url, api_key=srv.api_key, pool_size=0) as cold,
    ):
        voice = await warm.voices.create(
            good_sample_wav(), preferred_name="bench", target_model=MODEL
        )
        if args.gc_freeze:
            # Everything alive now (modules, engines) leaves the collector's generations:
            # gen-2 pauses shrink (what a long-running service does after start-up).
            gc.collect()
            gc.freeze()
        for i in range(args.warmup + args.n):
            for mode in modes:
                # Not timed: the warm engine has its spare ready and no dial in flight, so
                # no mode is measured while a background refill competes for the CPU.
                await warm.prewarm(voice, 1)
                if args.pause_ms > 0:  # the caller idles before speaking (both processes too)
                    await asyncio.sleep(args.pause_ms / 1000.0)
                if mode == "sdk":
                    rec = await asyncio.to_thread(sdk_once, srv.ws_url, voice.name, args.text)
                else:
                    rec = await engine_once(warm if mode == "warm" else cold, voice,
                                            args.text, mode, gcp)  # fmt: skip
                rec["i"] = i
                rec["warmup"] = i < args.warmup
                records.append(rec)
    return records


def report(records: list[dict[str, Any]], args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    measured = [r for r in records if not r["warmup"]]
    by_mode = {m: [r for r in measured if r["mode"] == m] for m in MODES}
    summary: dict[str, Any] = {"kind": "summary", "n": args.n, "warmup": args.warmup}
    for mode, recs in by_mode.items():
        if not recs:
            continue
        summary[mode] = {
            "from_text_ms": summarize(r["from_text_ms"] for r in recs),
            "from_start_ms": summarize(r["from_start_ms"] for r in recs),
            "errors": sum(1 for r in recs if r.get("error")),
        }
        if mode != "sdk":
            summary[mode]["engine_added_ms"] = summarize(r.get("engine_added_ms") for r in recs)
            summary[mode]["pipeline_ms"] = summarize(r.get("pipeline_ms") for r in recs)
            summary[mode]["metrics_first_audio_ms"] = summarize(
                r["metrics_first_audio_ms"] for r in recs
            )
        else:
            summary[mode]["sdk_added_ms"] = summarize(r.get("sdk_added_ms") for r in recs)
            summary[mode]["connect_ms"] = summarize(r.get("connect_ms") for r in recs)
    ratios: dict[str, float | None] = {}
    for base in ("warm", "cold"):
        for what in ("from_text_ms", "from_start_ms"):
            if base in summary and "sdk" in summary:
                a, b = summary["sdk"][what]["p50"], summary[base][what]["p50"]
                ratios[f"sdk_over_{base}_{what}_p50"] = a / b if a and b else None
        if base in summary and "sdk" in summary:
            a, b = summary["sdk"]["from_start_ms"]["p50"], summary[base]["from_text_ms"]["p50"]
            ratios[f"sdk_start_over_{base}_text_p50"] = a / b if a and b else None
    summary["ratios_p50"] = ratios

    lines = [
        f"First audio on the local server (tone, burst, own process); n={args.n} per mode "
        f"after {args.warmup} warm-up, text {args.text!r}. Milliseconds.",
        "",
        "| mode | measured from | p50 | p95 | p99 | max |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        if mode not in summary:
            continue
        for what, label in (("from_text_ms", "first text"), ("from_start_ms", "request start")):
            s = summary[mode][what]
            lines.append(f"| {mode} | {label} | {fmt_ms(s['p50'])} | {fmt_ms(s['p95'])} | "
                         f"{fmt_ms(s['p99'])} | {fmt_ms(s['max'])} |")  # fmt: skip
    lines += ["", "| engine added latency (first sample in sink − server send stamp) | p50 | p95 "
              "| p99 | max |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for mode in ("warm", "cold"):
        if mode in summary:
            s = summary[mode]["engine_added_ms"]
            lines.append(f"| tts-stream {mode} | {fmt_ms(s['p50'], 3)} | {fmt_ms(s['p95'], 3)} | "
                         f"{fmt_ms(s['p99'], 3)} | {fmt_ms(s['max'], 3)} |")  # fmt: skip
    if "sdk" in summary:
        s = summary["sdk"]["sdk_added_ms"]
        lines.append(
            f"| SDK (to its callback, undecoded) | {fmt_ms(s['p50'], 3)} | "
            f"{fmt_ms(s['p95'], 3)} | {fmt_ms(s['p99'], 3)} | {fmt_ms(s['max'], 3)} |"
        )
    lines += ["", "Ratios of medians (SDK / tts-stream):", ""]
    for k, v in ratios.items():
        lines.append(f"- {k}: {fmt_ms(v, 1)}x")
    return summary, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.first_audio",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--n", type=int, default=200, help="measured utterances per mode")
    parser.add_argument("--warmup", type=int, default=20, help="utterances per mode not counted")
    parser.add_argument(
        "--text",
        default="Hi.",
        help="utterance (ends with '.' so the server "
        "cuts at once; 'Hi.' gives a single delta at --delta-ms 250)",
    )
    parser.add_argument("--delta-ms", type=float, default=250.0, help="server delta size")
    parser.add_argument("--modes", default=",".join(MODES), help="subset of warm,cold,sdk")
    parser.add_argument(
        "--pause-ms", type=float, default=0.0, help="idle time before every utterance"
    )
    parser.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="event loop of the benchmark (client) process",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() after set-up (default: off, the plain interpreter)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "first_audio.jsonl")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    out: Path = args.out
    with ServerProcess(pacing="burst", delta_ms=args.delta_ms, stamp_deltas=True) as srv:
        env = environment(loop=args.loop, bench="first_audio", server=srv.options,
                          args={k: v for k, v in vars(args).items() if k != "out"})  # fmt: skip
        t0 = time.monotonic()
        with GcPauses() as gcp:
            records = run_loop(run(args, srv, gcp), args.loop)
        wall = time.monotonic() - t0
    summary, table = report(records, args)
    summary["wall_s"] = wall
    summary["gc"] = gcp.summary()
    with JsonLines(out) as jl:
        jl.write(env)
        for rec in records:
            jl.write(rec)
        jl.write(summary)
    write_text(out.with_suffix(".md"), table)
    if not args.no_plot:
        measured = [r for r in records if not r["warmup"]]
        series: dict[str, list[float]] = {}
        for mode in args.modes:
            for what, label in (("from_text_ms", "from first text"),
                                ("from_start_ms", "from request start")):  # fmt: skip
                series[f"{mode}, {label}"] = [
                    r[what] for r in measured if r["mode"] == mode and r[what] is not None
                ]
        cdf_plot(out.with_suffix(".png"), series, title="First audio: tts-stream vs dashscope "
                 "SDK (local server, loopback)", xlabel="milliseconds (log scale)")  # fmt: skip
    sys.stdout.write(table)
    return 0 if all(not r.get("error") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
