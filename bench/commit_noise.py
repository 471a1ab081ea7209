"""Commit noise: "server reported" log lines in a loop of ``commit()`` after a sentence.

Run::

    .venv/bin/python -m bench.commit_noise                    # --n 100 --on-loss fail,resume
    .venv/bin/python bench/commit_noise.py --code /work/main  # the same loop on other code

What a run does: a LocalServer in this process (tone backend, burst pacing) and an Engine
with a warm spare; ``--n`` utterances, each ``engine.speak(voice, sinks=[ArraySink])``,
``push("Sentence i.")``, ``commit()``, leave the block. The server cuts at the period on its
own, so the commit either finds the cut already announced (and is not sent) or races it on
the wire (the server answers "Input text buffer is empty."). Counted per ``on_loss`` mode:
``tts_stream`` log records at WARNING or above containing "server reported" (the goal is 0),
the debug records of a race recognised, and the server's own counters (error events sent,
client events received). ``--code DIR`` imports ``tts_stream`` from another checkout (e.g.
main, for the figure before the change); the server then comes from that checkout too.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.reported = 0  # WARNING+ records saying "server reported"
        self.loud = 0  # every WARNING+ record
        self.races = 0  # debug records of a commit overtaken by the server's cut

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.loud += 1
            self.reported += "server reported" in msg
        elif "overtaken" in msg:
            self.races += 1


async def _loop(n: int, on_loss: str) -> dict[str, Any]:
    from sinks import ArraySink
    from tts_stream import Engine
    from tts_stream.messages import VC_MODELS
    from tts_stream.server import LocalServer
    from tts_stream.testing.samplegen import good_sample_wav

    count = _Count()
    logger = logging.getLogger("tts_stream")
    logger.addHandler(count)
    logger.setLevel(logging.DEBUG)
    try:
        async with (
            LocalServer(port=0, backend="tone") as srv,
            Engine(base_url=srv.base_url, api_key=srv.api_key, pool_size=1) as engine,
        ):
            voice = await engine.voices.create(
                good_sample_wav(), preferred_name="noise", target_model=VC_MODELS[0]
            )
            kw: dict[str, Any] = {} if on_loss == "fail" else {"on_loss": on_loss}
            before = srv.stats()
            started = time.monotonic()
            for i in range(n):
                async with asyncio.timeout(30.0):
                    sink = ArraySink(max_blocks=10_000)
                    async with engine.speak(voice, sinks=[sink], **kw) as speech:
                        await speech.push(f"Sentence {i}.")
                        await speech.commit()
            after = srv.stats()
    finally:
        logger.removeHandler(count)
    return {
        "on_loss": on_loss,
        "utterances": n,
        "server_reported_lines": count.reported,
        "warning_lines": count.loud,
        "races_recognised": count.races,
        "server_errors_sent": after.errors_sent - before.errors_sent,
        "client_events": after.client_events - before.client_events,
        "seconds": round(time.monotonic() - started, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--on-loss", default="fail,resume", help="comma-separated modes")
    ap.add_argument("--code", type=Path, default=ROOT,
                    help="checkout to import tts_stream from (it needs tts_stream.testing)")
    ap.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.code.resolve()))
    for on_loss in args.on_loss.split(","):
        rec = asyncio.run(_loop(args.n, on_loss))
        rec["code"] = str(args.code)
        line = orjson.dumps(rec).decode()
        print(line)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
