"""Pipecat TTFB and barge-in: tts-stream's service versus pipecat-dashscope's, side by side.

Run (one command regenerates bench/results/frameworks.{jsonl,md})::

    .venv/bin/python -m bench.frameworks          # --n 20 --warmup 2 --bargein 10

The local server runs in its own process with **real-time pacing** (audio leaves it as fast
as it plays, as the cloud sends it). Two Pipecat pipelines speak the same two-sentence turn
(``TextAggregationMode.SENTENCE``, the default of both services), alternating which goes
first in each round, so drift in machine load hits both alike:

* ``tts-stream``: ``TtsStreamTTSService`` in this process (its engine prewarms one session
  when the pipeline starts and keeps one spare);
* ``pipecat-dashscope``: ``DashScopeQwenRealtimeTTSService`` (pipecat-dashscope 0.2.0) in a
  child process run by its **own virtualenv**, because it pins ``websockets<16`` and
  tts-stream needs ``websockets>=13`` with 16 in use. The benchmark makes that venv itself
  on first use (``--venv``, default ``bench/.venv-pipecat-dashscope``: ``python -m venv``,
  then ``pip install pipecat-dashscope==0.2.0 pipecat-ai==1.7.0``: 0.2.0 imports a name Pipecat
  1.8 removed) and reuses it. The
  service has no URL option; the child binds the dashscope SDK class it uses to the local
  server's URL and changes nothing else. Pipecat 1.7 needs NLTK's ``punkt_tab`` data, which
  NLTK downloads at run time; the benchmark writes an untrained Punkt model instead
  (:func:`write_punkt_model`), enough for two plain sentences.

Both sides run the same driver (``bench/pipecat_turns.py``): TTFB is the first
``LLMTextFrame`` queued → the first ``TTSAudioRawFrame`` out of the service (Pipecat's own
``TTFBMetricsData`` is recorded too). Barge-in: a long turn, ``InterruptionFrame`` 0.5 s after
its first audio; ``last_audio_ms`` = interruption → last audio frame of that turn out of the
service, ``interruption_ms`` = interruption → the ``InterruptionFrame`` out of the service
(where the transport goes silent). Figures: medians (p95 in the table) and the TTFB ratio.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: make `bench` importable
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import json
import os
import subprocess
import sys
import venv
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.common import (
    KEY_ENV,
    REPO,
    RESULTS,
    JsonLines,
    ServerProcess,
    environment,
    fmt_ms,
    summarize,
    write_text,
)

# pipecat-dashscope 0.2.0 imports `_NotGiven` from pipecat.services.settings, gone in 1.8.
COMMUNITY = ["pipecat-dashscope==0.2.0", "pipecat-ai==1.7.0"]
DEFAULT_VENV = REPO / "bench" / ".venv-pipecat-dashscope"
TURN = [
    "Hello, this is the first sentence of my answer.",
    " And here is the second one, which is a little longer.",
]
LONG_TURN = ["This answer goes on for a while, so the caller can cut it short. " * 4]
REPLY_TIMEOUT_S = 120.0


def ensure_venv(path: Path) -> Path:
    """The community service's virtualenv (made on first use); returns its python."""
    python = path / "bin" / "python"
    marker = path / ".installed"
    wanted = "\n".join(COMMUNITY)
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    print(f"making {path} for pipecat-dashscope (once)...", file=sys.stderr)
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *COMMUNITY], check=True)
    write_punkt_model(path)
    marker.write_text(wanted)
    return python


def write_punkt_model(venv_dir: Path) -> None:
    """An untrained English Punkt model where NLTK looks first inside the venv.

    Pipecat 1.7 finds sentence ends with NLTK's ``punkt_tab``, which NLTK downloads at run
    time; this machine reaches package registries only. Empty parameter files make Punkt's
    untrained model: a sentence ends at ``.``/``?``/``!`` before a space, which is all the
    benchmark's two plain sentences need (no abbreviations, no learned starters).
    """
    lang = venv_dir / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    lang.mkdir(parents=True, exist_ok=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (lang / name).write_text("")


class Community:
    """The child process running pipecat-dashscope's service (JSON lines over pipes)."""

    def __init__(self, python: Path, srv: ServerProcess, voice: str, model: str) -> None:
        self._argv = [str(python), str(REPO / "bench" / "pipecat_turns.py"), "dashscope",
                      "--ws-url", srv.ws_url, "--model", model, "--voice", voice]  # fmt: skip
        self._env = {**os.environ, KEY_ENV: srv.api_key}
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Community:
        self._proc = await asyncio.create_subprocess_exec(
            *self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self._env
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        proc = self._proc
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            async with asyncio.timeout(30):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await proc.stdin.drain()
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"pipecat-dashscope worker exited ({await proc.wait()})")
        out: dict[str, Any] = json.loads(line)
        return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from loguru import logger

    from bench.pipecat_turns import Driver
    from tts_stream import Engine
    from tts_stream.integrations.pipecat import TtsStreamTTSService
    from tts_stream.testing.samplegen import good_sample_wav

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    python = ensure_venv(Path(args.venv))
    out = JsonLines(args.out)
    with ServerProcess(pacing="realtime", stamp_deltas=False) as srv:
        out.write(environment(loop="asyncio", server=srv.options, community=COMMUNITY))
        async with Engine(base_url=srv.base_url, api_key=srv.api_key) as engine:
            voice = await engine.voices.create(good_sample_wav(), preferred_name="bench")
            assert voice.target_model is not None
            ours = TtsStreamTTSService(voice=voice, engine=engine)
            async with (
                Driver(ours) as driver,
                Community(python, srv, voice.name, voice.target_model) as community,
            ):
                sides: dict[str, Callable[[list[str]], Awaitable[dict[str, Any]]]] = {
                    "tts-stream": driver.turn,
                    "pipecat-dashscope": lambda texts: community.ask(
                        {"op": "turn", "texts": texts}
                    ),
                }
                results: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
                for i in range(args.warmup + args.n):
                    order = list(sides) if i % 2 == 0 else list(sides)[::-1]
                    for name in order:
                        rec = await sides[name](TURN)
                        if i >= args.warmup:
                            results[name].append(rec)
                            out.write({"kind": "turn", "side": name, "round": i, **rec})
                bargein: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
                for i in range(args.bargein):
                    for name in sides if i % 2 == 0 else list(sides)[::-1]:
                        if name == "tts-stream":
                            rec = await driver.bargein(LONG_TURN, 0.5)
                        else:
                            rec = await community.ask(
                                {"op": "bargein", "texts": LONG_TURN, "after_s": 0.5}
                            )
                        bargein[name].append(rec)
                        out.write({"kind": "bargein", "side": name, "round": i, **rec})
            await engine.voices.delete(voice)
    summary: dict[str, Any] = {"kind": "summary", "loadavg_end": os.getloadavg()}
    for name in results:
        summary[name] = {
            "ttfb_ms": summarize(r["ttfb_ms"] for r in results[name]),
            "pipecat_ttfb_ms": summarize(r["pipecat_ttfb_ms"] for r in results[name]),
            "audio_ms": summarize(r["audio_ms"] for r in results[name]),
            "bargein_last_audio_ms": summarize(r["last_audio_ms"] for r in bargein[name]),
            "bargein_interruption_ms": summarize(r["interruption_ms"] for r in bargein[name]),
            "bargein_late_frames": sum(r["late_frames"] for r in bargein[name]),
        }
    ours_p50 = summary["tts-stream"]["ttfb_ms"]["p50"]
    theirs_p50 = summary["pipecat-dashscope"]["ttfb_ms"]["p50"]
    summary["ttfb_ratio_p50"] = theirs_p50 / ours_p50 if ours_p50 and theirs_p50 else None
    out.write(summary)
    out.close()
    return summary


def table(summary: dict[str, Any]) -> str:
    rows = [
        "| service | TTFB p50 | TTFB p95 | Pipecat TTFB p50 | audio p50 | barge-in: last audio"
        " p50 / max | barge-in: interruption out p50 / max | late frames |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("tts-stream", "pipecat-dashscope"):
        s = summary[name]
        rows.append(
            f"| {name} | {fmt_ms(s['ttfb_ms']['p50'])} | {fmt_ms(s['ttfb_ms']['p95'])} | "
            f"{fmt_ms(s['pipecat_ttfb_ms']['p50'])} | {fmt_ms(s['audio_ms']['p50'], 0)} | "
            f"{fmt_ms(s['bargein_last_audio_ms']['p50'])} / "
            f"{fmt_ms(s['bargein_last_audio_ms']['max'])} | "
            f"{fmt_ms(s['bargein_interruption_ms']['p50'])} / "
            f"{fmt_ms(s['bargein_interruption_ms']['max'])} | {s['bargein_late_frames']} |"
        )
    ratio = summary["ttfb_ratio_p50"]
    rows.append("")
    rows.append(f"TTFB ratio (pipecat-dashscope p50 / tts-stream p50): **{ratio:.0f}x**")
    rows.append(f"Load average at the end: {summary['loadavg_end']}")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=20, help="measured turns per service")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bargein", type=int, default=10, help="barge-in turns per service")
    parser.add_argument("--venv", default=str(DEFAULT_VENV), help="pipecat-dashscope's venv")
    parser.add_argument("--out", default=str(RESULTS / "frameworks.jsonl"))
    args = parser.parse_args(argv)
    summary = asyncio.run(run(args))
    text = table(summary)
    write_text(Path(args.out).with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
