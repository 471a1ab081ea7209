"""Audio devices without hardware: an ALSA file device and a private PulseAudio null sink.

For testing code that plays or records through PortAudio (the sound-card sink, the recorder,
an application of them) on a machine with no sound card; the project's sound-card tests and
the underrun benchmark use it. Two recipes from research/feasibility.md §5:

* **ALSA file device** (recipe A): an ``asound.conf`` whose default PCM is the ``file``
  plugin in front of a ``null`` slave, selected with ``ALSA_CONFIG_PATH``. Every frame
  PortAudio writes lands in a raw file, bit-exact; no daemon; but NOT real-time (the null
  slave never blocks, the callback runs flat out).
* **PulseAudio null sink** (recipe B): a private ``pulseaudio`` daemon (runtime dir and HOME
  in a temporary directory, anonymous auth, no idle exit) with ``module-null-sink``; clients
  reach it through an ``asound.conf`` whose default PCM is ``type pulse``, optionally behind
  an ALSA ``file`` tee (recipe C: bit-exact copy *and* real-time pace). ``parec`` records the
  sink's monitor.

PortAudio reads the ALSA configuration in ``Pa_Initialize``, so a process that already
initialised it needs :func:`reinit_portaudio` (or the scenario runs in a fresh subprocess
with the environment from here, as ``tests/soundcard_runner.py`` does). Everything started
here stops by itself: the daemon and ``parec`` get ``PR_SET_PDEATHSIG`` so they die with the
process that started them, and every wait has a timeout. Needs the ``pulseaudio``,
``pulseaudio-utils`` and ``libasound2-plugins`` system packages (the Makefile installs them).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "AlsaFileDevice",
    "PulseServer",
    "alsa_file_config",
    "find_signal",
    "pulse_daemon",
    "reinit_portaudio",
]

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
    proc = _start_daemon(root, rate)
    server = PulseServer(root=root, proc=proc, rate=rate)
    keeper: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + timeout
        _wait_answering(server, deadline, timeout)
        keeper = _keep_low_latency(server, deadline)
        yield server
    finally:
        if keeper is not None:
            _stop(keeper)
        _stop(proc)
        if own_root:
            shutil.rmtree(root, ignore_errors=True)
        _check_gone(proc)


def _start_daemon(root: Path, rate: int) -> subprocess.Popen[bytes]:
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
    native = root / "run" / "native"
    with open(root / "pulse.log", "wb") as log:  # the child keeps its own descriptor
        # Started as a command of its own (no shell): proc.pid is the daemon, so stopping it
        # really stops it (feasibility §5: killing a wrapping subshell leaves it running).
        return subprocess.Popen(
            ["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit",
             "--use-pid-file=no", "--log-target=stderr",
             f"--load=module-native-protocol-unix auth-anonymous=1 socket={native}",
             f"--load=module-null-sink sink_name=ci_sink rate={rate} channels=1 format=s16le",
             "--load=module-always-sink"],
            stdout=log,
            stderr=log,
            env=env,
            preexec_fn=_die_with_parent,
        )  # fmt: skip


def _wait_answering(server: PulseServer, deadline: float, timeout: float) -> None:
    proc = server.proc
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"pulseaudio exited with {proc.returncode}: "
                + (server.root / "pulse.log").read_text(errors="replace")[-2000:]
            )
        if server.pactl("info", timeout=3.0).returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"pulseaudio did not answer within {timeout} s")
        time.sleep(0.05)  # polling a condition, bounded by the deadline


def _keep_low_latency(server: PulseServer, deadline: float) -> subprocess.Popen[bytes]:
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
    try:
        while server.sink_latency_s() > 0.2:
            if keeper.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the null sink did not switch to low latency")
            time.sleep(0.05)  # polling a condition, bounded by the deadline
    except BaseException:
        _stop(keeper)
        raise
    return keeper


def _check_gone(proc: subprocess.Popen[bytes]) -> None:
    gone = proc.poll() is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, 0)
        gone = False
    if not gone:
        raise RuntimeError(f"pulseaudio (pid {proc.pid}) is still running")


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
