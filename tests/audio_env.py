"""Pytest fixtures over :mod:`tts_stream.testing.audio_env`, and the sound-card scenario runner.

Test modules import ``alsa_file_device_fixture`` / ``pulse_null_sink_fixture`` and request
the fixtures by their names, ``alsa_file_device`` and ``pulse_null_sink``. PortAudio reads the
ALSA configuration in ``Pa_Initialize``, so the sound-card scenarios run in a fresh subprocess
(``tests/soundcard_runner.py``, through :func:`run_scenario`) with the environment of a
device. Fixtures tear down in ``finally``; every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tts_stream.testing.audio_env import AlsaFileDevice, PulseServer, alsa_file_config, pulse_daemon

__all__ = ["REPO", "alsa_file_device_fixture", "pulse_null_sink_fixture", "run_scenario"]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(name="alsa_file_device")
def alsa_file_device_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AlsaFileDevice:
    """Recipe A for one test; ``ALSA_CONFIG_PATH`` is set for the test (and its children)."""
    dev = alsa_file_config(tmp_path)
    monkeypatch.setenv("ALSA_CONFIG_PATH", str(dev.conf))
    return dev


class _SharedPulse:
    """One daemon per test process, however many modules import the fixture.

    A fixture imported into several test modules is a separate fixture definition in each,
    so a session-scoped one would start one daemon per module. Users are counted instead:
    the first starts the daemon, the last one out stops it.
    """

    def __init__(self) -> None:
        self.users = 0
        self.stack: contextlib.ExitStack | None = None
        self.server: PulseServer | None = None

    def acquire(self, root: Path) -> PulseServer:
        if self.server is None:
            stack = contextlib.ExitStack()
            self.server = stack.enter_context(pulse_daemon(root))
            self.stack = stack
        self.users += 1
        return self.server

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self.stack is not None:
            stack, self.stack, self.server = self.stack, None, None
            stack.close()  # stops the daemon and checks that it is gone


_shared_pulse = _SharedPulse()


@pytest.fixture(scope="session", name="pulse_null_sink")
def pulse_null_sink_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PulseServer]:
    """One private PulseAudio daemon with a 24 kHz mono null sink for the test session."""
    server = _shared_pulse.acquire(tmp_path_factory.mktemp("pulse"))
    try:
        yield server
    finally:
        _shared_pulse.release()


def run_scenario(
    spec: dict[str, Any], env: dict[str, str], *, timeout: float = 60.0
) -> dict[str, Any]:
    """Run ``tests/soundcard_runner.py`` with ``spec`` in a fresh process; return its JSON."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.soundcard_runner", json.dumps(spec)],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(
            f"runner failed (rc={proc.returncode}):\nstdout:\n{proc.stdout[-3000:]}\n"
            f"stderr:\n{proc.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    return result
