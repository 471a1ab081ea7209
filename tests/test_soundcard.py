"""SoundCardSink through real PortAudio, for both backends (sounddevice and PyAudio).

* Pure helpers (device selection, rate negotiation, conversion) with plain calls.
* Missing dependencies, simulated in a fresh interpreter (a ``sys.modules`` block, a
  PortAudio library that cannot be found): the message names what to install.
* ALSA file device (feasibility §5 recipe A): every sample that reaches the device, bit-exact,
  also after resampling 24 kHz into a device forced to 48 kHz. The null slave is not
  real-time (the callback runs flat out), so these tests queue a whole utterance before the
  stream starts (``prefill_ms`` larger than the utterance) and check only the bytes.
* PulseAudio null sink (recipe B, with recipe C's ALSA tee for an exact copy of what
  PortAudio was given): pacing, underrun counting, the monitor recording bit-exact with
  250 ms of silence padding, interrupt with a fade.

Every scenario runs in a fresh process (``tests/soundcard_runner.py``): PortAudio reads the
ALSA configuration once, at initialisation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soxr

from sinks.soundcard import (
    DeviceInfo,
    SoundCardSink,
    float_to_pcm16,
    list_output_devices,
    negotiate_rate,
    select_device,
)
from tests.audio_env import (
    REPO,
    alsa_file_device_fixture,  # noqa: F401 - the fixture "alsa_file_device"
    pulse_null_sink_fixture,  # noqa: F401 - the fixture "pulse_null_sink"
    run_scenario,
)
from tts_stream.errors import UsageError
from tts_stream.testing.audio_env import AlsaFileDevice, PulseServer, find_signal, pulse_daemon

pytestmark = pytest.mark.soundcard

BACKENDS = ["sounddevice", "pyaudio"]
RATE = 24000
CHUNKS = [480, 1000, 77, 3000, 1]  # irregular writes, including a single sample


def noise(n: int, seed: int, amplitude: int = 30000) -> npt.NDArray[np.int16]:
    return np.random.default_rng(seed).integers(-amplitude, amplitude, n, dtype=np.int16)


def save(tmp_path: Path, name: str, x: npt.NDArray[np.int16]) -> str:
    path = tmp_path / f"{name}.npy"
    np.save(path, x)
    return str(path)


# -- pure helpers -------------------------------------------------------------------------


DEVICES = [
    DeviceInfo(0, "nullsink", 128, 44100.0, False),
    DeviceInfo(1, "default", 128, 44100.0, True),
    DeviceInfo(4, "USB Audio Device: hw:1,0", 2, 48000.0, False),
    DeviceInfo(5, "USB Audio Device: front", 2, 48000.0, False),
]


def test_select_device_by_index_name_substring_and_default() -> None:
    assert select_device(DEVICES, None).index == 1
    assert select_device(DEVICES, 4).name.endswith("hw:1,0")
    assert select_device(DEVICES, "DEFAULT").index == 1  # exact, case-insensitive
    assert select_device(DEVICES, "null").index == 0  # unique substring
    assert select_device(DEVICES, "front").index == 5


def test_select_device_errors_list_the_output_devices() -> None:
    with pytest.raises(UsageError, match=r"matches 'hdmi'.*1 'default' \(default\)"):
        select_device(DEVICES, "hdmi")
    with pytest.raises(UsageError, match=r"no output device with index 7; available: 0 'nullsink'"):
        select_device(DEVICES, 7)
    with pytest.raises(UsageError, match=r"ambiguous: 4 .*, 5 "):
        select_device(DEVICES, "usb audio")
    with pytest.raises(UsageError, match="no default output device"):
        select_device([d for d in DEVICES if not d.is_default], None)
    with pytest.raises(UsageError, match="no output devices"):
        select_device([], "x")


def test_negotiate_rate() -> None:
    only_48k = {48000}.__contains__
    any_rate = lambda r: True  # noqa: E731
    assert negotiate_rate(24000, supported=any_rate, default_rate=44100.0, forced=None) == 24000
    assert negotiate_rate(24000, supported=only_48k, default_rate=48000.0, forced=None) == 48000
    assert negotiate_rate(24000, supported=any_rate, default_rate=44100.0, forced=16000) == 16000


def test_float_to_pcm16_rounds_and_clips() -> None:
    x = np.array([0.0, 0.5, -1.0, 1.0, 2.0, -2.0, 1 / 65536], dtype=np.float32)
    assert float_to_pcm16(x).tolist() == [0, 16384, -32768, 32767, 32767, -32768, 0]


def test_options_are_checked_before_any_io() -> None:
    with pytest.raises(UsageError, match="unknown sound-card backend 'nonexistent'"):
        SoundCardSink(backend="nonexistent")
    with pytest.raises(UsageError, match="unknown sound-card backend"):
        list_output_devices(backend="nonexistent")
    with pytest.raises(UsageError):
        SoundCardSink(ring_ms=0)


def test_ring_wraps_around() -> None:
    from tts_stream.portaudio import Ring

    ring = Ring(8, 1)
    out = np.zeros((8, 1), np.int16)
    assert ring.put(np.arange(1, 7, dtype=np.int16).reshape(-1, 1)) == 6
    ring.copy_out(out, ring.tail, 5)
    ring.tail += 5
    assert out[:5, 0].tolist() == [1, 2, 3, 4, 5]
    # 7 frames free: the copy wraps around the end of the buffer; the 8th does not fit.
    assert ring.put(np.arange(10, 18, dtype=np.int16).reshape(-1, 1)) == 7
    assert ring.level == 8 and ring.free == 0
    ring.copy_out(out, ring.tail, 8)
    assert out[:, 0].tolist() == [6, 10, 11, 12, 13, 14, 15, 16]


# -- missing dependencies (fresh interpreter, nothing of ours replaced) --------------------


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.mark.parametrize(
    ("module", "install"),
    [
        ("sounddevice", "pip install 'tts-stream[sounddevice]'"),
        (
            "pyaudio",
            "pip install 'tts-stream[pyaudio]' (building it needs apt-get install portaudio19-dev)",
        ),
    ],
)
def test_missing_backend_package_names_the_extra(module: str, install: str) -> None:
    proc = _run_python(f"""
        import asyncio, sys
        sys.modules[{module!r}] = None  # the package is not installed
        from sinks import SoundCardSink
        from tts_stream.audio import AudioFormat
        from tts_stream.errors import MissingDependency
        async def main():
            sink = SoundCardSink(backend={module!r})
            try:
                await sink.open(AudioFormat())
            except MissingDependency as exc:
                print("MISSING", exc)
        asyncio.run(main())
    """)
    assert proc.returncode == 0, proc.stderr
    assert f"MISSING {module} is not installed: {install}" in proc.stdout


def test_missing_portaudio_library_names_the_system_package() -> None:
    # sounddevice looks PortAudio up with ctypes.util.find_library: make it find nothing.
    proc = _run_python("""
        import ctypes.util
        ctypes.util.find_library = lambda name: None
        from sinks.soundcard import list_output_devices
        from tts_stream.errors import MissingDependency
        try:
            list_output_devices(backend="sounddevice")
        except MissingDependency as exc:
            print("MISSING", exc)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "MISSING sounddevice cannot load the PortAudio library" in proc.stdout
    assert proc.stdout.strip().endswith("apt-get install libportaudio2")


# -- ALSA file device: bytes --------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_alsa_every_sample_bit_exact(
    backend: str, alsa_file_device: AlsaFileDevice, tmp_path: Path
) -> None:
    """Two utterances through a 1 s ring (the second wraps around it): all samples exact."""
    first, second = noise(int(0.7 * RATE), 1), noise(int(0.9 * RATE), 2)
    r = run_scenario(
        {"scenario": "play", "backend": backend, "ring_ms": 1000, "prefill_ms": 5000,
         "chunks": CHUNKS, "signals": [save(tmp_path, "a", first), save(tmp_path, "b", second)]},
        alsa_file_device.env,
    )
    assert r["device"] == "default" and r["device_rate"] == RATE
    played = alsa_file_device.played()
    i, j = find_signal(played, first), find_signal(played, second)
    # PortAudio pre-fills zeros at each stream start: search instead of assuming offset 0.
    assert 0 <= i and i + first.size <= j, (i, j)
    assert not played[i + first.size : j].any()  # only silence between the utterances
    assert not played[j + second.size :].any()
    st = r["stats"]
    total = first.size + second.size
    assert st["samples_written"] == st["samples_played"] == total
    assert st["dropped_samples"] == 0
    assert r["t_open"] <= st["first_sample_at"] <= r["t_closed"] + 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_alsa_resampled_into_a_48k_device(
    backend: str, alsa_file_device: AlsaFileDevice, tmp_path: Path
) -> None:
    """24 kHz into a device opened at 48 kHz, through the sink's stateful soxr resampler.

    "Exact" here: the device receives, sample for sample, soxr's HQ resampling of the whole
    utterance done in one call (float32, rounded to int16), although the sink resampled it
    chunk by chunk: the stateful stream adds no seams, nothing is lost or duplicated. Its
    fidelity to the ideal 48 kHz signal is soxr's (checked by SNR on a band-limited tone).
    """
    t = np.arange(int(1.2 * RATE)) / RATE
    tone = 12000 * np.sin(2 * np.pi * 440 * t) + 6000 * np.sin(2 * np.pi * 3000 * t)
    x = np.concatenate([noise(2400, 3), tone.astype(np.int16)])  # noise first: a clear start
    r = run_scenario(
        {"scenario": "play", "backend": backend, "device_rate": 48000, "prefill_ms": 5000,
         "chunks": CHUNKS, "signals": [save(tmp_path, "x", x)]},
        alsa_file_device.env,
    )
    assert r["device_rate"] == 48000
    ref = float_to_pcm16(soxr.resample(x.astype(np.float32) / 32768, RATE, 48000, quality="HQ"))
    played = alsa_file_device.played()
    i = find_signal(played, ref)
    assert i >= 0, "the resampled stream differs from soxr's one-shot output"
    assert not played[i + ref.size :].any()
    # Fidelity: the tone part against the ideal tone at 48 kHz (skip the filter's edges).
    t48 = np.arange(int(1.2 * 48000)) / 48000
    ideal = 12000 * np.sin(2 * np.pi * 440 * t48) + 6000 * np.sin(2 * np.pi * 3000 * t48)
    got = played[i + 4800 : i + 4800 + ideal.size].astype(np.float64)
    core = slice(2000, ideal.size - 2000)
    err = got[core] - ideal[core]
    snr = 10 * np.log10(np.mean(ideal[core] ** 2) / np.mean(err**2))
    assert snr > 60, snr
    assert r["stats"]["samples_played"] == r["stats"]["samples_written"] == x.size


@pytest.mark.parametrize("backend", BACKENDS)
def test_alsa_rate_the_device_refuses_falls_back_to_its_default(
    backend: str, alsa_file_device: AlsaFileDevice, tmp_path: Path
) -> None:
    """PortAudio refuses 768 kHz on this device: it opens at its default rate, resampled."""
    rate = 768000
    x = noise(rate // 5, 9, amplitude=8000)
    r = run_scenario(
        {"scenario": "play", "backend": backend, "rate": rate, "prefill_ms": 5000,
         "chunks": [4800, 333], "signals": [save(tmp_path, "x", x)]},
        alsa_file_device.env,
    )
    assert r["device_rate"] == 44100  # the device's default_samplerate
    ref = float_to_pcm16(soxr.resample(x.astype(np.float32) / 32768, rate, 44100, quality="HQ"))
    played = alsa_file_device.played()
    i = find_signal(played, ref[100:])  # skip the filter's ramp-in at the very start
    assert i >= 100 and np.array_equal(played[i - 100 : i + ref.size - 100], ref)
    assert r["stats"]["samples_played"] == r["stats"]["samples_written"] == x.size


@pytest.mark.parametrize("backend", BACKENDS)
def test_alsa_device_listing_and_selection(
    backend: str, alsa_file_device: AlsaFileDevice, tmp_path: Path
) -> None:
    r = run_scenario({"scenario": "devices", "backend": backend}, alsa_file_device.env)
    names = {d["name"]: d for d in r["devices"]}
    assert {"nullsink", "default"} <= set(names)
    assert names["default"]["is_default"] and not names["nullsink"]["is_default"]
    assert names["default"]["max_output_channels"] > 0

    # By name (substring): "null" picks the null device, which bypasses the file tee.
    x = noise(4800, 4)
    r = run_scenario(
        {"scenario": "play", "backend": backend, "device": "null", "prefill_ms": 5000,
         "signals": [save(tmp_path, "x", x)]},
        alsa_file_device.env,
    )
    assert r["device"] == "nullsink"
    assert r["stats"]["samples_played"] == x.size
    assert alsa_file_device.played().size == 0

    # By index.
    r = run_scenario(
        {"scenario": "play", "backend": backend, "device": names["default"]["index"],
         "prefill_ms": 5000, "signals": [save(tmp_path, "x", x)]},
        alsa_file_device.env,
    )
    assert r["device"] == "default" and find_signal(alsa_file_device.played(), x) >= 0

    r = run_scenario({"scenario": "open_error", "backend": backend, "device": "hdmi"},
                     alsa_file_device.env)
    assert r["error"]["type"] == "UsageError"
    assert "no output device matches 'hdmi'" in r["error"]["message"]
    assert "'nullsink'" in r["error"]["message"] and "'default' (default)" in r["error"]["message"]


# -- PulseAudio null sink: the daemon -------------------------------------------------------


def test_pulse_daemon_stops_and_is_gone(tmp_path: Path) -> None:
    with pulse_daemon(tmp_path) as server:
        assert server.alive() and server.sink_latency_s() <= 0.2
        pid = server.pid
    assert server.proc.poll() is not None  # the daemon itself, not a shell around it
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert server.pactl("info").returncode != 0


# -- PulseAudio null sink: pacing, underruns, interrupt -----------------------------------


def _slope(trace: list[list[float]], rate: int) -> float:
    """Playback speed over the middle half of a (time, samples played) trace, 1.0 = real time."""
    t = np.array([p[0] for p in trace])
    n = np.array([p[1] for p in trace], dtype=np.float64)
    moving = n > 0
    t, n = t[moving], n[moving]
    lo, hi = len(t) // 4, 3 * len(t) // 4
    return float(np.polyfit(t[lo:hi], n[lo:hi], 1)[0] / rate)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pulse_pacing_exact_recording_no_underruns(
    backend: str, pulse_null_sink: PulseServer, tmp_path: Path
) -> None:
    """3 s (padded with 250 ms of silence) written as fast as back-pressure allows."""
    pad = np.zeros(RATE // 4, np.int16)
    sig = noise(3 * RATE, 5, amplitude=20000)
    x = np.concatenate([pad, sig, pad])
    tee = tmp_path / "tee.raw"
    with pulse_null_sink.record(tmp_path / "monitor.raw") as monitor:
        r = run_scenario(
            {"scenario": "play", "backend": backend, "ring_ms": 500, "chunks": [2400, 960],
             "signals": [save(tmp_path, "x", x)]},
            pulse_null_sink.client_env(tee),
        )
    u = r["utterances"][0]
    seconds = x.size / RATE
    elapsed = u["drained"] - u["start"]
    # drain() returns once everything has played: it cannot be (much) faster than real time.
    assert 0.9 * seconds <= elapsed <= 1.5 * seconds + 1.0, elapsed
    assert 0.9 <= _slope(u["trace"], RATE) <= 1.1
    st = u["stats"]
    assert st["underruns"] == 0  # steady feed: the ring never ran dry after the start
    assert st["samples_played"] == st["samples_written"] == x.size
    assert u["start"] <= st["first_sample_at"] <= u["start"] + 2.0
    assert find_signal(np.fromfile(tee, "<i2"), x) >= 0  # what PortAudio got: all of it
    assert find_signal(np.fromfile(monitor, "<i2"), sig) >= 0  # what the sink played


@pytest.mark.parametrize("backend", BACKENDS)
def test_pulse_drain_plays_the_last_sample(
    backend: str, pulse_null_sink: PulseServer, tmp_path: Path
) -> None:
    """No padding after the audio: the card still plays it to the end before stopping.

    Through ALSA's pulse plugin, stopping a stream drops the last ~60 ms still buffered
    (feasibility §5); the sink's ``tail_ms`` of silence is what gets dropped instead.
    """
    sig = noise(RATE, 8, amplitude=20000)
    x = np.concatenate([np.zeros(RATE // 4, np.int16), sig])  # the monitor's start is padded
    with pulse_null_sink.record(tmp_path / "monitor.raw") as monitor:
        r = run_scenario(
            {"scenario": "play", "backend": backend, "chunks": [2400],
             "signals": [save(tmp_path, "x", x)]},
            pulse_null_sink.client_env(),
        )
    assert find_signal(np.fromfile(monitor, "<i2"), sig) >= 0
    u = r["utterances"][0]
    assert u["drained"] - u["start"] >= 0.9 * x.size / RATE


@pytest.mark.parametrize("backend", BACKENDS)
def test_pulse_starved_ring_counts_underruns(
    backend: str, pulse_null_sink: PulseServer, tmp_path: Path
) -> None:
    """A producer that stops feeding mid-stream: the sink plays silence and counts it."""
    x = noise(RATE, 6, amplitude=20000)
    tee = tmp_path / "tee.raw"
    r = run_scenario(
        {"scenario": "starve", "backend": backend, "chunks": [480],
         "signals": [save(tmp_path, "x", x)]},
        pulse_null_sink.client_env(tee),
    )
    assert r["underruns_before_gap"] == 0  # the first half was queued ahead of the card
    assert r["stats"]["underruns"] > 0
    assert r["stats"]["samples_played"] == r["stats"]["samples_written"] == x.size
    got = np.fromfile(tee, "<i2")
    half = x.size // 2
    i, j = find_signal(got, x[:half]), find_signal(got, x[half:])
    assert 0 <= i and i + half < j  # both halves intact, silence in between
    assert not got[i + half : j].any()


def _fade_reference(x: npt.NDArray[np.int16], played: int, ramp: int) -> npt.NDArray[np.int16]:
    """What the callback plays for the first ``played`` samples when the fade is ``ramp`` long."""
    out = x[:played].copy()
    # g[i] = 1 - (i + 1) / ramp in float32, as the callback computes it: the last sample is 0.
    g = (np.arange(ramp, dtype=np.float32) + 1) * np.float32(-1.0 / ramp) + np.float32(1)
    faded = out[played - ramp :].astype(np.float32) * g
    out[played - ramp :] = faded.astype(np.int16)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_pulse_interrupt_fades_drops_and_reports(
    backend: str, pulse_null_sink: PulseServer, tmp_path: Path
) -> None:
    """Barge-in while the writer is blocked on a full ring: 5 ms fade, queue dropped."""
    t = np.arange(5 * RATE) / RATE
    x = (16000 + 8000 * np.sin(2 * np.pi * 150 * t)).astype(np.int16)  # loud: a cut would click
    after = noise(RATE // 2, 7, amplitude=20000)
    tee = tmp_path / "tee.raw"
    with pulse_null_sink.record(tmp_path / "monitor.raw") as monitor:
        r = run_scenario(
            {"scenario": "interrupt", "backend": backend, "ring_ms": 500, "chunks": [2400],
             "interrupt_after_s": 0.5,
             "signals": [save(tmp_path, "x", x), save(tmp_path, "after", after)]},
            pulse_null_sink.client_env(tee),
        )
    played = r["interrupt_returned"]
    st = r["stats_after_interrupt"]
    assert 0.5 * RATE <= played < x.size
    assert played == st["samples_played"]
    assert st["samples_played"] + st["dropped_samples"] == st["samples_written"] <= x.size
    assert r["interrupt_s"] < 2.0

    got = np.fromfile(tee, "<i2")
    ramp = RATE * 5 // 1000
    expected = _fade_reference(x, played, ramp)
    i = find_signal(got, x[:4800])
    assert i >= 0
    # Exactly `played` samples came out: the signal, then the ramp, then silence.
    np.testing.assert_array_equal(got[i : i + played], expected)
    heard = np.fromfile(monitor, "<i2")
    k = find_signal(heard, expected[-RATE // 4 :])  # the card played the fade to its end
    assert k >= 0 and not heard[k + RATE // 4 : k + RATE // 4 + 1200].any()
    cut = got[i + played - ramp - 1 : i + played + 1].astype(np.int32)
    natural = int(np.abs(np.diff(x.astype(np.int32))).max())
    assert int(np.abs(np.diff(cut)).max()) <= natural + 24000 // ramp + 2  # no click
    j = find_signal(got, after)
    assert j >= i + played and not got[i + played : j].any()
    # The next utterance played in full after the interrupt.
    final: dict[str, Any] = r["stats"]
    assert final["samples_played"] == played + after.size
