"""`tts-stream ivr` as a user runs it (README "Telephony"), called by real SIP phones:
baresip records what it hears to WAV (sndfile module) and we check that it is our speech;
sipp places a second call. The embedded local server (espeak) speaks with a cloned voice."""

from __future__ import annotations

import asyncio
import os
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from sinks.g711 import ulaw_decode, ulaw_encode
from tests.rtp_receiver import free_udp_port
from tts_stream.cli import main
from tts_stream.testing.samplegen import good_sample_wav

pytestmark = pytest.mark.peer

PROMPT = "Hello caller. This is the telephony test speaking."


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels()) == (8000, 1)
        return np.frombuffer(w.readframes(w.getnframes()), np.int16)


def baresip_config(root: Path, sip_port: int) -> Path:
    conf = root / "baresip"
    conf.mkdir()
    silence = root / "silence.wav"
    with wave.open(str(silence), "wb") as w:  # the caller says nothing (no VAD barge-in)
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(8000 * 2 * 20))
    mods = ["stdio", "g711", "alsa", "aufile", "sndfile", "account", "menu"]
    (conf / "config").write_text("\n".join([
        "poll_method epoll", "net_interface 127.0.0.1", f"sip_listen 127.0.0.1:{sip_port}",
        "audio_player alsa,null", f"audio_source aufile,{silence}", "audio_alert alsa,null",
        "module_path /usr/lib/baresip/modules", *(f"module {m}.so" for m in mods),
        f"snd_path {root}",
    ]) + "\n")  # fmt: skip
    (conf / "accounts").write_text("<sip:caller@127.0.0.1>;regint=0;audio_codecs=PCMU\n")
    return conf


async def run(cmd: list[str], cwd: Path, seconds: float) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(seconds):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return int(proc.returncode or 0), out.decode(errors="replace")


async def test_ivr_cli_called_by_baresip_and_sipp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    data = ["--data-dir", str(tmp_path / "data")]
    sample = tmp_path / "me.wav"
    sample.write_bytes(good_sample_wav())
    assert await asyncio.to_thread(main, ["voices", "create", str(sample), "--name", "ivr",
                                          *data]) == 0  # fmt: skip
    voice = capsys.readouterr().out.strip().splitlines()[-1]
    ref = tmp_path / "ref.wav"  # the same prompt through `speak`, at the telephony rate
    assert await asyncio.to_thread(main, ["speak", voice, PROMPT, "--wav", str(ref),
                                          "--rate", "8000", *data]) == 0  # fmt: skip
    script = tmp_path / "script.txt"
    script.write_text(f"# the IVR says one line\n{PROMPT}\n")
    sip_port = free_udp_port(pair=False)
    env = {k: v for k, v in os.environ.items() if k != "DASHSCOPE_API_KEY"}
    ivr = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tts_stream", "ivr", voice, "--listen", f"127.0.0.1:{sip_port}",
        "--script", str(script), "--max-seconds", "45", *data,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )
    try:
        assert ivr.stdout is not None
        async with asyncio.timeout(60):
            banner = (await ivr.stdout.readline()).decode()
        assert "answering SIP calls" in banner, banner
        conf = baresip_config(tmp_path, free_udp_port(pair=False))
        rc, out = await run(["baresip", "-f", str(conf), "-e",
                             f"/dial sip:ivr@127.0.0.1:{sip_port}", "-t", "12"],
                            tmp_path, 40)  # fmt: skip
        assert rc == 0 and "Call established" in out, out[-3000:]
        rc, out = await run([
            "sipp", f"127.0.0.1:{sip_port}", "-sn", "uac", "-i", "127.0.0.1",
            "-p", str(free_udp_port(pair=False)), "-mp", str(free_udp_port(pair=True)),
            "-m", "1", "-d", "3000", "-timeout", "30", "-timeout_error", "-nostdin",
        ], tmp_path, 40)  # fmt: skip
        assert rc == 0, out[-3000:]
        log = ""
        async with asyncio.timeout(30):  # each call is logged once its BYE is handled
            while log.count("first audio") < 2:
                line = (await ivr.stdout.readline()).decode()
                assert line, log
                log += line
        ivr.terminate()
        async with asyncio.timeout(30):
            await ivr.wait()
    finally:
        if ivr.returncode is None:
            ivr.kill()
            await ivr.wait()
    assert log.count("first audio") == 2, log
    # what baresip decoded is our prompt: as long, and the same waveform (G.711 round trip)
    dump = next(tmp_path.glob("dump-*-dec.wav"))  # noqa: ASYNC240
    heard = read_wav(dump).astype(np.float64)
    want = ulaw_decode(ulaw_encode(read_wav(ref))).astype(np.float64)
    assert abs(np.count_nonzero(np.abs(heard) > 100) - np.count_nonzero(np.abs(want) > 100)) \
        < 0.1 * want.size  # fmt: skip
    # window by window (a phone's jitter buffer may shift the timing between windows): each
    # 250 ms of our speech is found in what baresip heard, closely
    scores = []
    for start in range(0, want.size - 2000, 2000):
        w = want[start : start + 2000]
        if np.sqrt(np.mean(w**2)) < 300:
            continue  # a pause
        c = np.correlate(heard, w, mode="valid")
        energy = np.convolve(heard**2, np.ones(w.size), mode="valid")
        scores.append(float(np.max(c / np.sqrt(energy * np.sum(w**2) + 1e-9))))
    # measured median 0.76 (baresip's decoder path is not bit-exact); unrelated audio: < 0.3
    assert len(scores) >= 4 and float(np.median(scores)) > 0.6, scores
