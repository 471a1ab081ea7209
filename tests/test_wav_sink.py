"""WavSink: the file is a valid WAV holding every sample after each write, even on a crash."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import wave
from pathlib import Path

import numpy as np
import pytest

from sinks import WavSink
from tts_stream.audio import AudioFormat, Frame
from tts_stream.errors import ClosedError, UsageError

RATE = 24000


def read_wav(path: Path) -> tuple[wave._wave_params, np.ndarray]:
    """Parse ``path`` with the stdlib reader, checking the header sizes against the file size."""
    size = os.path.getsize(path)
    with wave.open(str(path), "rb") as w:
        params = w.getparams()
        data = np.frombuffer(w.readframes(params.nframes), "<i2")
    assert size == 44 + 2 * params.nframes * params.nchannels
    return params, data


def tone(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-32768, 32768, n, dtype=np.int16)


async def test_valid_after_every_write(tmp_path: Path) -> None:
    path = tmp_path / "out.wav"
    sink = WavSink(path)
    await sink.open(AudioFormat(RATE))
    params, data = read_wav(path)
    assert (params.nchannels, params.sampwidth, params.framerate, params.nframes) == (1, 2, RATE, 0)
    sent = []
    for i, n in enumerate([1, 480, 2400, 7, 24000]):
        chunk = tone(n, seed=i)
        sent.append(chunk)
        await sink.write(Frame(chunk))
        params, data = read_wav(path)  # readable while the sink is still open
        assert params.nframes == sum(len(c) for c in sent)
        np.testing.assert_array_equal(data, np.concatenate(sent))
    await sink.aclose()
    st = sink.stats()
    assert st.samples_written == st.samples_played == params.nframes
    assert st.dropped_samples == 0 and st.first_sample_at is not None


def test_crash_leaves_playable_file(tmp_path: Path) -> None:
    """A process killed mid-stream (no drain, no close) leaves every written sample."""
    path = tmp_path / "crash.wav"
    script = textwrap.dedent(
        f"""
        import asyncio, os
        import numpy as np
        from sinks import WavSink
        from tts_stream.audio import AudioFormat, Frame

        async def main():
            sink = WavSink({str(path)!r})
            await sink.open(AudioFormat(16000))
            for i in range(10):
                await sink.write(Frame(np.full(1600, i * 100, np.int16)))
            os._exit(3)  # no aclose, no atexit, no buffered-file flush

        asyncio.run(main())
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=Path(__file__).parents[1], timeout=30,
        capture_output=True,
    )
    assert proc.returncode == 3, proc.stderr.decode()
    params, data = read_wav(path)
    assert (params.framerate, params.nframes) == (16000, 16000)
    np.testing.assert_array_equal(data, np.repeat(np.arange(10, dtype=np.int16) * 100, 1600))


async def test_stereo_fsync_and_interrupt(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    sink = WavSink(path, fsync=True, name="st")
    assert sink.name == "st"
    await sink.open(AudioFormat(48000, channels=2))
    frames = tone(2 * 960)
    await sink.write(Frame(frames))
    assert await sink.interrupt() == 960  # nothing queued: everything written has left
    await sink.drain()
    await sink.aclose()
    params, data = read_wav(path)
    assert (params.nchannels, params.framerate, params.nframes) == (2, 48000, 960)
    np.testing.assert_array_equal(data, frames)
    assert sink.stats().samples_written == 960


async def test_misuse(tmp_path: Path) -> None:
    sink = WavSink(tmp_path / "x.wav")
    with pytest.raises(UsageError, match="NEW"):
        await sink.write(Frame(tone(10)))
    await sink.open(AudioFormat())
    with pytest.raises(UsageError, match="OPEN"):
        await sink.open(AudioFormat())
    await sink.aclose()
    await sink.aclose()
    with pytest.raises(ClosedError, match="CLOSED"):
        await sink.write(Frame(tone(10)))


async def test_open_failure_releases(tmp_path: Path) -> None:
    sink = WavSink(tmp_path / "no" / "such" / "dir.wav")
    with pytest.raises(FileNotFoundError):
        await sink.open(AudioFormat())
    with pytest.raises(ClosedError):
        await sink.write(Frame(tone(10)))
    await sink.aclose()
