"""The README's API example runs as written against the embedded LocalServer.

The code is taken from README.md (the first ```python block that mentions ``LocalServer``)
when the README has it, else from :data:`EXAMPLE` below (the same text, kept here so the test
exists before the README does). It runs in a fresh interpreter, in a temporary directory that
holds the user's ``voice.wav`` (a generated 12 s clone sample).
"""

from __future__ import annotations

import re
import subprocess
import sys
import wave
from pathlib import Path

from tests.samplegen import good_sample_wav

README = Path(__file__).resolve().parent.parent / "README.md"

EXAMPLE = """\
import asyncio

from sinks import WavSink
from tts_stream import Engine
from tts_stream.server import LocalServer


async def main() -> None:
    async with LocalServer(backend="espeak") as srv:  # or Engine() with DASHSCOPE_API_KEY
        async with Engine(base_url=srv.base_url, api_key=srv.api_key) as engine:
            assert engine.check_sample("voice.wav").ok  # local checks, no network
            voice = await engine.voices.create("voice.wav", preferred_name="demo")
            async with engine.speak(voice, sinks=[WavSink("out.wav")]) as speech:
                for token in ["Hello", " from", " a", " cloned", " voice", "."]:
                    await speech.push(token)  # waits while the pipeline is full
            print(f"first audio after {speech.metrics.first_audio_ms:.0f} ms -> out.wav")
            await engine.voices.delete(voice)


asyncio.run(main())
"""


def example_code() -> str:
    if README.exists():
        for block in re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
            if "LocalServer" in block and "asyncio.run" in block:
                return str(block)
    return EXAMPLE


def test_readme_example_runs_as_written(tmp_path: Path) -> None:
    (tmp_path / "voice.wav").write_bytes(good_sample_wav())
    proc = subprocess.run(
        [sys.executable, "-c", example_code()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"first audio after \d+ ms", proc.stdout), proc.stdout
    with wave.open(str(tmp_path / "out.wav"), "rb") as w:
        assert w.getframerate() == 24000 and w.getnframes() > 24000 // 2
