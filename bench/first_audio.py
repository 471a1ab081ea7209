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

``--turns 50,200,1000`` measures turn after turn instead (issue 11): an Engine with a pool of
one and no prewarm between turns (the pool must stay warm by itself). For each gap, pairs of
turns: a lead turn, ``gap`` ms of silence, the measured turn, from ``engine.speak()`` to the
first sample in the sink (``turn``). Interleaved with it, ``raw``: a plain ``websockets``
client on a fresh socket that is already configured (``session.created``, ``session.update``,
``session.updated``, all untimed), ``gap`` ms of silence, then from sending the text to the
first delta received and its audio decoded (``base64``): the floor for a configured socket.
With ``sdk`` in ``--modes``, the SDK's connect-to-first-delta is measured per pair too.

One monotonic clock (``time.monotonic``, CLOCK_MONOTONIC, system-wide on Linux). For every
utterance two figures: ``from_text_ms`` (first text handed over: ``speech.push`` /
``append_text``) and ``from_start_ms`` (before anything: ``engine.speak`` / ``connect``).
The end point is the first sample *written into the sink* for tts-stream: an ArraySink
stamped once the block is in it, on whichever path the fan-out delivers it, as to any
ArraySink (since issue 11's turn-path pass, the pump's ``write_nowait``; ``--queued-sink``
stamps with the sink used before, whose ``write`` override sent every frame through the lane
task). For the SDK it is the *arrival of the first delta in its callback* (before any base64
decoding: this favours the SDK, which hands the user undecoded JSON). ``engine_added_ms``
is the first sample in the sink minus the moment the server sent the first delta (the
server's ``x_sent_monotonic`` stamp): loopback, the WebSocket read, JSON + base64, the pump,
the fan-out and the sink. By default the text is short enough for a single delta, so the
server stamp of *that* delta is exact
(``metrics.server_lag_ms_max`` is the lag of the only delta).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: make `bench` importable
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

import orjson

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
from tts_stream.config import Endpoint
from tts_stream.messages import VC_MODELS

__all__ = [
    "QueuedStampedArraySink", "StampedArraySink", "engine_once", "main", "raw_once", "sdk_once",
]  # fmt: skip

MODEL = VC_MODELS[0]
MODES = ("warm", "cold", "sdk")
TIMEOUT = 20.0


class StampedArraySink(ArraySink):
    """An ArraySink that stamps when the first frame has been written into it.

    Delivered to exactly as a plain :class:`ArraySink`: it stamps in the two hooks behind
    both of the fan-out's paths (``_try_write`` behind ``write_nowait``, which the pump calls
    while the lane is idle, and ``_write`` behind ``write``, from the lane's task) and never
    overrides ``write`` (which would turn the non-blocking path off, BaseSink.__init_subclass__,
    and add the lane task's loop pass that a user's ArraySink does not pay). ``write_nowait``
    is wrapped only to note the frame's receive stamp (the hooks get the samples alone).
    """

    def __init__(self) -> None:
        super().__init__(max_blocks=100_000)
        self.first_write_at: float | None = None
        self.first_received_at: float | None = None
        self._received_at: float | None = None

    def write_nowait(self, frame: Frame) -> bool:
        self._received_at = frame.received_at
        return super().write_nowait(frame)

    def _stamp(self, samples: Any) -> None:
        if self.first_write_at is None and len(samples):
            self.first_write_at = time.monotonic()
            self.first_received_at = self._received_at

    async def _write(self, samples: Any) -> None:
        await super()._write(samples)
        self._stamp(samples)

    def _try_write(self, samples: Any) -> bool:
        ok = super()._try_write(samples)
        if ok:
            self._stamp(samples)
        return ok


class QueuedStampedArraySink(StampedArraySink):
    """The stamping sink before issue 11's turn-path pass (``--queued-sink``): it overrides
    ``write``, so its ``write_nowait`` always refuses and every frame takes the fan-out's
    queue and the lane task's loop pass. Kept to compare with figures measured before."""

    async def write(self, frame: Frame) -> None:
        self._received_at = frame.received_at
        await super().write(frame)


async def _drain(sink: ArraySink) -> int:
    n = 0
    async for block in sink:
        n += int(block.size)
    return n


async def engine_once(
    engine: Engine, voice: Voice, text: str, mode: str, gcp: GcPauses, *, queued: bool = False
) -> dict[str, Any]:
    sink = QueuedStampedArraySink() if queued else StampedArraySink()
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


async def raw_once(srv: ServerProcess, voice: str, text: str, gap_s: float) -> dict[str, Any]:
    """A plain websockets client: configure a fresh socket (untimed), idle, then time the
    text to the first delta decoded."""
    import pybase64
    from websockets.asyncio.client import connect

    endpoint = Endpoint.resolve(base_url=srv.base_url, api_key=srv.api_key)
    session = {"voice": voice, "mode": "server_commit", "response_format": "pcm",
               "sample_rate": 24000}  # fmt: skip
    async with asyncio.timeout(TIMEOUT), connect(
        endpoint.ws_url(MODEL), additional_headers=endpoint.headers(), compression=None
    ) as ws:
        await _until(ws, "session.created")
        await ws.send(orjson.dumps({"type": "session.update", "session": session}).decode())
        await _until(ws, "session.updated")
        await asyncio.sleep(gap_s)
        t0 = time.monotonic()
        await ws.send(orjson.dumps({"type": "input_text_buffer.append", "text": text}).decode())
        event = await _until(ws, "response.audio.delta")
        samples = len(pybase64.b64decode(event["delta"])) // 2
        t1 = time.monotonic()
        await ws.send(orjson.dumps({"type": "session.finish"}).decode())
        with contextlib.suppress(Exception):
            await _until(ws, "session.finished")
    return {"kind": "utterance", "mode": "raw", "from_start_ms": (t1 - t0) * 1000.0,
            "from_text_ms": (t1 - t0) * 1000.0, "samples": samples, "error": None}  # fmt: skip


async def _until(ws: Any, kind: str) -> dict[str, Any]:
    while True:
        event: dict[str, Any] = orjson.loads(await ws.recv())
        if event.get("type") == kind:
            return event
        if event.get("type") == "error":
            raise RuntimeError(f"server error while waiting for {kind}: {event}")


async def run_turns(
    args: argparse.Namespace, srv: ServerProcess, gcp: GcPauses
) -> list[dict[str, Any]]:
    """Turn after turn with a pool of one (see the module docstring, ``--turns``)."""
    import dashscope

    dashscope.api_key = srv.api_key
    from tts_stream.testing.samplegen import good_sample_wav

    records: list[dict[str, Any]] = []
    async with Engine(base_url=srv.base_url, api_key=srv.api_key, pool_size=1) as engine:
        voice = await engine.voices.create(
            good_sample_wav(), preferred_name="bench", target_model=MODEL
        )
        await engine.prewarm(voice, 1)
        for i in range(args.warmup + args.n):
            for gap_ms in args.turns:
                recs = await _turn_round(args, srv, engine, voice, gap_ms=gap_ms, gcp=gcp)
                for rec in recs:
                    rec.update(i=i, warmup=i < args.warmup, gap_ms=gap_ms)
                records.extend(recs)
        records.append({"kind": "pool", "stats": _pool_counts(engine)})
    return records


async def _turn_round(
    args: argparse.Namespace, srv: ServerProcess, engine: Engine, voice: Voice, *,
    gap_ms: float, gcp: GcPauses,
) -> list[dict[str, Any]]:  # fmt: skip
    await engine.prewarm(voice, 1)  # untimed: the lead turn starts from a ready spare
    q = args.queued_sink
    await engine_once(engine, voice, args.text, "lead", gcp, queued=q)
    await asyncio.sleep(gap_ms / 1000.0)
    recs = [await engine_once(engine, voice, args.text, "turn", gcp, queued=q)]
    await engine.prewarm(voice, 1)  # the refill of the measured turn ends before raw dials
    recs.append(await raw_once(srv, voice.name, args.text, gap_ms / 1000.0))
    if "sdk" in args.modes:
        recs.append(await asyncio.to_thread(sdk_once, srv.ws_url, voice.name, args.text))
    return recs


def _pool_counts(engine: Engine) -> dict[str, Any]:
    st = engine.pool_stats()
    return {"warm_acquires": st.warm_acquires, "cold_acquires": st.cold_acquires,
            "cold_reasons": dict(getattr(st, "cold_reasons", {})), "dials": st.dials}  # fmt: skip


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
                    rec = await engine_once(warm if mode == "warm" else cold, voice, args.text,
                                            mode, gcp, queued=args.queued_sink)  # fmt: skip
                rec["i"] = i
                rec["warmup"] = i < args.warmup
                records.append(rec)
    return records


def _mode_summary(mode: str, recs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "from_text_ms": summarize(r["from_text_ms"] for r in recs),
        "from_start_ms": summarize(r["from_start_ms"] for r in recs),
        "errors": sum(1 for r in recs if r.get("error")),
    }
    if mode == "sdk":
        out["sdk_added_ms"] = summarize(r.get("sdk_added_ms") for r in recs)
        out["connect_ms"] = summarize(r.get("connect_ms") for r in recs)
    elif mode != "raw":
        for what in ("engine_added_ms", "pipeline_ms", "metrics_first_audio_ms"):
            out[what] = summarize(r.get(what) for r in recs)
        out["warm"] = sum(1 for r in recs if r.get("was_warm"))
    return out


def _ratio(a: float | int | None, b: float | int | None) -> float | None:
    return a / b if a and b else None


def _ratios(summary: dict[str, Any]) -> dict[str, float | None]:
    ratios: dict[str, float | None] = {}
    if "sdk" not in summary:
        return ratios
    sdk = summary["sdk"]
    for base in ("warm", "cold"):
        if base not in summary:
            continue
        for what in ("from_text_ms", "from_start_ms"):
            ratios[f"sdk_over_{base}_{what}_p50"] = _ratio(
                sdk[what]["p50"], summary[base][what]["p50"]
            )
        ratios[f"sdk_start_over_{base}_text_p50"] = _ratio(
            sdk["from_start_ms"]["p50"], summary[base]["from_text_ms"]["p50"]
        )
    return ratios


def _row(label: str, s: dict[str, Any], digits: int = 2) -> str:
    cells = " | ".join(fmt_ms(s[q], digits) for q in ("p50", "p95", "p99", "max"))
    return f"| {label} | {cells} |"


def report(records: list[dict[str, Any]], args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    measured = [r for r in records if not r.get("warmup", True)]
    summary: dict[str, Any] = {"kind": "summary", "n": args.n, "warmup": args.warmup}
    for mode in MODES:
        recs = [r for r in measured if r["mode"] == mode]
        if recs:
            summary[mode] = _mode_summary(mode, recs)
    summary["ratios_p50"] = ratios = _ratios(summary)
    lines = [
        f"First audio on the local server (tone, burst, own process); n={args.n} per mode "
        f"after {args.warmup} warm-up, text {args.text!r}. Milliseconds.",
        "",
        "| mode | measured from | p50 | p95 | p99 | max |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for mode in (m for m in MODES if m in summary):
        lines.append(_row(f"{mode} | first text", summary[mode]["from_text_ms"]))
        lines.append(_row(f"{mode} | request start", summary[mode]["from_start_ms"]))
    lines += ["", "| engine added latency (first sample in sink − server send stamp) | p50 | p95 "
              "| p99 | max |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for mode in (m for m in ("warm", "cold") if m in summary):
        lines.append(_row(f"tts-stream {mode}", summary[mode]["engine_added_ms"], 3))
    if "sdk" in summary:
        lines.append(_row("SDK (to its callback, undecoded)", summary["sdk"]["sdk_added_ms"], 3))
    lines += ["", "Ratios of medians (SDK / tts-stream):", ""]
    lines += [f"- {k}: {fmt_ms(v, 1)}x" for k, v in ratios.items()]
    return summary, "\n".join(lines) + "\n"


def report_turns(
    records: list[dict[str, Any]], args: argparse.Namespace
) -> tuple[dict[str, Any], str]:
    """Per gap: the engine's turn from ``speak()``, the configured raw socket, the SDK."""
    measured = [r for r in records if r["kind"] == "utterance" and not r["warmup"]]
    pool: dict[str, Any] = next((r["stats"] for r in records if r["kind"] == "pool"), {})
    summary: dict[str, Any] = {"kind": "summary", "turns": args.turns, "n": args.n,
                               "warmup": args.warmup, "pool": pool}  # fmt: skip
    lines = [
        f"Turn after turn, pool of one, no prewarm between turns; n={args.n} pairs per gap "
        f"after {args.warmup} warm-up, text {args.text!r}. Milliseconds to the first audio: "
        "tts-stream from `engine.speak()` to the first sample in the sink; raw from the "
        "text sent on a configured socket to the first delta decoded; SDK from `connect()`.",
        "",
        "| gap (ms) | tts-stream p50 | p95 | warm | raw p50 | p95 | tts-stream − raw (p50) "
        "| SDK p50 | SDK / tts-stream |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for gap in args.turns:
        row: dict[str, Any] = {}
        for mode in ("turn", "raw", "sdk"):
            recs = [r for r in measured if r["gap_ms"] == gap and r["mode"] == mode]
            if recs:
                row[mode] = _mode_summary(mode, recs)
        summary[f"gap_{gap:g}"] = row
        turn, raw = row["turn"]["from_start_ms"], row["raw"]["from_start_ms"]
        sdk = row.get("sdk", {}).get("from_start_ms", {})
        lines.append(
            f"| {gap:g} | {fmt_ms(turn['p50'], 3)} | {fmt_ms(turn['p95'], 3)} | "
            f"{row['turn']['warm']}/{turn['count']} | {fmt_ms(raw['p50'], 3)} | "
            f"{fmt_ms(raw['p95'], 3)} | {fmt_ms(_diff(turn['p50'], raw['p50']), 3)} | "
            f"{fmt_ms(sdk.get('p50'))} | {fmt_ms(_ratio(sdk.get('p50'), turn['p50']), 1)}x |"
        )
    lines += ["", f"Pool: {pool}"]
    return summary, "\n".join(lines) + "\n"


def _diff(a: float | int | None, b: float | int | None) -> float | None:
    return None if a is None or b is None else a - b


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
    parser.add_argument(
        "--turns",
        default="",
        help="gaps in ms between turns, e.g. 50,200,1000: the turn-after-turn mode "
        "(pool of one vs a configured raw socket; the SDK too when in --modes)",
    )
    parser.add_argument(
        "--queued-sink",
        action="store_true",
        help="stamp with a sink that overrides write (every frame through the lane task's "
        "queue): the ruler of the figures measured before issue 11's turn-path pass",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.turns = [float(g) for g in args.turns.split(",") if g.strip()]
    name = "first_audio_turns.jsonl" if args.turns else "first_audio.jsonl"
    out: Path = args.out or RESULTS / name
    runner, reporter = (run_turns, report_turns) if args.turns else (run, report)
    with ServerProcess(pacing="burst", delta_ms=args.delta_ms, stamp_deltas=True) as srv:
        env = environment(loop=args.loop, bench="first_audio", server=srv.options,
                          args={k: v for k, v in vars(args).items() if k != "out"})  # fmt: skip
        t0 = time.monotonic()
        with GcPauses() as gcp:
            records = run_loop(runner(args, srv, gcp), args.loop)
        wall = time.monotonic() - t0
    summary, table = reporter(records, args)
    summary["wall_s"] = wall
    summary["gc"] = gcp.summary()
    with JsonLines(out) as jl:
        jl.write(env)
        for rec in records:
            jl.write(rec)
        jl.write(summary)
    write_text(out.with_suffix(".md"), table)
    if not args.no_plot and not args.turns:
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
