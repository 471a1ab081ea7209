"""Cost of the metrics exporters per utterance at N concurrent streams (default 200).

Run (one command regenerates bench/results/exporters.{jsonl,md})::

    .venv/bin/python -m bench.exporters   # N=200, 3 repeats of none/prometheus/otel/both/all

Each point is a fresh ``bench.concurrency`` worker (same set-up: realtime pacing, tone
backend, ``--seconds`` of audio per utterance). With ``--exporters both`` the worker attaches
the OpenTelemetry exporter (real SDK ``MeterProvider`` with a reader) and the Prometheus
exporter (``all``: OpenTelemetry spans too, through a ``SimpleSpanProcessor``; ``otel`` and
``prometheus``: one of them), and times every observer call on the CPU clock. Two figures:

* **direct**: exporter CPU / client CPU of the same run (what the exporters themselves cost;
  robust to the machine's load, since both are this process's CPU time);
* **A/B**: client CPU per second of audio with exporters vs without, medians over the repeats
  (noisy on a shared machine: shown, not used for the verdict).

Target: the exporters cost < 2 % of the client CPU at 200 streams. A Prometheus scrape is
not per utterance; one scrape's CPU is reported separately.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: make `bench` importable
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import RESULTS, JsonLines, ServerProcess, environment, run_loop, write_text
from bench.concurrency import _enroll, _run_point

SCRAPE = "scrape_ms"
MODES = {
    "none": "no exporter",
    "prometheus": "Prometheus only",
    "otel": "OpenTelemetry metrics only (SDK MeterProvider)",
    "both": "OpenTelemetry metrics + Prometheus",
    "all": "OpenTelemetry metrics and spans (spans=True) + Prometheus",
}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exporters", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--loop", default="uvloop")
    parser.add_argument("--out", type=Path, default=RESULTS / "exporters.jsonl")
    args = parser.parse_args(argv)
    # What _run_point reads from the concurrency bench's arguments.
    point_args = argparse.Namespace(
        seconds=args.seconds, ramp_s=1.0, allowance_ms=50.0, sink="timing",
        dial_concurrency=4, gc="default", profile=False, profile_levels=[],
    )  # fmt: skip
    utter = args.out.with_name(args.out.stem + "_utterances.jsonl")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    points: list[dict[str, Any]] = []
    server = ServerProcess(pacing="realtime", delta_ms=100.0, stamp_deltas=True, gc_mode="off")
    with server as srv, JsonLines(args.out) as jl:
        jl.write(environment(loop=args.loop, bench="exporters", server=srv.options,
                             args={k: str(v) for k, v in vars(args).items()}))  # fmt: skip
        voice = run_loop(_enroll(srv), "asyncio")
        for rep in range(args.repeats):
            for mode in MODES:
                point_args.exporters = mode
                load = uptime()
                p = _run_point(srv, voice, args.n, args.loop, args=point_args, utter_path=utter)
                p.update(repeat=rep, exporters=mode, uptime=load)
                jl.write(p)
                points.append(p)
                share = (p.get("exporter_cpu_s", 0.0) / p["client_cpu_s"] * 100.0
                         if p.get("client_cpu_s") else None)  # fmt: skip
                sys.stderr.write(f"rep {rep} {mode:5s} client cpu {p.get('client_cpu_s')} s, "
                                 f"exporters {p.get('exporter_cpu_s')} s ({share} %), "
                                 f"{load}\n")  # fmt: skip
    table = report(points, args)
    write_text(args.out.with_suffix(".md"), table)
    sys.stdout.write(table)
    return 0 if all("error" not in p for p in points) else 1


def report(points: list[dict[str, Any]], args: argparse.Namespace) -> str:
    ok = [p for p in points if "error" not in p]
    none = [p for p in ok if p["exporters"] == "none"]
    out = [f"# Exporter cost at N={args.n} ({args.loop}, {args.seconds:g} s per utterance)", ""]
    for mode, title in MODES.items():
        if mode != "none":
            out += [f"## {title}", "", _table([p for p in ok if p["exporters"] == mode], none)]
    out += ["Load during the runs (`uptime`):", "",
            *[f"- {p['exporters']} rep {p['repeat']}: {p['uptime']}" for p in ok], ""]  # fmt: skip
    return "\n".join(out)


def _table(both: list[dict[str, Any]], none: list[dict[str, Any]]) -> str:
    shares = [p["exporter_cpu_s"] / p["client_cpu_s"] * 100.0 for p in both]
    per_utt = [p["exporter_cpu_s"] / max(p["exporter_calls"], 1) * 1e6 for p in both]

    def cpu_per_audio(ps: list[dict[str, Any]]) -> float | None:
        vals = [p["cpu_ms_per_audio_s"] for p in ps if p.get("cpu_ms_per_audio_s")]
        return statistics.median(vals) if vals else None

    med = statistics.median(shares) if shares else None
    lines = [
        "| figure | value |",
        "|---|---|",
        f"| exporter CPU / client CPU, per run | {', '.join(f'{s:.3f} %' for s in shares)} |",
        f"| median share | {med:.3f} % (target < 2 %: {'met' if med < 2 else 'NOT met'}) |"
        if med is not None else "| median share | no data |",
        f"| exporter CPU per utterance (median) | "
        f"{statistics.median(per_utt):.0f} µs |" if per_utt else "| per utterance | no data |",
        f"| client CPU per audio-second, with / without (A/B median) | "
        f"{cpu_per_audio(both)} / {cpu_per_audio(none)} ms |",
        f"| one Prometheus scrape (CPU) | "
        f"{', '.join(f'{p.get(SCRAPE) or 0:.2f}' for p in both)} ms |",
        "",
    ]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
