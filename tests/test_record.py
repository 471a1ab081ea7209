"""``tts-stream record`` through a real PortAudio input: a PulseAudio null sink's monitor.

The generator's WAVs are played into the null sink with ``paplay`` while the CLI records its
monitor in a fresh process (PortAudio reads the ALSA config at start-up); the recorded file
is aligned with what was played and correlated. The live screen is read from a real
terminal (tmux). Bad input: no input device, the sound server killed mid-recording, a full
disk (a 64 kB tmpfs), Ctrl-C: one clear line each, nothing under the target name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.audio_env import REPO, pulse_null_sink_fixture
from tts_stream.testing import samplegen as g
from tts_stream.testing.audio_env import PulseServer, pulse_daemon

__all__ = ["pulse_null_sink_fixture"]

pytestmark = pytest.mark.soundcard
CLI = [sys.executable, "-m", "tts_stream"]
RATE = 24000


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), np.int16)


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, *args], cwd=REPO, env={**os.environ, **env}, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def wait_recording(proc: subprocess.Popen[str], timeout: float = 20.0) -> None:
    """Read progress lines until the lead-in is over (the noise floor is measured)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"recorder ended early: {proc.communicate(timeout=10)}")
        if line.startswith("recording") and "level" in line:
            return
    raise AssertionError("the recorder printed no progress line")


def align(recorded: np.ndarray, played: np.ndarray) -> tuple[int, float]:
    """(offset of ``recorded`` in ``played``, correlation over the overlap)."""
    a, b = played.astype(np.float64), recorded.astype(np.float64)
    n = 1 << int(np.ceil(np.log2(a.size + b.size)))
    xc = np.fft.irfft(np.fft.rfft(a, n) * np.conj(np.fft.rfft(b, n)), n)
    lag = int(np.argmax(xc[: a.size]))
    seg = a[lag : lag + b.size]
    m = min(seg.size, b.size)
    return lag, float(np.corrcoef(seg[:m], b[:m])[0, 1])


def no_leftovers(directory: Path, name: str) -> None:
    assert not (directory / name).exists()
    assert not [p.name for p in directory.iterdir() if p.name.startswith(f".{name}.")]


CASES: dict[str, tuple[Callable[[], g.PCM16], int, set[str]]] = {
    "clean": (lambda: g.speech(12.0), 0, set()),
    "snr15": (lambda: g.noisy_speech(15), 0, {"signal-to-noise"}),
    "clipped": (lambda: g.clipped_speech(4.0), 0, {"clipped at full scale"}),
    "pause3s": (lambda: g.paused_speech(3.0), 1, set()),
    "reverb0.9s": (lambda: g.reverberant_speech(0.9), 0, {"the room echoes"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_record_what_is_played(pulse_null_sink: PulseServer, tmp_path: Path, case: str) -> None:
    build, rc, warned = CASES[case]
    played = build()
    src = tmp_path / "played.wav"
    src.write_bytes(g.wav_bytes(played, RATE))
    out = tmp_path / "out.wav"
    proc = start(["record", str(out), "--lead-in", "0.5"], pulse_null_sink.source_env())
    try:
        wait_recording(proc)
        pulse_null_sink.play(src)
        stdout, stderr = proc.communicate("\n", timeout=30)  # Enter stops it
    finally:
        proc.kill()
    assert proc.returncode == rc, (stdout, stderr)
    recorded = read_wav(out)
    lag, corr = align(recorded, played)
    assert corr > 0.99, f"{case}: correlation {corr:.4f} at offset {lag}"
    assert recorded.size >= played.size * 0.8, (recorded.size, played.size)
    assert f"wrote {out}" in stdout and ("OK: ready" in stdout) == (rc == 0), stdout
    warnings = [ln for ln in stdout.splitlines() if "warning:" in ln]
    for text in warned:
        assert any(text in ln for ln in warnings), stdout
    if case == "pause3s":
        assert "pauses must be at most 2 s" in stdout, stdout
    if case == "clean":
        assert "warning:" not in stdout, stdout


def test_devices_input_lists_the_monitor(pulse_null_sink: PulseServer) -> None:
    env = {**os.environ, **pulse_null_sink.source_env()}
    proc = subprocess.run([*CLI, "devices", "--input"], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=30)  # fmt: skip
    assert proc.returncode == 0 and "ch in" in proc.stdout and proc.stdout.startswith("*"), proc


def test_ctrl_c_writes_nothing(pulse_null_sink: PulseServer, tmp_path: Path) -> None:
    proc = start(["record", str(tmp_path / "out.wav"), "--lead-in", "0.3"],
                 pulse_null_sink.source_env())  # fmt: skip
    try:
        wait_recording(proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert stderr.strip().splitlines() == [f"tts-stream: interrupted: nothing was written to "
                                           f"{tmp_path / 'out.wav'}"], stderr  # fmt: skip
    no_leftovers(tmp_path, "out.wav")


def test_no_input_device_is_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "asound.conf"
    # A card that does not exist: PortAudio lists no device (an empty config makes it abort).
    conf.write_text("pcm.!default { type hw card 99 }\nctl.!default { type hw card 99 }\n")
    env = {"ALSA_CONFIG_PATH": str(conf), "PULSE_SERVER": "unix:/nonexistent"}
    proc = start(["record", str(tmp_path / "out.wav")], env)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "no default input device" in lines[0], stderr
    no_leftovers(tmp_path, "out.wav")


def test_device_that_disappears_mid_recording(tmp_path: Path) -> None:
    with pulse_daemon(tmp_path / "pulse") as srv:
        proc = start(["record", str(tmp_path / "out.wav"), "--lead-in", "0.3"],
                     srv.source_env())  # fmt: skip
        try:
            wait_recording(proc)
            srv.proc.kill()  # the sound server dies: the device is gone
            srv.proc.wait(10)
            _, stderr = proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == 1, stderr
    # Debian's libportaudio prints its own ALSA failures ("Expression '...' failed in
    # 'src/hostapi/alsa/pa_linux_alsa.c'") to stderr from C; ours is the one other line.
    lines = [ln for ln in stderr.strip().splitlines() if "src/hostapi/alsa" not in ln]
    assert len(lines) == 1 and "input device 'default' stopped" in lines[0], stderr
    no_leftovers(tmp_path, "out.wav")


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 kB tmpfs: a 3 s recording (144 kB) cannot fit."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True,
                   timeout=10)  # fmt: skip
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=10)


def test_full_disk_leaves_no_file(pulse_null_sink: PulseServer, tmp_path: Path,
                                  full_disk: Path) -> None:  # fmt: skip
    src = tmp_path / "played.wav"
    src.write_bytes(g.good_sample_wav())
    proc = start(["record", str(full_disk / "out.wav"), "--lead-in", "0.3", "--seconds", "3"],
                 pulse_null_sink.source_env())  # fmt: skip
    try:
        wait_recording(proc)
        pulse_null_sink.play(src, timeout=30)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], stderr
    no_leftovers(full_disk, "out.wav")


def tmux(sock: Path, *args: str) -> str:
    return subprocess.run(["tmux", "-S", str(sock), *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout  # fmt: skip


def wait_screen(sock: Path, needle: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux(sock, "capture-pane", "-p", "-t", "rec")
        if needle in screen:
            return screen
        time.sleep(0.2)  # polling the screen, bounded by the deadline
    raise AssertionError(f"{needle!r} never appeared on the screen:\n{screen}")


def test_live_screen_in_a_real_terminal(pulse_null_sink: PulseServer, tmp_path: Path) -> None:
    src = tmp_path / "played.wav"
    src.write_bytes(g.good_sample_wav())
    out = tmp_path / "out.wav"
    sock = tmp_path / "tmux.sock"
    env = " ".join(f"{k}={v}" for k, v in pulse_null_sink.source_env().items())
    cmd = f"cd {REPO} && env {env} {sys.executable} -m tts_stream record {out}; sleep 60"
    tmux(sock, "new-session", "-d", "-s", "rec", "-x", "100", "-y", "20", cmd)
    try:
        wait_screen(sock, " dBFS (")  # the lead-in is over: the noise floor is shown
        pulse_null_sink.play(src)
        screen = wait_screen(sock, "good: press Enter")
        (tmp_path / "screen.txt").write_text(screen)
        for needle in ("Recording", "level      [", "dBFS", "speech run", "longest",
                       "[>= 3 s: ok]", "[<= 2 s: ok]", "of 10-20 s", "Read aloud",
                       "Hi, it's me."):  # fmt: skip
            assert needle in screen, screen
        tmux(sock, "send-keys", "-t", "rec", "Enter")
        done = wait_screen(sock, "OK: ready to clone")
        assert f"wrote {out}" in done, done
    finally:
        subprocess.run(["tmux", "-S", str(sock), "kill-server"], capture_output=True, timeout=10)
    assert read_wav(out).size > 10 * RATE
