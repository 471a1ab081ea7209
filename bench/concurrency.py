"""N concurrent real-time utterances: first audio, late frames, CPU and memory per stream.

Run (one command regenerates bench/results/concurrency.{jsonl,png,md})::

    .venv/bin/python -m bench.concurrency        # N = 1,50,200,500,1000 x asyncio,uvloop

The local server runs in its own process (tone backend, ``pacing="realtime"``: each delta is
sent when the audio before it has played, ``stamp_deltas`` on, uvloop). Each (N, loop) point
runs in a *fresh* client process (``--worker``) so that CPU time (``time.process_time``) and
peak RSS (``getrusage``) belong to that point alone. The worker:

1. opens an :class:`~tts_stream.Engine` (``pool_size=0``) and ``prewarm(voice, N)``: N
   configured sessions, the way a voice bot keeps lines ready (not timed);
2. starts N utterances spread uniformly over ``--ramp-s`` seconds (calls do not all start in
   the same millisecond; ``--ramp-s 0`` is the synchronised worst case), each
   ``engine.speak(voice, sinks=[TimingSink()])`` + ``push(text)`` of ``--seconds`` of audio;
3. measures, over the window from the first start to the last utterance done: the client's
   CPU seconds, the server's (``/proc/<pid>/stat``), first audio per utterance (first text →
   first frame written into the sink), and *late frames*.

Late frame: a frame written to its sink after its playout deadline ``first_write +
offset / rate + allowance``; ``first_write`` is the moment the utterance's first frame reached
the sink (a player starting then), ``offset`` the frame's first sample in the utterance. The
server sends each delta exactly when the audio before it has played, so the schedule has no
slack of its own: the allowance (``--allowance-ms``, default 50 ms, a typical jitter buffer
of a sound card or an RTP receiver) is the only cushion. The distribution of lateness is also
recorded, so other allowances can be applied to the JSON lines.

The sink is a :class:`TimingSink` (stamps each write and does nothing else) by default so the
CPU figures are the engine's; ``--sink array`` uses ``sinks.ArraySink`` with a consumer task.
Note: the pool refills the spares it hands out (target N after ``prewarm(voice, N)``), so N
refill dials happen during the window; their CPU is measured on the prewarm dials and shown
separately (``cpu_ms_per_audio_s_excl_refill``).
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
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    KEY_ENV,
    REPO,
    RESULTS,
    GcPauses,
    JsonLines,
    ServerProcess,
    environment,
    fmt_ms,
    line_plots,
    machine_busy_s,
    peak_rss_kb,
    proc_cpu_s,
    proc_rss_kb,
    raise_nofile_limit,
    run_loop,
    summarize,
    write_text,
)
from tts_stream import AudioFormat, Engine, Frame, SinkStats, Voice
from tts_stream.messages import VC_MODELS

__all__ = ["Sampler", "TimingSink", "lateness_ms", "main", "utterance_text", "worker"]

MODEL = VC_MODELS[0]
_WORDS = "the quick brown fox jumps over a lazy dog while seven bright birds sing softly".split()


def utterance_text(seconds: float) -> str:
    """One sentence that the tone backend speaks for about ``seconds`` (60 ms per char)."""
    want = max(3, int(seconds * 1000 / 60))
    words: list[str] = []
    i = 0
    while len(" ".join(words)) < want - 1:
        words.append(_WORDS[i % len(_WORDS)])
        i += 1
    return (" ".join(words))[: want - 1].rstrip() + "."


class TimingSink:
    """A sink that stamps every write (monotonic time, offset, samples) and does nothing else."""

    def __init__(self, name: str = "timing") -> None:
        self.name = name
        self.rate = 24000
        self.writes: list[tuple[float, int, int]] = []
        self.samples = 0
        self._first: float | None = None

    async def open(self, fmt: AudioFormat) -> None:
        self.rate = fmt.sample_rate

    async def write(self, frame: Frame) -> None:
        self.write_nowait(frame)

    def write_nowait(self, frame: Frame) -> bool:
        """Never waits, like a real non-blocking sink (WavSink, a roomy ArraySink)."""
        now = time.monotonic()
        if self._first is None:
            self._first = now
        n = len(frame)
        self.writes.append((now, frame.offset, n))
        self.samples += n
        return True

    async def drain(self) -> None:
        return None

    async def interrupt(self) -> int:
        return sum(n for _, _, n in self.writes)

    async def aclose(self) -> None:
        return None

    def stats(self) -> SinkStats:
        n = sum(w[2] for w in self.writes)
        return SinkStats(self.name, n, n, 0, 0, self._first)


def lateness_ms(writes: list[tuple[float, int, int]], rate: int) -> list[float]:
    """Per frame: write time minus its deadline ``first_write + offset / rate`` (ms)."""
    if not writes:
        return []
    t0, off0, _ = writes[0]
    return [((t - t0) - (off - off0) / rate) * 1000.0 for t, off, _ in writes]


# --- worker (one (N, loop) point, its own process) -----------------------------------------------


async def _one(engine: Engine, voice: Voice, text: str, delay: float, *, sink_kind: str,
               limit_s: float, timing: TimingSink) -> dict[str, Any]:  # fmt: skip
    await asyncio.sleep(delay)  # the ramp: start times spread over --ramp-s
    rec: dict[str, Any] = {"kind": "utterance", "started": time.monotonic()}
    consumer: asyncio.Task[int] | None = None
    sinks: list[Any] = [timing]
    try:
        async with asyncio.timeout(limit_s), asyncio.TaskGroup() as tg:
            if sink_kind == "array":
                from sinks import ArraySink

                arr = ArraySink(max_blocks=100_000)
                sinks = [timing, arr]
                consumer = tg.create_task(_consume(arr))
            t_start = time.monotonic()
            speech = engine.speak(voice, sinks=sinks)
            async with speech:
                t_text = time.monotonic()
                await speech.push(text)
        m = speech.metrics
        rec.update(
            start_ms=0.0,
            first_audio_ms=(timing.writes[0][0] - t_text) * 1000.0 if timing.writes else None,
            from_start_ms=(timing.writes[0][0] - t_start) * 1000.0 if timing.writes else None,
            metrics_first_audio_ms=m.first_audio_ms,
            audio_s=sum(w[2] for w in timing.writes) / timing.rate,
            server_lag_ms_p50=m.server_lag_ms_p50,
            server_lag_ms_max=m.server_lag_ms_max,
            was_warm=m.was_warm,
            error=m.error,
        )
    except Exception as exc:  # one failed utterance must not hide the others' numbers
        rec["error"] = repr(exc)
        rec["audio_s"] = sum(w[2] for w in timing.writes) / timing.rate
    late = lateness_ms(timing.writes, timing.rate)
    rec["frames"] = len(late)
    rec["lateness_ms"] = late  # replaced by a summary before writing (see _summarize_worker)
    if consumer is not None and consumer.done() and not consumer.cancelled():
        rec["array_samples"] = consumer.result()
    rec["ended"] = time.monotonic()
    return rec


class Sampler:
    """Samples (time, client CPU, server CPU, samples delivered) every ``period`` seconds."""

    def __init__(self, sinks: list[TimingSink], server_pid: int, period: float = 0.25) -> None:
        self.sinks, self.server_pid, self.period = sinks, server_pid, period
        self.points: list[tuple[float, float, float, int, float]] = []
        self.stop = asyncio.Event()

    def take(self) -> None:
        self.points.append(
            (
                time.monotonic(),
                time.process_time(),
                proc_cpu_s(self.server_pid),
                sum(s.samples for s in self.sinks),
                machine_busy_s(),
            )
        )

    async def run(self) -> None:
        while not self.stop.is_set():
            self.take()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.period):
                    await self.stop.wait()
        self.take()

    def steady(self, start: float, end: float, rate: int) -> dict[str, Any] | None:
        """CPU per second of audio between the first and last sample within [start, end]."""
        inside = [p for p in self.points if start <= p[0] <= end]
        if len(inside) < 2:
            return None
        (t0, c0, s0, n0, m0), (t1, c1, s1, n1, m1) = inside[0], inside[-1]
        audio_s = (n1 - n0) / rate
        if audio_s <= 0:
            return None
        wall = t1 - t0
        return {
            "window_s": wall,
            "audio_s": audio_s,
            "client_cpu_ms_per_audio_s": (c1 - c0) * 1000.0 / audio_s,
            "server_cpu_ms_per_audio_s": (s1 - s0) * 1000.0 / audio_s,
            "client_cpu_util": (c1 - c0) / wall,
            "server_cpu_util": (s1 - s0) / wall,
            # what the rest of this shared machine used meanwhile, in cores (of 2)
            "other_cpu_util": ((m1 - m0) - (c1 - c0) - (s1 - s0)) / wall,
        }


async def _consume(sink: Any) -> int:
    n = 0
    async for block in sink:
        n += int(block.size)
    return n


async def worker(args: argparse.Namespace) -> dict[str, Any]:
    nofile = raise_nofile_limit()
    key = os.environ[KEY_ENV]
    voice = Voice(args.voice, MODEL)
    text = utterance_text(args.seconds)
    out: dict[str, Any] = {
        "kind": "point", "n": args.n, "loop": args.loop, "sink": args.sink, "gc_mode": args.gc,
        "seconds": args.seconds, "ramp_s": args.ramp_s, "allowance_ms": args.allowance_ms,
        "text_chars": len(text), "nofile": nofile, "rss_start_kb": proc_rss_kb(),
    }  # fmt: skip
    # --gc plain: the engine leaves the collector alone (freeze_gc=False); any other mode
    # keeps the engine's default, which freezes it after the prewarm.
    engine = Engine(base_url=args.base_url, api_key=key, pool_size=0,
                    dial_concurrency=args.dial_concurrency, open_timeout=60.0,
                    configure_timeout=60.0, freeze_gc=args.gc != "plain")  # fmt: skip
    async with engine:
        exporters = _install_exporters(engine, args.exporters)
        # One utterance first (not measured): first-use costs (lazy imports, caches) are paid.
        await engine.say(voice, "Warm up.", sinks=[TimingSink()])
        if exporters is not None:
            exporters.mark_warm()
        await _prewarm(engine, voice, args, out)
        recs = await _window(engine, voice, text, args, out)
        if exporters is not None:
            out["exporters"] = args.exporters
            out["exporter_cpu_s"] = exporters.cpu_s - exporters.warmup_cpu_s
            out["exporter_calls"] = exporters.calls - exporters.warmup_calls
            out["scrape_ms"] = exporters.scrape_ms()
        out["rss_end_kb"] = proc_rss_kb()
    out["peak_rss_kb"] = peak_rss_kb()
    out["ru_maxrss_kb"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return _summarize_worker(out, recs, args)


async def _prewarm(
    engine: Engine, voice: Voice, args: argparse.Namespace, out: dict[str, Any]
) -> None:
    """One spare per stream, then the collector mode of ``--gc``."""
    t = time.monotonic()
    cpu = time.process_time()
    srv_cpu = proc_cpu_s(args.server_pid)
    tracked = _tracked()
    await engine.prewarm(voice, args.n)
    # objects the collector tracks per idle spare (kept alive by the pool)
    out["gc_tracked_per_spare"] = (_tracked() - tracked) / max(args.n, 1)
    out["prewarm_s"] = time.monotonic() - t
    out["prewarm_cpu_s"] = time.process_time() - cpu
    out["prewarm_server_cpu_s"] = proc_cpu_s(args.server_pid) - srv_cpu
    out["rss_idle_sessions_kb"] = proc_rss_kb()
    if args.gc in ("freeze", "off"):
        # What a long-running service did by hand before the engine froze by itself.
        gc.collect()
        gc.freeze()
    if args.gc == "off":  # an experiment (upper bound of what GC costs), not advice
        gc.disable()
    out["gc_frozen_objects"] = gc.get_freeze_count()
    out["gc_tracked_objects"] = len(gc.get_objects())


def _tracked() -> int:
    """Objects the collector tracks, frozen ones included."""
    return len(gc.get_objects()) + gc.get_freeze_count()


async def _window(
    engine: Engine, voice: Voice, text: str, args: argparse.Namespace, out: dict[str, Any]
) -> list[dict[str, Any]]:
    """The measured window: ``n`` streams started over the ramp, CPU and GC around them."""
    n = args.n
    timeout = args.seconds * 4 + args.ramp_s + 60.0
    dials0 = engine.pool_stats().dials
    t0, cpu0 = time.monotonic(), time.process_time()
    srv0, busy0 = proc_cpu_s(args.server_pid), machine_busy_s()
    delays = [args.ramp_s * i / n for i in range(n)] if n > 1 else [0.0]
    timings = [TimingSink() for _ in range(n)]
    sampler = Sampler(timings, args.server_pid)
    profiler = _start_profiler(args)
    gc0 = gc.get_stats()
    with GcPauses() as gcp:
        async with asyncio.TaskGroup() as tg:
            sampling = tg.create_task(sampler.run())
            async with asyncio.TaskGroup() as utterances:
                tasks = [utterances.create_task(_one(engine, voice, text, d, sink_kind=args.sink,
                                                     limit_s=timeout, timing=sink))
                         for d, sink in zip(delays, timings, strict=True)]  # fmt: skip
            sampler.stop.set()
        await sampling
        t1, cpu1 = time.monotonic(), time.process_time()
        srv1, busy1 = proc_cpu_s(args.server_pid), machine_busy_s()
        _stop_profiler(profiler, args)
        out["refill_dials"] = engine.pool_stats().dials - dials0
        recs = [task.result() for task in tasks]
    out["gc"] = gcp.summary()
    gc1 = gc.get_stats()
    pairs = zip(gc0, gc1, strict=True)
    out["gc_collections"] = [b["collections"] - a["collections"] for a, b in pairs]
    # A gen-0 collection runs every `threshold` net new tracked objects: per delta (one
    # frame per delta) this is what the engine allocates and does not free at once.
    frames = sum(len(t.writes) for t in timings)
    out["gc_tracked_allocs_per_delta"] = (
        out["gc_collections"][0] * gc.get_threshold()[0] / frames if frames else None
    )
    # Steady state: every stream started (+0.5 s) and none finished yet (-0.5 s).
    last_start = max(r["started"] for r in recs)
    first_end = min(r["ended"] for r in recs)
    out["steady"] = sampler.steady(last_start + 0.5, first_end - 0.5, timings[0].rate)
    out["wall_s"] = t1 - t0
    out["client_cpu_s"] = cpu1 - cpu0
    out["server_cpu_s"] = srv1 - srv0
    out["other_cpu_s"] = (busy1 - busy0) - out["client_cpu_s"] - out["server_cpu_s"]
    return recs


def _start_profiler(args: argparse.Namespace) -> Any:
    """pyinstrument over the measurement window only (``--pyinstrument``), else None."""
    if not args.pyinstrument:
        return None
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005, async_mode="disabled")
    profiler.start()
    return profiler


def _stop_profiler(profiler: Any, args: argparse.Namespace) -> None:
    if profiler is None:
        return
    profiler.stop()
    path = Path(args.pyinstrument)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profiler.output_text(unicode=False, color=False, show_all=False))


def _summarize_worker(out: dict[str, Any], recs: list[dict[str, Any]],
                      args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    all_late: list[float] = []
    for r in recs:
        late = r.pop("lateness_ms")
        all_late.extend(late)
        r["max_late_ms"] = max(late) if late else None
        r["late_frames"] = sum(1 for x in late if x > args.allowance_ms)
    audio_s = sum(r.get("audio_s") or 0.0 for r in recs)
    n_dials = max(out["n"], 1)
    per_dial = out["prewarm_cpu_s"] / n_dials
    out.update(
        errors=sum(1 for r in recs if r.get("error")),
        error_examples=sorted({str(r["error"])[:200] for r in recs if r.get("error")})[:3],
        audio_s=audio_s,
        frames=len(all_late),
        late_frames=sum(1 for x in all_late if x > args.allowance_ms),
        late_frames_20ms=sum(1 for x in all_late if x > 20.0),
        late_utterances=sum(1 for r in recs if r["late_frames"]),
        # late utterances whose deltas also reached the client's reader late (receive time -
        # server send stamp above the allowance): the client process was not reading in time
        # late frames of utterances whose deltas all reached the reader in time: the
        # lateness came from upstream (the server's pacing, its GC, or a stolen CPU)
        late_frames_upstream=sum(
            r["late_frames"]
            for r in recs
            if r["late_frames"] and (r.get("server_lag_ms_max") or 0.0) <= args.allowance_ms
        ),
        late_utterances_client_lag=sum(
            1
            for r in recs
            if r["late_frames"] and (r.get("server_lag_ms_max") or 0.0) > args.allowance_ms
        ),
        lateness_ms=summarize(all_late),
        first_audio_ms=summarize(r.get("first_audio_ms") for r in recs),
        from_start_ms=summarize(r.get("from_start_ms") for r in recs),
        server_lag_ms_max=summarize(r.get("server_lag_ms_max") for r in recs),
        cpu_ms_per_audio_s=out["client_cpu_s"] * 1000.0 / audio_s if audio_s else None,
        refill_cpu_s_est=per_dial * out["refill_dials"],
        server_cpu_ms_per_audio_s=out["server_cpu_s"] * 1000.0 / audio_s if audio_s else None,
        client_cpu_util=out["client_cpu_s"] / out["wall_s"] if out["wall_s"] else None,
        server_cpu_util=out["server_cpu_s"] / out["wall_s"] if out["wall_s"] else None,
    )
    excl = out["client_cpu_s"] - out["refill_cpu_s_est"]
    out["cpu_ms_per_audio_s_excl_refill"] = excl * 1000.0 / audio_s if audio_s else None
    if args.utterances_out:
        with JsonLines(args.utterances_out, truncate=False) as jl:
            for r in recs:
                jl.write({"n": out["n"], "loop": out["loop"], **r})
    return out


# --- parent --------------------------------------------------------------------------------------


class _TimedExporters:
    """The exporters of ``--exporters``, each call timed on the CPU clock (the bench's cost)."""

    def __init__(self, engine: Engine, which: str) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        from tts_stream.observability import OtelExporter, PrometheusExporter

        self.cpu_s = 0.0
        self.calls = 0
        self.warmup_cpu_s = 0.0
        self.warmup_calls = 0
        self.prom: PrometheusExporter | None = None
        observers: list[Any] = []
        if which in ("otel", "both", "all"):  # the real SDK aggregating ("all": with spans)
            self.reader = InMemoryMetricReader()
            tracer = TracerProvider()
            tracer.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
            observers.append(OtelExporter(meter_provider=MeterProvider(metric_readers=[
                self.reader]), tracer_provider=tracer, spans=which == "all"))  # fmt: skip
        if which in ("prometheus", "both", "all"):
            self.prom = PrometheusExporter(engine, observe=False)  # timed below
            observers.append(self.prom)

        def timed(record: Any, kinds: Any) -> None:
            t = time.process_time()
            for obs in observers:
                obs(record, kinds)
            self.cpu_s += time.process_time() - t
            self.calls += 1

        engine.add_observer(timed)

    def mark_warm(self) -> None:
        self.warmup_cpu_s, self.warmup_calls = self.cpu_s, self.calls

    def scrape_ms(self) -> float | None:
        if self.prom is None:
            return None
        from prometheus_client import generate_latest

        t = time.process_time()
        generate_latest(self.prom.registry)
        return (time.process_time() - t) * 1000.0


def _install_exporters(engine: Engine, which: str) -> _TimedExporters | None:
    return None if which == "none" else _TimedExporters(engine, which)


async def _enroll(srv: ServerProcess) -> str:
    from tts_stream.testing.samplegen import good_sample_wav

    async with Engine(base_url=srv.base_url, api_key=srv.api_key) as engine:
        voice = await engine.voices.create(
            good_sample_wav(), preferred_name="conc", target_model=MODEL
        )
        return voice.name


def _run_point(srv: ServerProcess, voice: str, n: int, loop: str, *,
               args: argparse.Namespace, utter_path: Path) -> dict[str, Any]:  # fmt: skip
    argv = [
        sys.executable, "-m", "bench.concurrency", "--worker", "--n", str(n), "--loop", loop,
        "--base-url", srv.base_url, "--voice", voice, "--server-pid", str(srv.pid),
        "--seconds", str(args.seconds), "--ramp-s", str(args.ramp_s),
        "--allowance-ms", str(args.allowance_ms), "--sink", args.sink,
        "--dial-concurrency", str(args.dial_concurrency), "--utterances-out", str(utter_path),
    ]  # fmt: skip
    argv += ["--gc", args.gc, "--exporters", getattr(args, "exporters", "none")]
    if args.profile and n in args.profile_levels:
        prof = utter_path.parent / f"profile_{loop}_n{n}.txt"
        argv = [
            "py-spy" if not _venv_bin("py-spy") else _venv_bin("py-spy"),
            "record",
            "--format",
            "raw",
            "--rate",
            "500",
            "--output",
            str(prof),
            "--",
            *argv,
        ]
    env = dict(os.environ)
    env[KEY_ENV] = srv.api_key
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    limit = args.seconds * 4 + args.ramp_s + 180.0
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=limit)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"kind": "point", "n": n, "loop": loop, "error": f"worker exit {proc.returncode}",
                "stderr": proc.stderr[-2000:]}  # fmt: skip
    point: dict[str, Any] = json.loads(lines[-1])
    return point


def _venv_bin(name: str) -> str | None:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else None


def _steady(p: dict[str, Any], key: str) -> float | None:
    st = p.get("steady")
    return st.get(key) if st else None


def report(points: list[dict[str, Any]], args: argparse.Namespace) -> str:
    ok = [p for p in points if "first_audio_ms" in p]
    lines = [
        f"N concurrent real-time utterances of ~{args.seconds:g} s each (server paced at real "
        f"time, own process); starts spread over {args.ramp_s:g} s; a frame is late when "
        f"written after first_write + offset/rate + {args.allowance_ms:g} ms; sink "
        f"{args.sink}; worker GC {args.gc}. CPU in ms per second of audio delivered: client = "
        "the engine's process, server = the local server's; *steady* = while all N streams "
        "play; *whole* = the whole window, incl. start, finish and close of every utterance "
        "(refill dials excluded).",
        "",
        "| loop | N | first audio p50 / p95 / max (ms) | late frames | late >20 ms "
        "| max lateness (ms) | client CPU, steady | client CPU, whole | server CPU, steady "
        "| peak RSS (MiB) | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        if "first_audio_ms" not in p:
            lines.append(f"| {p['loop']} | {p['n']} | {p.get('error')} ||||||||")
            continue
        fa = p["first_audio_ms"]
        lines.append(
            f"| {p['loop']} | {p['n']} | {fmt_ms(fa['p50'], 1)} / {fmt_ms(fa['p95'], 1)} / "
            f"{fmt_ms(fa['max'], 1)} | {p['late_frames']} / {p['frames']} | "
            f"{p['late_frames_20ms']} | {fmt_ms(p['lateness_ms']['max'], 1)} | "
            f"{fmt_ms(_steady(p, 'client_cpu_ms_per_audio_s'), 2)} | "
            f"{fmt_ms(p['cpu_ms_per_audio_s_excl_refill'], 2)} | "
            f"{fmt_ms(_steady(p, 'server_cpu_ms_per_audio_s'), 2)} | "
            f"{p['peak_rss_kb'] / 1024:.0f} | {p['errors']} |"
        )
    lines += [
        "",
        "Where late frames come from: *upstream* = late frames of utterances whose every delta "
        "reached the engine's reader within the allowance of the server's send stamp (the "
        "server sent late); gen-2 = the engine process's full garbage collections in the "
        "window; CPU util in cores (2 = the whole machine), *other* = every other process of "
        "this shared machine meanwhile; *server sent late* = deltas the server itself sent "
        "more than 20 / 50 ms after their due time on its real-time schedule (its own count; "
        "– for a server that does not report it).",
        "",
        "| loop | N | late frames | of which upstream | server sent late >20 / >50 ms "
        "| gen-2 GC: count, max / total pause (ms) | tracked allocs per delta "
        "| tracked objects per spare | frozen objects "
        "| CPU util steady: client / server | other processes |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for p in ok:
        gen2 = p.get("gc", {}).get("gen2", {})
        other = p["other_cpu_s"] / p["wall_s"] if p.get("wall_s") else None
        lines.append(
            f"| {p['loop']} | {p['n']} | {p['late_frames']} | {p['late_frames_upstream']} | "
            f"{p.get('server_deltas_late_20ms', '–')} / {p.get('server_deltas_late_50ms', '–')} | "
            f"{gen2.get('count', 0)}, {fmt_ms(gen2.get('max_ms'), 1)} / "
            f"{fmt_ms(gen2.get('sum_ms'), 1)} | {fmt_ms(p.get('gc_tracked_allocs_per_delta'), 1)}"
            f" | {fmt_ms(p.get('gc_tracked_per_spare'), 0)} | "
            f"{p.get('gc', {}).get('frozen_objects', '–')} | "
            f"{fmt_ms(_steady(p, 'client_cpu_util'), 2)} / "
            f"{fmt_ms(_steady(p, 'server_cpu_util'), 2)} | {fmt_ms(other, 2)} |"
        )
    return "\n".join(lines) + "\n"


def plot(points: list[dict[str, Any]], path: Path) -> None:
    ok = [p for p in points if "first_audio_ms" in p]
    loops = sorted({p["loop"] for p in ok})

    def series(fn: Any) -> dict[str, tuple[list[float], list[float]]]:
        res: dict[str, tuple[list[float], list[float]]] = {}
        for loop in loops:
            pts = sorted((p for p in ok if p["loop"] == loop), key=lambda p: p["n"])
            res[loop] = ([p["n"] for p in pts], [fn(p) for p in pts])
        return res

    fa: dict[str, tuple[list[float], list[float]]] = {}
    for q in ("p50", "p95", "max"):
        for loop, (xs, ys) in series(lambda p, q=q: p["first_audio_ms"][q]).items():
            fa[f"{loop} {q}"] = (xs, ys)
    cpu: dict[str, tuple[list[float], list[float]]] = {}
    for loop, xy in series(lambda p: _steady(p, "client_cpu_ms_per_audio_s")).items():
        cpu[f"{loop} client, steady"] = xy
    for loop, xy in series(lambda p: p["cpu_ms_per_audio_s_excl_refill"]).items():
        cpu[f"{loop} client, whole utterance"] = xy
    for loop, xy in series(lambda p: _steady(p, "server_cpu_ms_per_audio_s")).items():
        cpu[f"{loop} server, steady"] = xy
    line_plots(
        path,
        [
            ("first audio (first text → first frame in sink)", "ms", fa),
            (
                "late frames (% of frames)",
                "%",
                series(lambda p: 100.0 * p["late_frames"] / max(p["frames"], 1)),
            ),
            ("CPU per second of audio", "ms CPU / s audio", cpu),
            ("peak RSS of the client process", "MiB", series(lambda p: p["peak_rss_kb"] / 1024)),
        ],  # fmt: skip
        title="tts-stream: N concurrent real-time streams on this machine",
        xlabel="concurrent utterances N (log scale)",
        logy=(True, False, False, False),
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.concurrency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--levels", default="1,50,200,500,1000")
    parser.add_argument("--loops", default="asyncio,uvloop")
    parser.add_argument("--seconds", type=float, default=5.0, help="audio per utterance")
    parser.add_argument("--ramp-s", type=float, default=1.0, help="spread of the start times")
    parser.add_argument("--allowance-ms", type=float, default=50.0, help="jitter allowance")
    parser.add_argument("--sink", choices=["timing", "array"], default="timing")
    parser.add_argument("--dial-concurrency", type=int, default=4)
    parser.add_argument(
        "--server-gc",
        choices=["default", "off"],
        default="off",
        help="the local server's collector (off: its pauses are not the engine's)",
    )
    parser.add_argument(
        "--gc",
        choices=["default", "plain", "freeze", "off"],
        default="default",
        help="worker's garbage collector: the engine's default (it freezes the collector "
        "after the prewarm), plain (Engine(freeze_gc=False): the interpreter as is), "
        "freeze (gc.freeze() by hand after the prewarm too), or frozen and disabled "
        "(an experiment)",
    )
    parser.add_argument(
        "--exporters",
        choices=["none", "otel", "prometheus", "both", "all"],
        default="none",
        help="attach the OpenTelemetry (SDK) and/or Prometheus exporters (bench.exporters); "
        "all = both plus OpenTelemetry spans",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "concurrency.jsonl")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the workers of --profile-levels under py-spy (raw stacks)",
    )
    parser.add_argument("--profile-levels", default="200")
    # worker-only options
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--loop", default="asyncio", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--voice", default="", help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--utterances-out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--pyinstrument",
        default=None,
        help="worker only: write a pyinstrument text profile of the window",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.worker:
        point = run_loop(worker(args), args.loop)
        sys.stdout.write(json.dumps(point) + "\n")
        return 0

    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    loops = [x.strip() for x in args.loops.split(",") if x.strip()]
    args.profile_levels = [int(x) for x in args.profile_levels.split(",") if x.strip()]
    out: Path = args.out
    utter_path = out.with_name(out.stem + "_utterances.jsonl")
    utter_path.parent.mkdir(parents=True, exist_ok=True)
    utter_path.write_text("")
    points: list[dict[str, Any]] = []
    server = ServerProcess(
        pacing="realtime", delta_ms=100.0, stamp_deltas=True, gc_mode=args.server_gc
    )
    with server as srv, JsonLines(out) as jl:
        jl.write(environment(loop=",".join(loops), bench="concurrency", server=srv.options,
                             args={k: str(v) for k, v in vars(args).items()}))  # fmt: skip
        voice = run_loop(_enroll(srv), "asyncio")
        for n in levels:
            for loop in loops:
                t, before = time.monotonic(), srv.stats()
                point = _run_point(srv, voice, n, loop, args=args, utter_path=utter_path)
                point["point_wall_s"] = time.monotonic() - t
                after = srv.stats()
                if before and after:  # the server's own count of deltas it sent late
                    for key in ("deltas_sent", "deltas_late_20ms", "deltas_late_50ms"):
                        if key in after:
                            point["server_" + key] = after[key] - before.get(key, 0)
                point["server_rss_kb"] = srv.rss_kb()
                jl.write(point)
                points.append(point)
                fa = point.get("first_audio_ms", {})
                sys.stderr.write(
                    f"N={n:5d} {loop:8s} first audio p50 {fmt_ms(fa.get('p50'), 1)} ms, "
                    f"late {point.get('late_frames')}/{point.get('frames')}, cpu/audio-s "
                    f"{fmt_ms(point.get('cpu_ms_per_audio_s'), 3)} ms, errors "
                    f"{point.get('errors', point.get('error'))} "
                    f"({point['point_wall_s']:.0f} s)\n"
                )
    table = report(points, args)
    write_text(out.with_suffix(".md"), table)
    if not args.no_plot:
        plot(points, out.with_suffix(".png"))
    sys.stdout.write(table)
    return 0 if all("first_audio_ms" in p and not p["errors"] for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
