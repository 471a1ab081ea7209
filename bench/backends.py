"""Speech backends of the local server: first audio, real-time factor, word error rate.

Run (regenerates bench/results/backends.{jsonl,md}; a few minutes with --wer)::

    .venv/bin/python -m bench.backends            # --n 15 --wer

* ``first audio``: the local server in its own process (``--backend``, burst pacing), a
  voice enrolled from a sample, an Engine with a warm spare; per utterance the time from
  the first ``push`` to the first sample in an ArraySink (``metrics.first_audio_ms``),
  ``--n`` utterances of one sentence. Two samples: the tests' espeak-made sample (its base
  voice is an espeak variant, which needs no transform) and the ``piper_x1.4`` speaker of
  ``tts_stream/testing/speakers.py`` (piper, or an espeak variant with the espeak backend,
  both moved by the likeness transform).
* ``RTF``: in this process, the backend's ``stream()`` over a 4-sentence paragraph: wall
  time / audio duration (``--repeat`` runs, median), without and with the speaker features.
* ``transform``: CPU time (``process_time``) of the likeness transform alone per second
  of audio on that paragraph at the backend's own rate: Change gender, and the tilt
  correction, median of ``--repeat``.
* ``WER`` (``--wer``): pocketsphinx 5 (its en-US model ships inside the wheel) transcribes
  each backend's paragraph at 16 kHz; word error rate against the text (lower-cased, no
  punctuation). A rough intelligibility check: pocketsphinx is a small, old recogniser, so
  compare backends with each other, not with published WERs.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: make `bench` importable
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import functools
import os
import re
import statistics
import time
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from bench.common import ServerProcess, environment, save_results, summarize
from sinks import ArraySink
from tts_stream import Engine
from tts_stream.server.likeness import (
    ENVELOPE_HZ,
    Likeness,
    SpeakerFeatures,
    equalize,
    sample_features,
)
from tts_stream.server.synth import ESPEAK_SAMPLE_RATE, VoiceProfile, make_synthesizer, synthesize
from tts_stream.testing.samplegen import good_sample_wav, wav_bytes
from tts_stream.testing.speakers import RATE as SPEAKER_RATE
from tts_stream.testing.speakers import sample as speaker_sample

RESULTS = Path(__file__).resolve().parent / "results"
SENTENCE = "Hello, this is the local server speaking with a cloned voice."
PARAGRAPH = (
    "The morning was bright and calm, and the boats left the harbour early. By noon a cool "
    "wind came from the west and the clouds grew dark. Everyone hurried home before the "
    "first heavy drops of rain began to fall. In the evening the sky cleared again."
)
BACKENDS = ("piper", "espeak", "tone")


def samples() -> dict[str, bytes]:
    """The enrollment samples of the first-audio runs (module docstring)."""
    return {"espeak-made sample": good_sample_wav(),
            "piper_x1.4 sample": wav_bytes(speaker_sample("piper_x1.4"), SPEAKER_RATE)}  # fmt: skip


async def first_audio(backend: str, n: int, sample: bytes) -> list[float]:
    out: list[float] = []
    with ServerProcess(backend=backend, stamp_deltas=False, ready_timeout=180.0) as srv:
        async with Engine(base_url=srv.base_url, api_key=srv.api_key) as engine:
            path = RESULTS / "backends-sample.wav"
            path.write_bytes(sample)
            try:
                voice = await engine.voices.create(path, preferred_name="bench")
            finally:
                path.unlink()
            await engine.prewarm(voice, 1)
            for i in range(n + 2):
                sink = ArraySink(max_blocks=4096)
                m = await engine.say(voice, SENTENCE, sinks=[sink])
                await sink.read_all()
                if i >= 2 and m.first_audio_ms is not None:  # two warm-up utterances
                    out.append(m.first_audio_ms)
    return out


async def synth(backend: str, profile: VoiceProfile) -> tuple[float, np.ndarray[Any, Any]]:
    s = make_synthesizer(backend)
    await s.warm_up()
    t0 = time.perf_counter()
    stream = s.stream(PARAGRAPH, sample_rate=24000, language="English", profile=profile)
    async with aclosing(stream):  # type: ignore[type-var]
        pcm = np.concatenate([c async for c in stream])
    return time.perf_counter() - t0, pcm


def wer(reference: str, hypothesis: str) -> float:
    ref = re.sub(r"[^a-z' ]", " ", reference.lower()).split()
    hyp = re.sub(r"[^a-z' ]", " ", hypothesis.lower()).split()
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[len(hyp)] / len(ref)


def transcribe(pcm: np.ndarray[Any, Any], rate: int) -> str:
    from pocketsphinx import Decoder

    audio = soxr.resample(pcm.astype(np.float32), rate, 16000)
    decoder = Decoder(samprate=16000, loglevel="FATAL")
    decoder.start_utt()
    decoder.process_raw(np.clip(audio, -32768, 32767).astype(np.int16).tobytes(),
                        full_utt=True)  # fmt: skip
    decoder.end_utt()
    hyp = decoder.hyp()
    return hyp.hypstr if hyp else ""


def transform_cost(backend: str, repeat: int) -> dict[str, Any]:
    """CPU ms per second of audio of Change gender and of the tilt correction (docstring)."""
    if backend == "piper":
        from tts_stream.server.piper import PIPER_SAMPLE_RATE, synthesize_piper

        pcm, rate = synthesize_piper(PARAGRAPH), PIPER_SAMPLE_RATE
    else:
        pcm, rate = synthesize(PARAGRAPH), ESPEAK_SAMPLE_RATE
    octaves = np.log2(ENVELOPE_HZ)
    tilt = tuple(float(v) for v in 2.0 * (octaves - octaves.mean()))
    parts: dict[str, Callable[[], object]] = {
        "change_gender_ms_per_s": functools.partial(Likeness(1.2, 150.0, 1.3).apply, pcm, rate),
        "tilt_ms_per_s": functools.partial(equalize, pcm, rate, tilt),
    }
    row: dict[str, Any] = {"kind": "transform", "backend": backend, "audio_s": pcm.size / rate}
    for name, run_once in parts.items():
        cpu = []
        for _ in range(repeat):
            t0 = time.process_time()
            run_once()
            cpu.append(time.process_time() - t0)
        row[name] = statistics.median(cpu) * 1000 / row["audio_s"]
    return row


async def backend_rows(backend: str, args: argparse.Namespace, speaker: VoiceProfile
                       ) -> list[dict[str, Any]]:  # fmt: skip
    """First audio per sample, then RTF (and WER) per voice, of one backend."""
    rows: list[dict[str, Any]] = []
    picked = samples() if backend != "tone" else {"espeak-made sample": good_sample_wav()}
    for label, data in picked.items():
        fa = summarize(await first_audio(backend, args.n, data))
        rows.append({"kind": "first_audio", "backend": backend, "voice": label,
                     "first_audio_ms": fa})  # fmt: skip
    first = rows[0]["first_audio_ms"]  # the espeak-made sample's, on the "speaker" row too
    for label, profile in (("default voice", VoiceProfile()), ("speaker", speaker)):
        walls, pcm = [], np.zeros(0, np.int16)
        for _ in range(args.repeat):
            wall, pcm = await synth(backend, profile)
            walls.append(wall)
        audio_s = pcm.size / 24000
        row: dict[str, Any] = {
            "kind": "backend", "backend": backend, "voice": label, "audio_s": audio_s,
            "rtf": statistics.median(walls) / audio_s,
            "first_audio_ms": first if label == "speaker" else None,
        }  # fmt: skip
        if args.wer and backend != "tone":
            text = transcribe(pcm, 24000)
            row["wer"], row["transcript"] = wer(PARAGRAPH, text), text
        rows.append(row)
    if backend != "tone":
        rows.append(transform_cost(backend, args.repeat))
    return rows


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    features_json = sample_features(good_sample_wav())
    assert features_json is not None
    features = SpeakerFeatures.from_json(features_json)
    speaker = VoiceProfile(features=features, pitch_hz=features.f0_median_hz)
    rows: list[dict[str, Any]] = []
    for backend in args.backends.split(","):
        rows += await backend_rows(backend, args, speaker)
    return rows


def table(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    out = [
        f"Backends ({env['time_utc']}, commit {str(env['git_commit'])[:7]}, load "
        f"{', '.join(f'{x:.2f}' for x in env['loadavg'])})",
        "",
        "| backend | enrolled from | first audio p50 / p95 ms |",
        "|---|---|---:|",
    ]
    for r in (r for r in rows if r["kind"] == "first_audio"):
        fa = r["first_audio_ms"]
        out.append(f"| {r['backend']} | {r['voice']} | {fa['p50']:.1f} / {fa['p95']:.1f} |")
    out += ["", "| backend | voice | RTF | WER |", "|---|---|---:|---:|"]
    for r in (r for r in rows if r["kind"] == "backend"):
        w = f"{r['wer']:.2f}" if "wer" in r else "–"
        out.append(f"| {r['backend']} | {r['voice']} | {r['rtf']:.3f} | {w} |")
    out += ["", "| backend | Change gender CPU ms/s | tilt correction CPU ms/s |",
            "|---|---:|---:|"]  # fmt: skip
    for r in (r for r in rows if r["kind"] == "transform"):
        out.append(f"| {r['backend']} | {r['change_gender_ms_per_s']:.1f} | "
                   f"{r['tilt_ms_per_s']:.1f} |")  # fmt: skip
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=15)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--wer", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "backends")
    args = ap.parse_args()
    env = environment(loop="asyncio", uptime=os.getloadavg())
    rows = asyncio.run(run(args))
    save_results(args.out, env, rows, table(rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
