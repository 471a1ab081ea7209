"""SIP load: sipp places calls at a rate that reaches N concurrent calls on one process; every
call is answered and hears a cloned-voice prompt; measured at the receiver.

Usage::

    .venv/bin/python -m bench.sip_load                       # 200 concurrent, tone backend
    .venv/bin/python -m bench.sip_load --concurrent 50 --rate 10 --hold 6

One process runs the local server (``tone`` backend: nearly free synthesis, so the figure is
the telephony stack's) and a :class:`~tts_stream.telephony.SipAgent` on uvloop; the handler
says one prompt and keeps the call until sipp's BYE. sipp (a separate process) runs its
built-in ``uac`` scenario with ``-rtp_echo``: it sends every RTP packet it receives straight
back, so what comes back to the call's media socket is what sipp received. Figures: calls
sipp counts as failed, peak concurrent calls in the agent, RTP packets sent vs echoed back
(lost = sent - echoed, counting both directions), first-audio latency per call, process CPU.
Results: JSON lines in ``bench/results/sip_load.jsonl`` and a markdown row on stdout.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: make `bench` importable
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, JsonLines, environment, raise_nofile_limit, run_loop, summarize
from tts_stream import Engine
from tts_stream.server import LocalServer
from tts_stream.telephony import Call, SipAgent

__all__ = ["main"]

PROMPT = "Thank you for calling. All our agents are busy. Please stay on the line."


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _enroll(srv: LocalServer) -> str:
    from tts_stream.testing.enroll import enroll_voice  # a plain HTTP POST

    return await enroll_voice(srv, preferred_name="load")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    peak = 0
    said: list[bool] = []

    async def handler(call: Call) -> None:
        said.append(await call.say(PROMPT, barge_in=False))

    async with LocalServer(port=0, backend="tone") as srv:
        name = await _enroll(srv)
        async with Engine(api_key=srv.api_key, base_url=srv.base_url) as engine:
            voice = await engine.voices.find(name)
            async with SipAgent(engine, voice, handler, port=0,
                                max_calls=args.concurrent + 50) as agent:  # fmt: skip
                host, port = agent.address
                calls = args.calls or args.concurrent * 2
                cmd = [
                    "sipp", f"{host}:{port}", "-sn", "uac", "-i", "127.0.0.1",
                    "-p", str(_free_port()), "-mp", str(_free_port() & ~1),
                    "-r", str(args.rate), "-l", str(args.concurrent), "-m", str(calls),
                    "-d", str(int(args.hold * 1000)), "-rtp_echo", "-timeout",
                    str(int(calls / args.rate + args.hold + 60)), "-timeout_error", "-nostdin",
                    "-max_socket", "2048",
                ]  # fmt: skip
                cpu0, wall0 = time.process_time(), time.monotonic()
                with tempfile.TemporaryDirectory() as tmp:
                    proc = await asyncio.create_subprocess_exec(
                        *cmd, cwd=tmp, stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.STDOUT,
                    )
                    reader = asyncio.ensure_future(proc.communicate())
                    while not reader.done():
                        peak = max(peak, len(agent.calls))
                        await asyncio.wait({reader}, timeout=0.2)
                    out = (await reader)[0].decode(errors="replace")
                cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
                await agent.wait_idle(60)
    recs = agent.records
    ok = re.search(r"Successful call\s*\|\s*\d+\s*\|\s*(\d+)", out)
    failed = re.search(r"Failed call\s*\|\s*\d+\s*\|\s*(\d+)", out)
    sent = sum(r.packets_sent for r in recs)
    echoed = sum(r.media_received for r in recs)
    return {
        "kind": "sip_load",
        "concurrent_target": args.concurrent,
        "rate_cps": args.rate,
        "hold_s": args.hold,
        "calls_placed": calls,
        "sipp_exit": proc.returncode,
        "sipp_successful": int(ok.group(1)) if ok else None,
        "sipp_failed": int(failed.group(1)) if failed else None,
        "calls_answered": len(recs),
        "peak_concurrent_calls": peak,
        "prompts_heard_to_the_end": sum(said),
        "rtp_packets_sent": sent,
        "rtp_packets_echoed_back": echoed,
        "rtp_packets_lost_round_trip": sent - echoed,
        "first_audio_ms": summarize([r.first_audio_ms for r in recs]),
        "process_cpu_pct": round(100 * cpu / wall, 1),
        "wall_s": round(wall, 1),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrent", type=int, default=200)
    p.add_argument("--rate", type=float, default=20.0, help="calls per second")
    p.add_argument("--hold", type=float, default=12.0, help="seconds each call lasts")
    p.add_argument("--calls", type=int, default=None, help="default: 2 x concurrent")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    p.add_argument("--out", type=Path, default=RESULTS / "sip_load.jsonl")
    args = p.parse_args(argv)
    raise_nofile_limit()
    with JsonLines(args.out) as out:
        out.write(environment(loop=args.loop, bench="sip_load"))
        r = run_loop(run(args), args.loop)
        out.write(r)
    fa = r["first_audio_ms"]
    print("| concurrent (peak) | calls | sipp failed | answered | RTP sent | echoed | lost "
          "| first audio p50/p99 ms | CPU % | load |\n|---:|---:|---:|---:|---:|---:|---:|---:|"
          "---:|---:|")  # fmt: skip
    print(f"| {r['concurrent_target']} ({r['peak_concurrent_calls']}) | {r['calls_placed']} "
          f"| {r['sipp_failed']} | {r['calls_answered']} | {r['rtp_packets_sent']} "
          f"| {r['rtp_packets_echoed_back']} | {r['rtp_packets_lost_round_trip']} "
          f"| {fa['p50']:.1f}/{fa['p99']:.1f} | {r['process_cpu_pct']} | {r['loadavg_1min']} |")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
