"""Likeness: does each cloned voice sound like its own speaker, and what does the transform add?

Run (regenerates bench/results/likeness.{jsonl,md}; about 2 minutes)::

    .venv/bin/python -m bench.likeness

For each speaker set of ``testing.speakers`` and backend, a LocalServer (in this process)
enrolls every speaker's 12 s sample, speaks a text none of them read with each voice through
the engine, and the torch-free resemblyzer encoder (``testing.voice_encoder``) compares each
output with every sample. Columns: ``plain`` = cos(untransformed backend, own sample),
``own`` = cos(this voice's output, own sample), ``gain`` = own − plain, ``nearest other`` =
the highest cos(this voice's output, another speaker's sample). Goal (issue 14): ``own`` >
every other for every speaker, and ``gain`` ≥ 0.1.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: make `bench` importable
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

from bench.common import environment, save_results
from tts_stream.server import LocalServer
from tts_stream.testing.speakers import ESPEAK_SPEAKERS, PIPER_SPEAKERS, Result, measure

RESULTS = Path(__file__).resolve().parent / "results"
SETS: dict[str, tuple[str, list[str]]] = {
    "espeak family, espeak backend": ("espeak", list(ESPEAK_SPEAKERS)),
    "piper family, piper backend": ("piper", list(PIPER_SPEAKERS)),
    "all 12, piper backend": ("piper", [*PIPER_SPEAKERS, *ESPEAK_SPEAKERS]),
}


async def run() -> list[tuple[str, str, Result]]:
    rows = []
    for label, (backend, speakers) in SETS.items():
        async with LocalServer(backend=backend) as srv:
            for r in await measure(srv, backend, speakers):
                rows.append((label, backend, r))
    return rows


def table(rows: list[tuple[str, str, Result]], env: dict[str, Any]) -> str:
    out = [
        f"Likeness ({env['time_utc']}, commit {str(env['git_commit'])[:7]}, load "
        f"{', '.join(f'{x:.2f}' for x in env['loadavg'])}; cosine similarity of resemblyzer "
        "embeddings)",
        "",
    ]
    for label in SETS:
        part = [r for lab, _, r in rows if lab == label]
        met = sum(r.closest_is_own for r in part)
        gains = sum(r.gain >= 0.1 for r in part)
        out += [f"**{label}**: closest to own sample {met}/{len(part)}, gain ≥ 0.1 "
                f"{gains}/{len(part)}", "",
                "| speaker | plain | own | gain | nearest other | closest is own |",
                "|---|---:|---:|---:|---|---|"]  # fmt: skip
        for r in part:
            out.append(f"| {r.speaker} | {r.own_untransformed:.3f} | {r.own:.3f} | "
                       f"{r.gain:+.3f} | {r.best_other_name} {r.best_other:.3f} | "
                       f"{'yes' if r.closest_is_own else 'no'} |")  # fmt: skip
        out += ["", *_matrix(part), ""]
    return "\n".join(out)


def _matrix(part: list[Result]) -> list[str]:
    """cos(each voice's output, each sample): rows voices, columns samples (short names)."""
    short = [r.speaker.replace("espeak_", "e_").replace("piper_", "p_") for r in part]
    out = ["| voice \\ sample | " + " | ".join(short) + " |",
           "|---|" + "---:|" * len(part)]  # fmt: skip
    for name, r in zip(short, part, strict=True):
        cells = [f"**{v:.3f}**" if j == i else f"{v:.3f}"
                 for i in [short.index(name)] for j, v in enumerate(r.row)]  # fmt: skip
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "likeness")
    args = ap.parse_args()
    env = environment(loop="asyncio", uptime=os.getloadavg())
    rows = asyncio.run(run())
    records = [{"kind": "likeness", "set": label, "backend": backend, "speaker": r.speaker,
                "plain": r.own_untransformed, "own": r.own, "gain": r.gain,
                "best_other": r.best_other, "best_other_name": r.best_other_name,
                "closest_is_own": r.closest_is_own} for label, backend, r in rows]  # fmt: skip
    save_results(args.out, env, records, table(rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
