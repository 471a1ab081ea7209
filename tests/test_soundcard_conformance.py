"""The sink conformance suite (tests/sink_conformance.py) against SoundCardSink, both backends.

The receiver is real: PortAudio → ALSA ``file`` tee → ALSA ``pulse`` plugin → a private
PulseAudio null sink (feasibility §5 recipe C), so the sink plays at the card's real-time
pace and the tee file holds exactly what PortAudio was given. This runs in the test process:
the factory points ``ALSA_CONFIG_PATH``/``PULSE_SERVER`` at the case's devices and
re-initialises PortAudio (it reads the ALSA configuration only at initialisation), then
restores both afterwards.

Reading back: runs of 16 or more zero samples are removed from the tee. They are what a card
plays around the audio (silence while a stream starts, the zero padding of a stream's last
block, silence between streams); the suite's signal never holds such a run. The fade of
``interrupt`` is turned off here (``fade_ms=0``) so delivery can be compared sample for
sample; the fade itself is checked in tests/test_soundcard.py.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from sinks import SoundCardSink
from tests.audio_env import pulse_null_sink_fixture  # noqa: F401 - the fixture "pulse_null_sink"
from tests.sink_conformance import CHECKS, SinkFactory, SinkUnderTest, check_id
from tts_stream.audio import PCM16, AudioFormat
from tts_stream.testing.audio_env import PulseServer, reinit_portaudio

pytestmark = pytest.mark.soundcard

MIN_SILENCE = 16


def drop_silences(x: npt.NDArray[np.int16], min_run: int = MIN_SILENCE) -> PCM16:
    """``x`` without its runs of at least ``min_run`` zero samples."""
    if x.size == 0:
        return x
    zero = np.concatenate([[False], x == 0, [False]])
    edges = np.flatnonzero(np.diff(zero.astype(np.int8)))
    keep = np.ones(x.size, dtype=bool)
    for start, stop in zip(edges[::2], edges[1::2], strict=True):
        if stop - start >= min_run:
            keep[start:stop] = False
    return x[keep]


def test_drop_silences() -> None:
    x = np.array([1, 0, 2] + [0] * 16 + [3, 0, 0] + [0] * 20, dtype=np.int16)
    assert drop_silences(x).tolist() == [1, 0, 2, 3]


def soundcard_case(server: PulseServer, backend: str) -> SinkFactory:
    @asynccontextmanager
    async def case(tmp_path: Path) -> AsyncIterator[SinkUnderTest]:
        tee = tmp_path / "tee.raw"
        env = server.client_env(tee)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        reinit_portaudio()
        try:
            sink = SoundCardSink(backend=backend, fade_ms=0)

            async def read_back() -> PCM16:
                got = np.fromfile(tee, "<i2") if tee.exists() else np.zeros(0, np.int16)
                return drop_silences(got)

            yield SinkUnderTest(
                sink, AudioFormat(24000), read_back, delivered_rate=24000, exact=True,
                realtime=True,
            )
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            reinit_portaudio()

    case.__name__ = f"soundcard_{backend}"
    return case


@pytest.mark.parametrize("backend", ["sounddevice", "pyaudio"])
@pytest.mark.parametrize("check", CHECKS, ids=check_id)
async def test_conformance(
    check: Callable[[SinkFactory, Path], Awaitable[None]],
    backend: str,
    pulse_null_sink: PulseServer,
    tmp_path: Path,
) -> None:
    await check(soundcard_case(pulse_null_sink, backend), tmp_path)
