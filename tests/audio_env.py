"""Audio devices without hardware, for the sound-card tests and the underrun benchmark.

Two recipes from research/feasibility.md §5:

* **ALSA file device** (recipe A): an ``asound.conf`` whose default PCM is the ``file``
  plugin in front of a ``null`` slave, selected with ``ALSA_CONFIG_PATH``. Every frame
  PortAudio writes lands in a raw file, bit-exact; no daemon; but NOT real-time (the null
  slave never blocks, the callback runs flat out).
* **PulseAudio null sink** (recipe B): a private ``pulseaudio`` daemon (runtime dir and HOME
  in a temporary directory, anonymous auth, no idle exit) with ``module-null-sink``; clients
  reach it through an ``asound.conf`` whose default PCM is ``type pulse``, optionally behind
  an ALSA ``file`` tee (recipe C: bit-exact copy *and* real-time pace). ``parec`` records the
  sink's monitor.

PortAudio reads the ALSA configuration in ``Pa_Initialize``, so the sound-card scenarios run
in a fresh subprocess (``tests/soundcard_runner.py``) with the environment from here;
:func:`reinit_portaudio` exists for in-process use. Everything started here stops by itself:
fixtures tear down in ``finally``; the daemon and ``parec`` also get ``PR_SET_PDEATHSIG`` so
they die with the test process; every wait has a timeout.

Test modules import ``alsa_file_device_fixture`` / ``pulse_null_sink_fixture`` and request
the fixtures by their names, ``alsa_file_device`` and ``pulse_null_sink``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

__all__ = [
    "AlsaFileDevice",
    "PulseServer",
    "alsa_file_config",
    "alsa_file_device_fixture",
    "find_signal",
    "pulse_daemon",
    "pulse_null_sink_fixture",
    "reinit_portaudio",
    "run_scenario",
]

REPO = Path(__file__).resolve().parent.parent

_ALSA_FILE_CONF = """\
pcm.!default {{
    type file
    slave.pcm "nullsink"
    file "{raw}"
    format "raw"
    perm 0644
}}
pcm.nullsink {{ type null }}
ctl.!default {{ type hw card 0 }}
"""

# Recipe C (tee + pace) when ``raw`` is given, else plain pulse. A standalone file: with the
# system alsa.conf also on the path, the pulse hook redefines ``default`` and the tee is lost.
_PULSE_TEE_CONF = """\
pcm.!default {{
    type file
    slave.pcm "pulsedev"
    file "{raw}"
    format "raw"
    perm 0644
}}
pcm.pulsedev {{ type pulse }}
ctl.!default {{ type pulse }}
"""
_PULSE_CONF = """\
pcm.!default { type pulse }
ctl.!default { type pulse }
"""

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the test process dies (even SIGKILL),
    # the kernel sends the child SIGTERM, so no daemon outlives the test run.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop(proc: subprocess.Popen[Any], *, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
    """Stop ``proc`` (the process itself, not a shell around it) and reap it."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


# -- ALSA file device (recipe A) ------------------------------------------------------------


@dataclass(frozen=True)
class AlsaFileDevice:
    """An ALSA config whose default PCM tees every frame into ``raw`` (int16, interleaved)."""

    conf: Path
    raw: Path

    @property
    def env(self) -> dict[str, str]:
        return {"ALSA_CONFIG_PATH": str(self.conf)}

    def played(self) -> npt.NDArray[np.int16]:
        """Everything played so far (missing file: nothing played)."""
        if not self.raw.exists():
            return np.zeros(0, np.int16)
        return np.fromfile(self.raw, dtype="<i2")


def alsa_file_config(directory: Path) -> AlsaFileDevice:
    """Write recipe A's ``asound.conf`` into ``directory``."""
    raw = directory / "played.raw"
    conf = directory / "asound.conf"
    conf.write_text(_ALSA_FILE_CONF.format(raw=raw))
    return AlsaFileDevice(conf=conf, raw=raw)


@pytest.fixture(name="alsa_file_device")
def alsa_file_device_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AlsaFileDevice:
    """Recipe A for one test; ``ALSA_CONFIG_PATH`` is set for the test (and its children)."""
    dev = alsa_file_config(tmp_path)
    monkeypatch.setenv("ALSA_CONFIG_PATH", str(dev.conf))
    return dev


def reinit_portaudio() -> None:
    """Re-run ``Pa_Initialize`` in this process so PortAudio rereads the ALSA config."""
    import sounddevice as sd

    sd._terminate()
    sd._initialize()


# -- PulseAudio null sink (recipe B / C) ------------------------------------------------------


@dataclass
class PulseServer:
    """A private PulseAudio daemon with one null sink (``sink``) at ``rate`` Hz, mono s16le."""

    root: Path
    proc: subprocess.Popen[bytes]
    sink: str = "ci_sink"
    rate: int = 24000
    _confs: dict[str, Path] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return self.root / "run" / "native"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def base_env(self) -> dict[str, str]:
        """What a Pulse client needs: the server socket, no autospawn."""
        return {
            "PULSE_SERVER": f"unix:{self.socket}",
            "PULSE_CLIENTCONFIG": str(self.root / "client.conf"),
            "XDG_RUNTIME_DIR": str(self.root / "run"),
            "HOME": str(self.root / "home"),
        }

    def client_env(self, tee: Path | None = None) -> dict[str, str]:
        """Environment for a PortAudio client: ALSA ``default`` → this daemon (tee to a file)."""
        if tee is None:
            conf = self.root / "asound-pulse.conf"
            conf.write_text(_PULSE_CONF)
        else:
            conf = tee.with_suffix(".conf")
            conf.write_text(_PULSE_TEE_CONF.format(raw=tee))
        return {**self.base_env(), "ALSA_CONFIG_PATH": str(conf)}

    def pactl(self, *args: str, timeout: float = 5.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["pactl", *args],
            env={**os.environ, **self.base_env()},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def sink_latency_s(self) -> float:
        """The null sink's current latency as ``pactl list sinks`` reports it."""
        out = self.pactl("list", "sinks").stdout
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("Latency:"):
                return int(line.split()[1]) / 1e6
        return float("inf")

    def source_env(self) -> dict[str, str]:
        """Environment for a PortAudio *recorder*: ALSA ``default`` captures the sink's monitor,
        so whatever :meth:`play` plays is what the microphone hears."""
        return {**self.client_env(), "PULSE_SOURCE": f"{self.sink}.monitor"}

    def play(self, path: Path, *, timeout: float = 60.0) -> None:
        """Play a WAV file into the null sink with ``paplay`` (real time; returns when done)."""
        env = {**os.environ, **self.base_env()}
        subprocess.run(["paplay", "-d", self.sink, str(path)], env=env, timeout=timeout,
                       check=True)  # fmt: skip

    def alive(self) -> bool:
        return self.proc.poll() is None and self.pactl("info", timeout=3.0).returncode == 0

    @contextlib.contextmanager
    def record(self, path: Path, *, timeout: float = 10.0) -> Iterator[Path]:
        """Record the sink's monitor into ``path`` (raw s16le mono) while the block runs.

        Returns once ``parec`` is actually delivering audio (the file has grown), so nothing
        played inside the block is missed at the start.
        """
        with open(path, "wb") as out:
            proc = subprocess.Popen(
                ["parec", "-d", f"{self.sink}.monitor", "--raw", "--format=s16le",
                 f"--rate={self.rate}", "--channels=1", "--latency-msec=20"],
                stdout=out,
                stderr=subprocess.DEVNULL,
                env={**os.environ, **self.base_env()},
                preexec_fn=_die_with_parent,
            )
            try:
                deadline = time.monotonic() + timeout
                while path.stat().st_size == 0:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"parec did not start recording (rc={proc.poll()})")
                    time.sleep(0.01)  # polling a condition, bounded by the deadline
                yield path
            finally:
                _stop(proc, sig=signal.SIGINT)


@contextlib.contextmanager
def pulse_daemon(
    root: Path | None = None, *, rate: int = 24000, timeout: float = 15.0
) -> Iterator[PulseServer]:
    """Start a private ``pulseaudio`` with a null sink; stop it (and check it is gone) after."""
    if shutil.which("pulseaudio") is None:
        raise RuntimeError("pulseaudio is not installed (make system installs it)")
    own_root = root is None
    root = Path(tempfile.mkdtemp(prefix="tts-pulse-")) if root is None else root
    (root / "run").mkdir(mode=0o700, parents=True, exist_ok=True)
    (root / "home").mkdir(mode=0o700, parents=True, exist_ok=True)
    (root / "client.conf").write_text("autospawn = no\n")
    env = {
        **os.environ,
        "XDG_RUNTIME_DIR": str(root / "run"),
        "HOME": str(root / "home"),
        "PULSE_CLIENTCONFIG": str(root / "client.conf"),
    }
    env.pop("PULSE_SERVER", None)
    log = open(root / "pulse.log", "wb")  # noqa: SIM115 - closed in finally
    # Started as a command of its own (no shell): proc.pid is the daemon, so stopping it
    # really stops it (feasibility §5: killing a wrapping subshell leaves the daemon running).
    proc = subprocess.Popen(
        ["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit",
         "--use-pid-file=no", "--log-target=stderr",
         f"--load=module-native-protocol-unix auth-anonymous=1 socket={root / 'run' / 'native'}",
         f"--load=module-null-sink sink_name=ci_sink rate={rate} channels=1 format=s16le",
         "--load=module-always-sink"],
        stdout=log,
        stderr=log,
        env=env,
        preexec_fn=_die_with_parent,
    )
    server = PulseServer(root=root, proc=proc, rate=rate)
    keeper: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"pulseaudio exited with {proc.returncode}: "
                    + (root / "pulse.log").read_text(errors="replace")[-2000:]
                )
            if server.pactl("info", timeout=3.0).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"pulseaudio did not answer within {timeout} s")
            time.sleep(0.05)  # polling a condition, bounded by the deadline
        # A null sink with no client asking for low latency runs its clock in 2 s blocks:
        # a new stream then stalls for up to 2 s before its first samples are consumed.
        # A monitor reader asking for 20 ms keeps the sink at 20 ms, like a real card.
        keeper = subprocess.Popen(
            ["parec", "-d", f"{server.sink}.monitor", "--raw", "--latency-msec=20"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **server.base_env()},
            preexec_fn=_die_with_parent,
        )
        while server.sink_latency_s() > 0.2:
            if keeper.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the null sink did not switch to low latency")
            time.sleep(0.05)  # polling a condition, bounded by the deadline
        yield server
    finally:
        if keeper is not None:
            _stop(keeper)
        _stop(proc)
        log.close()
        gone = proc.poll() is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, 0)
            gone = False
        if own_root:
            shutil.rmtree(root, ignore_errors=True)
        if not gone:
            raise RuntimeError(f"pulseaudio (pid {proc.pid}) is still running")


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


# -- running scenarios and checking recordings ------------------------------------------------


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


def find_signal(haystack: npt.NDArray[np.int16], needle: npt.NDArray[np.int16]) -> int:
    """Index where ``needle`` starts, bit-exact, in ``haystack`` (-1 when absent).

    Candidates are the positions matching the needle's first 32 samples; the needle must
    start with non-trivial content (random noise in these tests), so candidates are few.
    """
    k = min(32, needle.size)
    if haystack.size < needle.size or k == 0:
        return -1
    head = needle[:k]
    hits = np.flatnonzero(haystack[: haystack.size - needle.size + 1] == head[0])
    for hit in hits:
        i = int(hit)
        if np.array_equal(haystack[i : i + k], head) and np.array_equal(
            haystack[i : i + needle.size], needle
        ):
            return i
    return -1
