"""Shared helpers of the benchmark scripts (bench/first_audio.py, bench/concurrency.py).

Role: start the local server in its *own* process and wait until it listens
(:class:`ServerProcess`), record the environment with every result file
(:func:`environment`), write JSON lines (:class:`JsonLines`), summarise distributions
(:func:`summarize`), read another process's CPU time from ``/proc`` (:func:`proc_cpu_s`),
pick the event loop (:func:`run_loop`), record garbage-collector pauses (:class:`GcPauses`),
read the whole machine's busy time (:func:`machine_busy_s`, the machine is shared), draw PNG
plots (matplotlib, Agg backend) and summarise py-spy profiles (``python -m bench.common
profile FILE``).

The server runner is this module itself: ``python -m bench.common serve --pacing realtime
--stamp-deltas ...`` starts a :class:`tts_stream.server.LocalServer`, prints one JSON line
``{"base_url": ..., "pid": ...}`` (never the API key: the parent passes the key in the
environment variable ``TTS_STREAM_BENCH_KEY``), and runs until SIGTERM/SIGINT or until its
stdin closes (so it never outlives the benchmark that started it).

Boundary: benchmarks only; imports ``tts_stream`` (the server and metrics), never ``sinks``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import os
import platform
import resource
import secrets
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

from tts_stream.metrics import summarize as summary_of

__all__ = [
    "KEY_ENV",
    "REPO",
    "RESULTS",
    "GcPauses",
    "JsonLines",
    "ServerProcess",
    "cdf_plot",
    "environment",
    "fmt_ms",
    "line_plots",
    "machine_busy_s",
    "main",
    "peak_rss_kb",
    "proc_cpu_s",
    "proc_rss_kb",
    "profile_summary",
    "raise_nofile_limit",
    "run_loop",
    "summarize",
    "write_text",
]

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
KEY_ENV = "TTS_STREAM_BENCH_KEY"
_CLK_TCK = os.sysconf("SC_CLK_TCK")

T = TypeVar("T")


# --- environment ---------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=5.0
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(*, loop: str, **extra: Any) -> dict[str, Any]:
    """What the figures depend on: interpreter, libraries, CPU, loop, commit, load."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "kind": "env",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "loadavg": os.getloadavg(),
        "loop": loop,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "versions": {
            d: _version(d)
            for d in (
                "numpy",
                "websockets",
                "aiohttp",
                "anyio",
                "orjson",
                "pybase64",
                "uvloop",
                "dashscope",
                "websocket-client",
                "matplotlib",
            )
        },  # fmt: skip
        **extra,
    }


# --- JSON lines ----------------------------------------------------------------------------------


class JsonLines:
    """Append-only JSON-lines writer (one object per line, flushed per line)."""

    def __init__(self, path: str | os.PathLike[str], *, truncate: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] = open(self.path, "w" if truncate else "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: Mapping[str, Any]) -> None:
        self._fh.write(json.dumps(record, separators=(",", ":"), default=_jsonable) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --- statistics ----------------------------------------------------------------------------------


def summarize(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """count/min/mean/p50/p95/p99/max of the non-None values: the library's
    :func:`tts_stream.metrics.summarize` (linear interpolation) as a dict, plus the minimum."""
    vals = [float(v) for v in values if v is not None]
    s = summary_of(vals)
    return {"count": s.count, "min": min(vals, default=None), "mean": s.mean, "p50": s.p50,
            "p95": s.p95, "p99": s.p99, "max": s.max}  # fmt: skip


def fmt_ms(value: float | int | None, digits: int = 2) -> str:
    """A number for a markdown table ("–" when missing)."""
    if value is None:
        return "–"
    return f"{value:.{digits}f}"


# --- garbage collector ---------------------------------------------------------------------------


class GcPauses:
    """Records every garbage-collector pause of this process (``gc.callbacks``).

    Gen-2 collections stop the loop for tens of milliseconds in a process with ~100k
    tracked objects: the benchmarks record them so outliers can be attributed.
    """

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float, float]] = []  # (generation, start, end) monotonic
        self._start = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.monotonic()
        else:
            self.pauses.append((int(info["generation"]), self._start, time.monotonic()))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)

    def during(self, start: float, end: float) -> float:
        """Milliseconds of GC pause that overlap [start, end]."""
        total = 0.0
        for _, a, b in self.pauses:
            total += max(0.0, min(b, end) - max(a, start))
        return total * 1000.0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for gen in (0, 1, 2):
            ms = [(b - a) * 1000.0 for g, a, b in self.pauses if g == gen]
            out[f"gen{gen}"] = {"count": len(ms), "max_ms": max(ms, default=0.0),
                                "sum_ms": sum(ms)}  # fmt: skip
        out["tracked_objects"] = len(gc.get_objects())
        out["frozen_objects"] = gc.get_freeze_count()
        return out


# --- processes -----------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (from /proc/<pid>/stat; no psutil)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw.rsplit(")", 1)[1].split()
    # After the ")" of comm: field 3 (state) is index 0, so utime (14) is 11, stime (15) 12.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_busy_s() -> float:
    """CPU seconds all processes of the machine used so far (/proc/stat, busy states only).

    Minus the benchmark's own processes it shows how busy *other* processes kept the
    machine during a measurement (this machine is shared and noisy).
    """
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def proc_rss_kb(pid: int | str = "self") -> int:
    """Current resident set size (VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def peak_rss_kb() -> int:
    """Peak RSS of this process in KiB: ``VmHWM`` (this address space's high-water mark).

    ``getrusage().ru_maxrss`` is kept across ``execve`` on Linux, so a freshly started
    worker would report its *parent's* peak when the parent was bigger; VmHWM starts afresh
    with the new program. Falls back to ``getrusage`` where /proc is missing.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard limit (1000 sockets need it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def run_loop(main: Coroutine[Any, Any, T], loop: str) -> T:
    """Run ``main`` on plain asyncio or on uvloop."""
    if loop == "uvloop":
        import uvloop

        result: T = uvloop.run(main)
        return result
    if loop != "asyncio":
        raise ValueError(f"loop must be 'asyncio' or 'uvloop', not {loop!r}")
    return asyncio.run(main)


class ServerProcess:
    """The local server in a child process (``python -m bench.common serve ...``).

    ``with ServerProcess(pacing="realtime", stamp_deltas=True) as srv:`` gives ``srv.base_url``,
    ``srv.ws_url``, ``srv.api_key`` (generated here, passed in the environment) and
    ``srv.pid`` (for :func:`proc_cpu_s`). Readiness: the child prints its address once it
    listens; waiting for that line is bounded by ``ready_timeout``.
    """

    def __init__(
        self,
        *,
        backend: str = "tone",
        pacing: str = "burst",
        delta_ms: float = 100.0,
        stamp_deltas: bool = True,
        delta_interval_s: float = 0.0,
        loop: str = "uvloop",
        gc_mode: str = "default",
        ready_timeout: float = 30.0,
    ) -> None:
        self.api_key = "sk-bench-" + secrets.token_hex(16)
        self._argv = [
            sys.executable, "-m", "bench.common", "serve", "--backend", backend,
            "--pacing", pacing, "--delta-ms", str(delta_ms), "--loop", loop,
            "--delta-interval-s", str(delta_interval_s), "--gc", gc_mode,
        ]  # fmt: skip
        if stamp_deltas:
            self._argv.append("--stamp-deltas")
        self.options = {"backend": backend, "pacing": pacing, "delta_ms": delta_ms,
                        "stamp_deltas": stamp_deltas, "delta_interval_s": delta_interval_s,
                        "loop": loop, "gc": gc_mode}  # fmt: skip
        self._ready_timeout = ready_timeout
        self._proc: subprocess.Popen[str] | None = None
        self.base_url = ""
        self.pid = 0

    @property
    def ws_url(self) -> str:
        return "ws" + self.base_url[4:] + "/api-ws/v1/realtime"

    def start(self) -> ServerProcess:
        env = dict(os.environ)
        env[KEY_ENV] = self.api_key
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self._proc = proc = subprocess.Popen(
            self._argv, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(self._ready_timeout):
                raise TimeoutError(f"local server not ready within {self._ready_timeout} s")
            line = proc.stdout.readline()
        finally:
            sel.close()
        if not line:
            raise RuntimeError(f"local server exited with code {proc.wait(5.0)}")
        info = json.loads(line)
        self.base_url, self.pid = info["base_url"], int(info["pid"])
        return self

    def cpu_s(self) -> float:
        """CPU seconds the server process used so far."""
        return proc_cpu_s(self.pid)

    def stats(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """The server's counters (``LocalServer.stats()``), asked for over its stdin; None
        when it does not answer in ``timeout`` (a tree whose ``serve`` has no such command)."""
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            return None
        proc.stdin.write("stats\n")
        proc.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                return None
            line = proc.stdout.readline()
        finally:
            sel.close()
        stats: dict[str, Any] = json.loads(line) if line.strip() else {}
        return stats or None

    def rss_kb(self) -> int:
        return proc_rss_kb(self.pid)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)
        for fh in (proc.stdin, proc.stdout):
            if fh is not None:
                with contextlib.suppress(OSError):
                    fh.close()

    def __enter__(self) -> ServerProcess:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


async def _serve(args: argparse.Namespace) -> None:
    from tts_stream.server import LocalServer

    raise_nofile_limit()
    key = os.environ.get(KEY_ENV) or None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def report() -> None:  # on the loop: the counters as one JSON line
        sys.stdout.write(json.dumps(dataclasses.asdict(srv.stats())) + "\n")
        sys.stdout.flush()

    def watch_stdin() -> None:  # "stats": report; the parent died or closed our stdin: stop
        with contextlib.suppress(OSError, ValueError):
            for line in sys.stdin:
                if line.strip() == "stats":
                    loop.call_soon_threadsafe(report)
        loop.call_soon_threadsafe(stop.set)

    async with LocalServer(
        port=0, backend=args.backend, pacing=args.pacing, delta_ms=args.delta_ms, api_key=key
    ) as srv:
        threading.Thread(target=watch_stdin, daemon=True).start()
        srv.faults.stamp_deltas = args.stamp_deltas
        srv.faults.delta_interval_s = args.delta_interval_s
        srv.faults.times = None  # every session
        if args.gc == "off":
            # The harness's server must not add its own collector pauses to what the
            # benchmark attributes to the engine (it lives for one benchmark run only).
            gc.collect()
            gc.freeze()
            gc.disable()
        sys.stdout.write(json.dumps({"base_url": srv.base_url, "pid": os.getpid()}) + "\n")
        sys.stdout.flush()
        await stop.wait()


# --- plots ---------------------------------------------------------------------------------------


def cdf_plot(
    path: str | os.PathLike[str],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    xlabel: str,
    logx: bool = True,
) -> None:
    """Empirical CDFs of several series on one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for label, values in series.items():
        vals = sorted(v for v in values if v is not None)
        if not vals:
            continue
        ys = [(i + 1) / len(vals) for i in range(len(vals))]
        ax.step(vals, ys, where="post", label=f"{label} (n={len(vals)})")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of utterances")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def line_plots(
    path: str | os.PathLike[str],
    panels: Sequence[tuple[str, str, Mapping[str, tuple[Sequence[float], Sequence[float]]]]],
    *,
    title: str,
    xlabel: str,
    logy: Sequence[bool] = (),
) -> None:
    """Several panels of x/y lines: ``(panel title, y label, {label: (xs, ys)})``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    cols = 2 if n > 1 else 1
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), dpi=100, squeeze=False)
    for i, (ptitle, ylabel, lines) in enumerate(panels):
        ax = axes[i // cols][i % cols]
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log")
        if i < len(logy) and logy[i]:
            ax.set_yscale("log")
        ax.set_title(ptitle, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")


def save_results(out: Path, env: Mapping[str, Any], records: Iterable[Mapping[str, Any]],
                 table: str) -> None:  # fmt: skip
    """``out``.jsonl (the environment first, then the records) and ``out``.md (the table),
    and the table on stdout."""
    with JsonLines(out.with_suffix(".jsonl")) as lines:
        lines.write(env)
        for record in records:
            lines.write(record)
    write_text(out.with_suffix(".md"), table)
    sys.stdout.write(table + "\n")


def profile_summary(path: str | os.PathLike[str], *, top: int = 40) -> str:
    """Shares of event-loop busy time from a ``py-spy record --format raw`` file.

    Idle samples (the selector's ``select``) are left out; the rest is grouped by the task or
    callback that ran (the frame right under ``Handle._run``), then by function inclusive and
    self time, line numbers dropped.
    """
    import collections
    import re

    by_task: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        if "select (selectors.py)" in frames[-1] or not any("_run_once" in f for f in frames):
            continue
        n = int(count)
        busy += n
        runs = [i for i, f in enumerate(frames) if f.startswith("Handle._run")]
        task = frames[runs[-1] + 1] if runs and runs[-1] + 1 < len(frames) else "(event loop)"
        by_task[task] += n
        for f in set(frames):
            incl[f] += n
        self_[frames[-1]] += n
    out = [f"busy samples in the event loop: {busy}", "", "by task / callback:"]
    out += [f"{100 * n / busy:5.1f}%  {f}" for f, n in by_task.most_common(15)]
    out += ["", "inclusive:"]
    out += [f"{100 * n / busy:5.1f}%  {f}" for f, n in incl.most_common(top) if n < busy]
    out += ["", "self:"]
    out += [f"{100 * n / busy:5.1f}%  {f}" for f, n in self_.most_common(top // 2)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.common")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run a LocalServer for a benchmark (its own process)")
    s.add_argument("--backend", default="tone")
    s.add_argument("--pacing", choices=["burst", "realtime"], default="burst")
    s.add_argument("--delta-ms", type=float, default=100.0)
    s.add_argument("--delta-interval-s", type=float, default=0.0)
    s.add_argument("--stamp-deltas", action="store_true")
    s.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    s.add_argument("--gc", choices=["default", "off"], default="default")
    pr = sub.add_parser("profile", help="summarise a py-spy raw profile (busy loop time)")
    pr.add_argument("path", type=Path)
    pr.add_argument("--top", type=int, default=40)
    e = sub.add_parser("env", help="print the environment record")
    e.add_argument("--loop", default="asyncio")
    args = parser.parse_args(argv)
    if args.command == "profile":
        sys.stdout.write(profile_summary(args.path, top=args.top))
        return 0
    if args.command == "env":
        print(json.dumps(environment(loop=args.loop), indent=2))
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(_serve(args), args.loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
