"""CLI paths that print measurements or metrics, with inputs that have none (issue 9, defect 4).

``tts-stream check`` on files that cannot be decoded prints the problem and REJECTED with
exit 1 (it crashed with a TypeError formatting ``duration_s = None``); ``speak`` with no text
says so in one line before connecting.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import av
import numpy as np
import pytest

from tts_stream.cli import main
from tts_stream.testing.samplegen import good_sample_wav


def _video_only_mp4() -> bytes:
    """A real MP4 with one video stream and no audio stream (made with PyAV)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(5):
            img = np.full((32, 32, 3), i * 40, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _riff_then_noise() -> bytes:
    noise = np.random.default_rng(9).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    return b"RIFF" + struct.pack("<I", 4 + len(noise)) + b"WAVE" + noise


UNDECODABLE = {
    "empty.wav": b"",
    "text.wav": b"this is a text file, not audio\n" * 20,
    "truncated.wav": good_sample_wav()[:30],
    "id3only.mp3": b"ID3\x04\x00\x00\x00\x00\x00\x00",
    "noaudio.mp4": _video_only_mp4(),
    "riffnoise.wav": _riff_then_noise(),
}


@pytest.mark.parametrize("name", sorted(UNDECODABLE))
def test_check_rejects_an_undecodable_file_without_crashing(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / name
    path.write_bytes(UNDECODABLE[name])
    assert main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith(f"{path}: ")
    assert any(line.startswith("  problem: ") for line in lines), out
    assert lines[-1].startswith("REJECTED")
    assert "Traceback" not in out + err and err == ""


def test_check_still_prints_every_measurement_of_a_good_sample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "good.wav"
    path.write_bytes(good_sample_wav())
    assert main(["check", str(path)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    for part in (" Hz, 1 ch, ", "longest speech ", "longest pause "):
        assert part in first


@pytest.mark.parametrize("text", ["", "   \n"])
def test_speak_with_nothing_to_say_is_one_line(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["speak", "some-voice", text, "--wav", str(tmp_path / "o.wav"),
                 "--base-url", "http://127.0.0.1:9"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 2
    assert err == "tts-stream: error: nothing to say: the text is empty\n"
    assert out == ""
    assert not (tmp_path / "o.wav").exists()  # refused before any sink or connection
