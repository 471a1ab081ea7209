"""Operations from the command line, in fresh processes: ``serve --metrics-port`` scraped over
loopback, and SIGTERM to ``speak`` (drain the speech in flight, then close, exit 0)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tts_stream.testing.samplegen import good_sample_wav

KEY = "sk-test-operations"
TIMEOUT = 60.0
TEXT = "First sentence of the drain test. Second sentence, a bit longer than that. Third one."


def read_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # bounded: the process is killed by the fixture
    assert line, "the server printed nothing"
    return line


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    """``tts-stream serve --port 0 --metrics-port 0 --pacing realtime`` in its own process."""
    cmd = [sys.executable, "-m", "tts_stream", "serve", "--port", "0", "--metrics-port", "0",
           "--backend", "tone", "--pacing", "realtime", "--api-key", KEY,
           "--data-dir", str(tmp_path / "srv")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base_url = read_line(proc)
        metrics = read_line(proc)
        while not metrics.startswith("metrics at "):  # other status lines come first
            metrics = read_line(proc)
        assert metrics.startswith("metrics at http://127.0.0.1:")
        yield proc, base_url, metrics.removeprefix("metrics at ")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            proc.communicate(timeout=TIMEOUT)  # closes the pipes


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
        text = resp.read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def cli(*args: str, base_url: str) -> subprocess.Popen[str]:
    env = os.environ | {"DASHSCOPE_API_KEY": KEY}
    cmd = [sys.executable, "-m", "tts_stream", *args, "--base-url", base_url]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def wav_frames(path: Path) -> int:
    with wave.open(str(path), "rb") as w:
        return w.getnframes()


def test_serve_metrics_port_and_sigterm_drains_speak(
    served: tuple[subprocess.Popen[str], str, str], tmp_path: Path
) -> None:
    proc, base_url, metrics_url = served
    before = scrape(metrics_url)
    assert before["tts_stream_server_sessions_active"] == 0
    sample = tmp_path / "me.wav"
    sample.write_bytes(good_sample_wav())
    created = cli("voices", "create", str(sample), "--name", "ops", base_url=base_url)
    out, err = created.communicate(timeout=TIMEOUT)
    assert created.returncode == 0, err
    voice = out.strip()

    clean = cli("speak", voice, TEXT, "--wav", str(tmp_path / "clean.wav"), base_url=base_url)
    _, err = clean.communicate(timeout=TIMEOUT)
    assert clean.returncode == 0, err
    assert scrape(metrics_url)["tts_stream_server_sessions_opened_total"] >= 1

    # SIGTERM while the audio is still arriving (realtime pacing): the speech drains.
    wav = tmp_path / "term.wav"
    speaking = cli("speak", voice, TEXT, "--wav", str(wav), base_url=base_url)
    deadline = time.monotonic() + TIMEOUT
    while not (wav.exists() and wav.stat().st_size > 44 + 4800):
        assert time.monotonic() < deadline and speaking.poll() is None
        time.sleep(0.01)
    during = scrape(metrics_url)
    assert during["tts_stream_server_sessions_active"] >= 1  # (plus the pool's spare)
    speaking.send_signal(signal.SIGTERM)
    _, err = speaking.communicate(timeout=TIMEOUT)
    assert speaking.returncode == 0, err
    assert "SIGTERM" in err
    assert wav_frames(wav) == wav_frames(tmp_path / "clean.wav")  # nothing cut

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=TIMEOUT) == 0
