"""Pure tests of the shared audio helpers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tts_stream.audio import AudioFormat, Frame, Rechunker, deadline, first_voiced_index, pcm16


def test_audio_format_arithmetic() -> None:
    fmt = AudioFormat()
    assert fmt.bytes_per_second == 48000
    assert fmt.samples(20) == 480 and fmt.ms(480) == 20.0
    assert AudioFormat(8000).samples(20) == 160


def test_pcm16_is_little_endian_and_refuses_odd_lengths() -> None:
    assert pcm16(b"\x01\x00\xff\xff").tolist() == [1, -1]
    with pytest.raises(ValueError, match="odd"):
        pcm16(b"\x00\x00\x00")


def test_deadline_is_an_absolute_schedule() -> None:
    assert deadline(100.0, 0, 8000) == 100.0
    assert deadline(100.0, 160 * 50, 8000) == pytest.approx(101.0)


def test_first_voiced_index() -> None:
    x = np.zeros(1000, np.int16)
    assert first_voiced_index(x) is None
    x[700] = -20000
    x[900] = 30000
    assert first_voiced_index(x) == 700
    assert first_voiced_index(np.array([-32768], np.int16)) == 0


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 50), st.lists(st.integers(0, 120), max_size=30))
def test_rechunker_preserves_every_sample_in_order(block: int, sizes: list[int]) -> None:
    r = Rechunker(block)
    data = np.arange(sum(sizes), dtype=np.int16)
    out: list[np.ndarray] = []
    pos = 0
    for n in sizes:
        blocks = r.push(data[pos : pos + n])
        assert all(b.size == block for b in blocks)
        out += blocks
        pos += n
    rest = r.flush()
    assert r.pending == 0
    joined = (
        np.concatenate(out + ([rest] if rest is not None else []))
        if (out or rest is not None)
        else np.zeros(0, np.int16)
    )
    assert joined.tolist() == data.tolist()


def test_rechunker_pads_the_tail() -> None:
    r = Rechunker(4)
    assert r.push(np.array([1, 2, 3, 4, 5], np.int16))[0].tolist() == [1, 2, 3, 4]
    tail = r.flush(pad=True)
    assert tail is not None and tail.tolist() == [5, 0, 0, 0]
    assert r.flush() is None
    with pytest.raises(ValueError):
        Rechunker(0)


def test_frame_length() -> None:
    assert len(Frame(np.zeros(480, np.int16), offset=960, response_id="r")) == 480
