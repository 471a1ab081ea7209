"""What hostile clients cost the local server (issue 9.5, 9.6): memory, CPU, honest latency.

Run (about 2 minutes; bench/results/server_abuse.{jsonl,md})::

    .venv/bin/python -m bench.server_abuse                 # this checkout's server
    .venv/bin/python -m bench.server_abuse --code DIR      # another checkout's server (before)

The server runs in its own process (``python -m bench.common serve --loop asyncio``, tone
backend) started from ``--code`` (default: this repository), so the same attack can be
measured against the code before and after a fix. Measured, each point repeated:

* **mp3_2h**: one create with a two-hour 8 kbit/s MP3 (7.2 MB; 9.6 MB data URI): peak RSS
  of the server above its RSS before (``VmHWM`` after resetting it through
  ``/proc/PID/clear_refs``), the answer, the time to it.
* **mp3_2h x24**: 24 such creates at once: peak RSS delta, RSS delta 2 s after the answers.
* **absurd_rate**: one create with a 576 KB WAV whose header says 4,294,967,295 Hz: server
  CPU seconds for it, the answer.
* **honest**: a create with a good 12 s sample alone, then with 12 absurd-rate creates in
  flight: median latency.
* **slow clients** (``--slow N``, default 300): N connections that send half a header or half
  a body; how many the server still holds after ``--slow-wait`` seconds (default 35).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: make `bench` importable
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import io
import json
import os
import secrets
import selectors
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.common import KEY_ENV, REPO, RESULTS, JsonLines, environment, proc_cpu_s, proc_rss_kb
from tts_stream.messages import ENROLLMENT_PATH, VC_MODELS, create_voice_request
from tts_stream.samples import data_uri
from tts_stream.testing import hostile, samplegen

TIMEOUT = 300.0


class Server:
    """``python -m bench.common serve`` from the checkout ``code``, in its own process."""

    def __init__(self, code: Path) -> None:
        self.code, self.api_key = code, "sk-bench-" + secrets.token_hex(16)
        self.proc: subprocess.Popen[str] | None = None
        self.base_url, self.pid = "", 0

    def __enter__(self) -> Server:
        env = dict(os.environ, **{KEY_ENV: self.api_key, "PYTHONPATH": str(self.code)})
        argv = [sys.executable, "-m", "bench.common", "serve", "--loop", "asyncio"]
        self.proc = proc = subprocess.Popen(
            argv, cwd=self.code, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(60.0):
                raise TimeoutError("server not ready in 60 s")
        info = json.loads(proc.stdout.readline())
        self.base_url, self.pid = info["base_url"], int(info["pid"])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)

    def hwm_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0

    def reset_peak(self) -> int:
        """Reset the peak-RSS mark to the current RSS; returns the current RSS (KiB)."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        return proc_rss_kb(self.pid)


def body(sample: bytes, mime: str) -> bytes:
    return orjson.dumps(create_voice_request(target_model=VC_MODELS[0], preferred_name="b",
                                             audio_data=data_uri(sample, mime)))  # fmt: skip


async def post(http: aiohttp.ClientSession, srv: Server, data: bytes) -> tuple[float, str]:
    """(seconds to the answer, its code or "ok")."""
    t0 = time.perf_counter()
    async with http.post(srv.base_url + ENROLLMENT_PATH, data=io.BytesIO(data),
                         headers={"Authorization": f"Bearer {srv.api_key}"}) as resp:  # fmt: skip
        answer = orjson.loads(await resp.read())
    return time.perf_counter() - t0, str(answer.get("code", "ok"))


async def measure(srv: Server, out: JsonLines, args: argparse.Namespace) -> dict[str, Any]:
    mp3 = body(hostile.long_mp3(), "audio/mpeg")
    absurd = body(hostile.absurd_rate_wav(), "audio/wav")
    honest = body(samplegen.good_sample_wav(12.0), "audio/wav")
    summary: dict[str, Any] = {}
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        await post(http, srv, honest)  # first-use costs (imports, FFT plans) not measured
        for name, data, n in (("mp3_2h", mp3, 1), (f"mp3_2h_x{args.flood}", mp3, args.flood)):
            peaks, after, secs, codes = [], [], [], set()
            for _ in range(args.repeat):
                base = srv.reset_peak()
                answers = await asyncio.gather(*(post(http, srv, data) for _ in range(n)))
                peaks.append((srv.hwm_kb() - base) / 1024)
                await asyncio.sleep(2.0)
                after.append((proc_rss_kb(srv.pid) - base) / 1024)
                secs.append(max(s for s, _ in answers))
                codes |= {c for _, c in answers}
            rec = {"kind": name, "peak_rss_delta_mb": peaks, "rss_after_delta_mb": after,
                   "seconds": secs, "codes": sorted(codes)}  # fmt: skip
            out.write(rec)
            summary[name] = {"peak_mb": statistics.median(peaks),
                             "after_mb": statistics.median(after),
                             "s": statistics.median(secs), "codes": sorted(codes)}  # fmt: skip
        cpus, codes = [], set()
        for _ in range(args.repeat):
            c0 = proc_cpu_s(srv.pid)
            _, code = await post(http, srv, absurd)
            cpus.append(proc_cpu_s(srv.pid) - c0)
            codes.add(code)
        out.write({"kind": "absurd_rate", "server_cpu_s": cpus, "codes": sorted(codes)})
        summary["absurd_rate"] = {"cpu_s": statistics.median(cpus), "codes": sorted(codes)}
        alone = [(await post(http, srv, honest))[0] for _ in range(5)]
        attacked = []
        for _ in range(args.repeat):
            flood = [asyncio.create_task(post(http, srv, absurd)) for _ in range(12)]
            await asyncio.sleep(0.2)
            attacked.append((await post(http, srv, honest))[0])
            await asyncio.gather(*flood)
        out.write({"kind": "honest", "alone_s": alone, "under_attack_s": attacked})
        summary["honest"] = {"alone_s": statistics.median(alone),
                             "under_attack_s": statistics.median(attacked)}  # fmt: skip
    if args.slow:
        summary["slow"] = await slow_clients(srv, args.slow, args.slow_wait)
        out.write({"kind": "slow_clients", **summary["slow"]})
    return summary


async def slow_clients(srv: Server, n: int, wait_s: float) -> dict[str, Any]:
    """N connections sending half a header or half a body: how many are still open later."""
    port = int(srv.base_url.rsplit(":", 1)[1])
    conns = []
    for i in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if i % 2:
            writer.write(b"POST " + ENROLLMENT_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n")
        else:
            writer.write(hostile.raw_request(ENROLLMENT_PATH, b'{"mo', api_key=srv.api_key,
                                             length=1000))  # fmt: skip
        conns.append((reader, writer))
    await asyncio.sleep(wait_s)
    held = 0
    for reader, writer in conns:
        with contextlib.suppress(ConnectionError):
            # An open connection has nothing to read (or an answer but no EOF).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(), 0.01)
            held += not reader.at_eof()
        writer.close()
    return {"connections": n, "wait_s": wait_s, "still_held": held}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.server_abuse")
    p.add_argument("--code", type=Path, default=REPO, help="checkout whose server is measured")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--flood", type=int, default=24, help="concurrent 2-hour MP3 uploads")
    p.add_argument("--slow", type=int, default=300)
    p.add_argument("--slow-wait", type=float, default=35.0)
    p.add_argument("--out", type=Path, default=RESULTS / "server_abuse.jsonl")
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with JsonLines(args.out) as out:
        out.write(environment(loop="asyncio", code=str(args.code), uptime=os.getloadavg()))
        with Server(args.code.resolve()) as srv:
            summary = asyncio.run(measure(srv, out, args))
        out.write({"kind": "summary", **summary, "loadavg_end": os.getloadavg()})
    print(json.dumps(summary, indent=2))  # noqa: T201 - the benchmark's report
    return 0


if __name__ == "__main__":
    sys.exit(main())
