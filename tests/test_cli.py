"""The CLI through ``main([...])``: every subcommand, against the embedded and a separate server."""

from __future__ import annotations

import asyncio
import threading
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tts_stream.cli import main
from tts_stream.server import LocalServer
from tts_stream.testing.samplegen import good_sample_wav, stereo_wav


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


def test_speak_to_sound_card_rtp_and_wav_at_once(tmp_path: Path) -> None:
    """`speak --play --rtp --wav` in a fresh process (PortAudio reads the ALSA config at
    start-up): the embedded server speaks; the WAV file, an ALSA file device and a plain UDP
    socket all receive the same utterance."""
    import os
    import socket
    import subprocess
    import sys

    from sinks.rtp import RtpPacket
    from tests.rtp_receiver import decode_payloads
    from tts_stream.testing.audio_env import alsa_file_config

    device = alsa_file_config(tmp_path)
    data = tmp_path / "data"
    sample = tmp_path / "me.wav"
    sample.write_bytes(good_sample_wav())
    env = {k: v for k, v in os.environ.items() if k != "DASHSCOPE_API_KEY"} | device.env

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "tts_stream", *args, "--data-dir", str(data)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    created = cli("voices", "create", str(sample), "--name", "all3")
    assert created.returncode == 0, created.stderr
    name = created.stdout.strip()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        rx.bind(("127.0.0.1", 0))
        port = rx.getsockname()[1]
        out, sdp = tmp_path / "out.wav", tmp_path / "out.sdp"
        sinks = ["--play", "--wav", str(out), "--rtp", f"127.0.0.1:{port}", "--sdp", str(sdp)]
        spoken = cli("speak", name, "One voice, three sinks.", *sinks)
        assert spoken.returncode == 0, spoken.stderr
        rx.setblocking(False)
        packets = []
        while True:
            try:
                packets.append(RtpPacket.parse(rx.recv(65536)))
            except BlockingIOError:
                break
    rate, wav = read_wav(out)
    assert rate == 24000 and np.abs(wav).max() > 1000  # real espeak speech
    played = device.played()
    # The ALSA null device runs ~700x faster than real time, so the card underruns between
    # deltas and plays silence there: compare the non-zero samples, in order, exactly.
    assert np.array_equal(played[played != 0], wav[wav != 0])
    assert "m=audio" in sdp.read_text() and f" {port} " in sdp.read_text()
    phone = decode_payloads(packets, "pcmu")  # 8 kHz: a third of the samples
    assert abs(phone.size - wav.size / 3) <= 160 * 3


def test_serve_on_a_busy_port_says_how_to_fix_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ["serve", "--port", str(port), "--backend", "tone", "--data-dir", str(tmp_path)]
        assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--port 0" in err[0] and str(port) in err[0]


def test_asking_for_the_cloud_without_a_key_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    assert main(["voices", "list", "--region", "cn"]) == 2
    err = capsys.readouterr().err
    assert "DASHSCOPE_API_KEY is not set" in err and "sk-" not in err
