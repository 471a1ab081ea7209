"""``tts-stream enroll FILE`` and ``--strict`` through ``main([...])`` on the embedded server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tts_stream.cli import main
from tts_stream.testing import samplegen as g


@pytest.fixture(autouse=True)
def _no_cloud(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)


def test_enroll_a_file_prints_the_voice_and_a_line_to_try_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = tmp_path / "me.wav"
    sample.write_bytes(g.good_sample_wav())
    data = tmp_path / "data"
    assert main(["enroll", str(sample), "--name", "me", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    voice = next(ln.split()[1] for ln in out.splitlines() if ln.startswith("voice: "))
    assert voice.startswith("qwen-tts-vc-me-voice-"), out
    assert f'tts-stream speak {voice} "Hello! This is my cloned voice." --play --data-dir {data}' \
        in out, out
    assert main(["voices", "list", "--data-dir", str(data)]) == 0  # it really exists
    assert voice in capsys.readouterr().out


def test_enroll_refuses_a_sample_that_breaks_a_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = tmp_path / "paused.wav"
    sample.write_bytes(g.wav_bytes(g.paused_speech(3.0), 24000))
    assert main(["enroll", str(sample), "--name", "me", "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "REJECTED" in out and "voice:" not in out, out


def test_strict_turns_quality_warnings_into_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    noisy = tmp_path / "noisy.wav"
    noisy.write_bytes(g.wav_bytes(g.noisy_speech(15), 24000))
    assert main(["check", str(noisy)]) == 0  # a warning alone does not block
    out = capsys.readouterr().out
    assert "warning: signal-to-noise ratio is 16 dB" in out and "quality: SNR 16 dB" in out, out
    assert main(["check", str(noisy), "--strict"]) == 1
    assert "STRICT: 1 warning(s)" in capsys.readouterr().out
    assert main(["enroll", str(noisy), "--name", "n", "--strict", "--data-dir",
                 str(tmp_path)]) == 1  # fmt: skip
    assert main(["voices", "create", str(noisy), "--name", "n", "--strict", "--data-dir",
                 str(tmp_path)]) == 2  # fmt: skip
    assert "--strict: the sample has quality warnings" in capsys.readouterr().err
