"""The README's API example runs as written against the embedded LocalServer.

The code is the first ```python block of README.md that mentions ``LocalServer``. It runs in
a fresh interpreter, in a temporary directory holding the user's ``voice.wav`` (a generated
12 s clone sample).
"""

from __future__ import annotations

import re
import subprocess
import sys
import wave
from pathlib import Path

from tts_stream.testing.samplegen import good_sample_wav

README = Path(__file__).resolve().parent.parent / "README.md"


def example_code() -> str:
    for block in re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        if "LocalServer" in block and "asyncio.run" in block:
            return str(block)
    raise AssertionError("README.md has no runnable API example (```python with LocalServer)")


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
