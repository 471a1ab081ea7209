"""The CLI through ``main([...])``: every subcommand, against the embedded and a separate server."""

from __future__ import annotations

import asyncio
import threading
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.samplegen import good_sample_wav, stereo_wav
from tts_stream.cli import main
from tts_stream.server import LocalServer


@pytest.fixture
def threaded_server(tmp_path: Path) -> Iterator[LocalServer]:
    """A LocalServer on its own loop in a thread, since ``main()`` runs its own loop."""
    loop = asyncio.new_event_loop()
    srv = LocalServer(port=0, backend="tone", data_dir=tmp_path / "srv")
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(srv.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30)
    try:
        yield srv
    finally:
        asyncio.run_coroutine_threadsafe(srv.aclose(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def read_wav(path: Path) -> tuple[int, np.ndarray]:
    with wave.open(str(path)) as w:
        return w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), np.int16)


def test_help_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "voices" in capsys.readouterr().out
    assert main(["no-such-command"]) == 2
    assert main(["speak"]) == 2


def test_check_accepts_a_good_sample_and_lists_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.wav"
    good.write_bytes(good_sample_wav())
    assert main(["check", str(good)]) == 0
    assert "OK: ready to clone" in capsys.readouterr().out
    bad = tmp_path / "bad.mp3"  # a stereo WAV under a misleading name: judged by content
    bad.write_bytes(stereo_wav())
    assert main(["check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "REJECTED" in out and "mono" in out.lower()


def test_missing_file_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "nope.wav")]) == 2  # a usage error
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tts-stream: error:")


def test_voices_and_speak_against_a_server(
    threaded_server: LocalServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DASHSCOPE_API_KEY", threaded_server.api_key)
    url = ["--base-url", threaded_server.base_url]
    sample = tmp_path / "me.wav"
    sample.write_bytes(good_sample_wav())
    assert main(["voices", "create", str(sample), "--name", "me", *url]) == 0
    name = capsys.readouterr().out.strip()
    assert name.startswith("qwen-tts-vc-me-voice-")

    assert main(["voices", "list", *url]) == 0
    assert name in capsys.readouterr().out

    out = tmp_path / "out.wav"
    assert main(["speak", name, "Hello there. How are you?", "--wav", str(out), *url]) == 0
    assert "first audio" in capsys.readouterr().err
    rate, pcm = read_wav(out)
    assert rate == 24000 and pcm.size > rate  # tone backend: ~60 ms per character

    out8 = tmp_path / "out8.wav"
    assert main(["speak", name, "Short.", "--wav", str(out8), "--rate", "8000", *url]) == 0
    assert read_wav(out8)[0] == 8000

    assert main(["voices", "delete", name, *url]) == 0
    assert main(["voices", "delete", name, *url]) == 1  # VoiceNotFound: one line, exit 1
    assert "not found" in capsys.readouterr().err.lower()
    assert main(["voices", "delete", name, "--missing-ok", *url]) == 0


def test_speak_needs_a_sink(
    threaded_server: LocalServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DASHSCOPE_API_KEY", threaded_server.api_key)
    assert main(["speak", "v", "hi", "--base-url", threaded_server.base_url]) == 2
    assert "no sink" in capsys.readouterr().err


def test_bad_sample_is_refused_before_any_request(
    threaded_server: LocalServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DASHSCOPE_API_KEY", threaded_server.api_key)
    bad = tmp_path / "stereo.wav"
    bad.write_bytes(stereo_wav())
    before = threaded_server.stats().http_requests
    args = ["voices", "create", str(bad), "--name", "x", "--base-url", threaded_server.base_url]
    assert main(args) == 2
    assert "mono" in capsys.readouterr().err.lower()
    assert threaded_server.stats().http_requests == before


def test_embedded_default_keeps_voices_between_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No key and no base URL: each command starts the local server in-process."""
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    data = ["--data-dir", str(tmp_path / "data")]
    sample = tmp_path / "me.wav"
    sample.write_bytes(good_sample_wav())
    assert main(["voices", "create", str(sample), "--name", "emb", *data]) == 0
    name = capsys.readouterr().out.strip()
    out = tmp_path / "emb.wav"
    assert main(["speak", name, "Spoken by espeak, offline.", "--wav", str(out), *data]) == 0
    rate, pcm = read_wav(out)
    assert pcm.size > rate // 2 and np.abs(pcm).max() > 1000  # real speech, not silence


def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.wav"
    assert main(["demo", "--out", str(out), "--no-play", "--data-dir", str(tmp_path / "d")]) == 0
    text = capsys.readouterr().out
    assert "first text -> first audio" in text and "deleting the demo voice" in text
    rate, pcm = read_wav(out)
    assert rate == 24000 and pcm.size > 5 * rate
