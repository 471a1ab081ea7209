"""The README's voice-bot framework examples run as written ("Voice-bot frameworks").

Each ```python block runs in a fresh interpreter in a temporary directory holding the
user's ``voice.wav`` (a generated 12 s clone sample), against the embedded LocalServer
(espeak). The Pipecat example plays to the default sound card: here a private PulseAudio
null sink (``tts_stream.testing.audio_env``), whose monitor is recorded to prove the bot was heard.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np

from tests.audio_env import pulse_null_sink_fixture  # noqa: F401 - fixture
from tts_stream.testing.audio_env import PulseServer
from tts_stream.testing.samplegen import good_sample_wav

README = Path(__file__).resolve().parent.parent / "README.md"


def example(marker: str) -> str:
    for block in re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        if marker in block and "asyncio.run" in block:
            return str(block)
    raise AssertionError(f"README.md has no runnable example importing {marker}")


def run(code: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    (cwd / "voice.wav").write_bytes(good_sample_wav())
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_pipecat_example_speaks_into_a_wav_file_and_the_sound_card(
    pulse_null_sink: PulseServer, tmp_path: Path
) -> None:
    env = {**os.environ, **pulse_null_sink.client_env()}
    # -W error: a warning from a framework the README example imports would fail here too;
    # Pipecat's own import-time deprecations are filtered by exact message, as in pytest.
    code = (
        "import warnings\n"
        "warnings.filterwarnings('ignore', message=\"'audioop' is deprecated\","
        " category=DeprecationWarning)\n"
        "warnings.filterwarnings('ignore', message='`AudioContextTTSService` is deprecated',"
        " category=DeprecationWarning)\n" + example("integrations.pipecat import")
    )
    with pulse_null_sink.record(tmp_path / "monitor.raw") as monitor:
        out = run(code, tmp_path, env)
    played = re.search(r"played (\d+\.\d) s on the sound card", out)
    assert played and float(played.group(1)) > 0.5, out
    with wave.open(str(tmp_path / "bot.wav"), "rb") as w:
        assert w.getframerate() == 24000
        wav_s = w.getnframes() / 24000
    assert abs(wav_s - float(played.group(1))) < 0.15  # the same audio to both sinks
    heard = np.fromfile(monitor, "<i2")
    assert np.abs(heard.astype(np.int32)).max() > 1000  # speech reached the sound card


def test_livekit_example_drives_tts_stream(tmp_path: Path) -> None:
    out = run(example("integrations.livekit import"), tmp_path)
    assert re.search(r"ttfb \d+ ms", out), out
    seconds = re.search(r"(\d+\.\d) s of audio from AgentSession's TTS", out)
    assert seconds and float(seconds.group(1)) > 0.5, out
