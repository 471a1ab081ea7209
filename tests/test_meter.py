"""The live recording meter and its screen (tts_stream.meter): plain calls, no device."""

from __future__ import annotations

import numpy as np
import pytest

from tts_stream.meter import SCRIPTS, Meter, progress_line, render, script_for
from tts_stream.testing.samplegen import clipped_speech, paused_speech, speech

RATE = 24000


def fed(x: np.ndarray, *, lead_in_s: float = 1.0, block: int = 480) -> Meter:
    m = Meter(RATE, lead_in_s)
    for i in range(0, x.size, block):
        m.feed(x[i : i + block])
    return m


def with_lead(x: np.ndarray, noise: float = 30.0) -> np.ndarray:
    rng = np.random.default_rng(1)
    lead = np.round(rng.normal(0, noise, RATE)).astype(np.int16)
    return np.concatenate([lead, x])


def test_block_size_does_not_change_the_status() -> None:
    x = with_lead(speech(6.0))
    assert fed(x, block=480).status() == fed(x, block=1000).status() == fed(x, block=7).status()


def test_noise_floor_comes_from_the_lead_in() -> None:
    s = fed(with_lead(speech(4.0), noise=100.0)).status()
    assert s.noise_floor_dbfs is not None and -51 < s.noise_floor_dbfs < -49  # 100/32768 RMS
    assert not s.in_lead_in and s.elapsed_s == pytest.approx(4.0, abs=0.03)


def test_continuous_reading_meets_the_3_s_rule() -> None:
    s = fed(with_lead(speech(8.0))).status()
    assert s.longest_run_s >= 3.0 and s.longest_pause_s <= 2.0, s
    assert "ok" in render(s)[3]


def test_a_3_s_pause_is_seen_as_a_pause_over_2_s() -> None:
    s = fed(with_lead(paused_speech(3.0))).status()
    assert 2.7 <= s.longest_pause_s <= 3.3, s
    assert "too long" in render(s)[4]


def test_clipping_marker_lights_and_holds_for_a_second() -> None:
    x = with_lead(clipped_speech(4.0)[: 3 * RATE])
    s = fed(x).status()
    assert s.clipping and s.clipped_samples > 0
    assert "CLIP!" in render(s)[1] and "CLIPPING" in progress_line(s)
    quiet = fed(np.concatenate([x, np.zeros(2 * RATE, np.int16)])).status()
    assert not quiet.clipping


def test_lead_in_screen_asks_for_quiet() -> None:
    s = fed(np.zeros(RATE // 2, np.int16)).status()
    assert s.in_lead_in
    assert "stay quiet" in render(s)[2] and "lead-in" in progress_line(s)


def test_screen_shows_every_rule_and_the_script() -> None:
    s = fed(with_lead(speech(12.0))).status()
    lines = render(s, script=script_for("de"), target="out.wav")
    text = "\n".join(lines)
    for needle in ("Recording out.wav", "level", "noise", "speech run", "pause", "elapsed",
                   "of 10-20 s", "good: press Enter", SCRIPTS["de"][0]):
        assert needle in text, (needle, text)


def test_scripts_cover_the_seed_languages() -> None:
    assert set(SCRIPTS) == {"en", "zh", "de", "it", "pt", "es", "ja", "ko", "fr", "ru"}
    assert all(len(v) >= 3 for v in SCRIPTS.values())
    assert script_for("en-US") == SCRIPTS["en"]
    with pytest.raises(ValueError, match="known: en, zh"):
        script_for("xx")
