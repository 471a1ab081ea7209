"""``tts-stream demo``: the newcomer's first five minutes, on the embedded local server.

It makes a short speech sample (espeak, so no recording is needed), checks it the way a paid
create would be checked, clones it on a local DashScope-compatible server started in this
process, speaks a paragraph through the cloned voice into a WAV file and to the sound card
when one is present, and prints a small table of latency metrics. This module is a CLI
boundary: it prints progress for a human. Private: only ``tts_stream.cli`` imports it, on
``tts-stream demo``, so ``import tts_stream`` never loads it (it composes the engine, the
local server and the sinks, like the CLI).
"""

from __future__ import annotations

import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import MissingDependency, TtsStreamError, UsageError
from .messages import VC_MODELS

if TYPE_CHECKING:
    from .engine import Engine
    from .enrollment import Voice
    from .metrics import UtteranceMetrics
    from .server import LocalServer

__all__ = ["PARAGRAPH", "SAMPLE_TEXT", "make_sample", "run_demo"]

SAMPLE_TEXT = (
    "Hello, I am recording this short sample so that the system can learn my voice. "
    "Today I will read a few sentences about the weather and the sea. "
    "The morning was bright and calm, and the boats left the harbour early. "
    "By noon a cool wind came from the west, and the clouds grew dark."
)
PARAGRAPH = (
    "Welcome to tts stream. This sentence is spoken with the voice you just cloned. "
    "Text goes in over a WebSocket, and audio comes back while the rest is still being "
    "written. Every utterance records how long the first audio took to arrive."
)


def _say(msg: str) -> None:
    print(msg, flush=True)  # noqa: T201 - the demo talks to a person


@contextmanager
def _step(label: str) -> Iterator[None]:
    print(f"  {label} ...", end="", flush=True)  # noqa: T201
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:
        print(" failed", flush=True)  # noqa: T201
        raise
    print(f" done ({(time.perf_counter() - t0) * 1000:.0f} ms)", flush=True)  # noqa: T201


def make_sample(path: Path, *, sample_rate: int = 24000) -> Path:
    """Write a ~15 s mono 16-bit WAV of espeak speech (a higher-pitched "speaker")."""
    try:
        from .server.synth import synthesize
    except ImportError as exc:  # pragma: no cover - the server extra is missing
        raise MissingDependency(
            "the demo needs the local server: pip install 'tts-stream[server]'"
        ) from exc
    pcm = synthesize(SAMPLE_TEXT, sample_rate=sample_rate, voice="en-us+f2", pitch=60)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return path


def _sound_card_sink() -> Any | None:
    """A SoundCardSink when PortAudio and an output device are present, else ``None``."""
    try:
        from sinks.soundcard import SoundCardSink, list_output_devices

        if not list_output_devices():
            _say("  (no sound card found: writing the WAV file only)")
            return None
        return SoundCardSink()
    except MissingDependency as exc:
        _say(f"  (sound card unavailable: {exc}; writing the WAV file only)")
        return None


async def run_demo(*, out: Path, play: bool, data_dir: Path) -> int:
    """Run the whole demo; returns the process exit code."""
    from .engine import Engine

    _say("tts-stream demo: clone a voice and speak with it, all on this machine")
    sample = _checked_sample(data_dir / "demo-sample.wav")
    server, backend = await _start_server(data_dir)
    try:
        _say(f"  local DashScope-compatible server at {server.base_url}, speaking with "
             f"the {backend} backend")
        async with Engine(api_key=server.api_key, base_url=server.base_url) as engine:
            with _step("3/5 cloning the voice (qwen-voice-enrollment create)"):
                voice = await engine.voices.create(
                    sample, preferred_name="demo", target_model=VC_MODELS[0]
                )
            _say(f"      voice {voice.name}")
            try:
                m = await _speak(engine, voice, out, play)
            finally:
                with _step("5/5 deleting the demo voice"):
                    await engine.voices.delete(voice, missing_ok=True)
    finally:
        await server.aclose()
    _print_latency(m)
    _say(f"\nwrote {out}. Next: `tts-stream serve`, then see README.md for the API.")
    return 0


def _checked_sample(sample: Path) -> Path:
    from .samples import inspect_sample

    with _step(f"1/5 making a 15 s speech sample ({sample})"):
        make_sample(sample)
    with _step("2/5 checking the sample (the same rules as the cloud service)"):
        report = inspect_sample(sample)
    if not report.ok:
        problems = "; ".join(map(str, report.problems))
        raise UsageError(f"the demo sample failed its own checks: {problems}")
    _say(f"      {report.duration_s:.1f} s, {report.sample_rate} Hz, longest speech "
         f"{report.longest_speech_s:.1f} s, pitch {report.pitch_hz or 0:.0f} Hz")  # fmt: skip
    return sample


async def _start_server(data_dir: Path) -> tuple[LocalServer, str]:
    from .server import LocalServer
    from .server.synth import default_backend

    try:
        backend = default_backend()
        server = LocalServer(data_dir=data_dir, backend=backend)
        await server.start()
    except OSError as exc:
        raise TtsStreamError(f"could not start the local server: {exc}") from exc
    return server, backend


async def _speak(engine: Engine, voice: Voice, out: Path, play: bool) -> UtteranceMetrics:
    from sinks import WavSink

    sinks: list[Any] = [WavSink(out)]
    card = _sound_card_sink() if play else None
    if card is not None:
        sinks.append(card)
    with _step(f"4/5 speaking a paragraph into {out}"
               + (" and the sound card" if card is not None else "")):  # fmt: skip
        async with engine.speak(voice, sinks=sinks) as speech:
            for word in PARAGRAPH.split(" "):  # as an LLM would stream tokens
                await speech.push(word + " ")
    return speech.metrics


def _print_latency(m: UtteranceMetrics) -> None:
    rows = [
        ("connection acquire", m.acquire_ms),
        ("first text -> response.created", m.response_created_ms),
        ("first text -> first audio (TTFB)", m.first_audio_ms),
        ("first text -> first voiced sample", m.first_voiced_ms),
        *((f"first text -> first sample in {k}", v) for k, v in m.sink_first_sample_ms.items()),
    ]
    _say("\n  latency                                   ms")
    for label, value in rows:
        _say(f"  {label:<40} {'-' if value is None else f'{value:8.1f}'}")
    _say(f"  audio {m.audio_ms / 1000:.2f} s in {m.responses} response(s), "
         f"{m.billed_characters} billed characters")  # fmt: skip
