"""Recording-quality warnings (samples.measure_quality / quality_warnings), check by check.

Each check gets a file that should trip it and one that should not, made by the generator
(tts_stream.testing.samplegen); the measured value is in the test id and in the assertion message.
The files pass every hard rule: these are warnings, and ``ok`` stays true.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from tts_stream.samples import (
    CLIPPED_MAX_SHARE,
    DC_MAX,
    DECAY_MAX_S,
    LEVEL_MIN_DBFS,
    SNR_MIN_DB,
    STEADY_MAX_SHARE,
    inspect_sample,
    measure_quality,
    quality_warnings,
)
from tts_stream.testing import samplegen as g

PCM16 = npt.NDArray[np.int16]
RATE = 24000
ADVICE = {"snr": "quiet room", "clipping": "input gain", "level": "10 cm", "reverb": "small room",
          "dc_offset": "another input", "music": "no music", "speakers": "one speaker"}  # fmt: skip

# (id, builder, rule, trips, measure name): the id carries the generated value.
CASES: list[tuple[str, Callable[[], PCM16], str, bool, str]] = [
    ("snr_10dB_trips", lambda: g.noisy_speech(10), "snr", True, "snr_db"),
    ("snr_15dB_trips", lambda: g.noisy_speech(15), "snr", True, "snr_db"),
    ("snr_20dB_trips", lambda: g.noisy_speech(20), "snr", True, "snr_db"),
    ("snr_35dB_passes", lambda: g.noisy_speech(35), "snr", False, "snr_db"),
    ("clipping_gain4_trips", lambda: g.clipped_speech(4.0), "clipping", True, "clipped_share"),
    ("clipping_gain1.1_passes", lambda: g.clipped_speech(1.1), "clipping", False,
     "clipped_share"),
    ("level_-20dB_trips", lambda: g.scaled_speech(-20), "level", True, "speech_level_dbfs"),
    ("level_-6dB_passes", lambda: g.scaled_speech(-6), "level", False, "speech_level_dbfs"),
    ("reverb_rt60_0.9s_trips", lambda: g.reverberant_speech(0.9), "reverb", True, "decay_s"),
    ("reverb_rt60_0.6s_trips", lambda: g.reverberant_speech(0.6), "reverb", True, "decay_s"),
    ("reverb_rt60_0.2s_passes", lambda: g.reverberant_speech(0.2), "reverb", False, "decay_s"),
    ("dc_+3%_trips", lambda: g.scaled_speech(0, offset=0.03), "dc_offset", True, "dc_offset"),
    ("dc_-0.3%_passes", lambda: g.scaled_speech(0, offset=-0.003), "dc_offset", False,
     "dc_offset"),
    ("music_melody_trips", g.music_like, "music", True, "steady_pitch_share"),
    ("music_speech_passes", lambda: g.speech(12.0), "music", False, "steady_pitch_share"),
    ("speakers_87Hz+294Hz_trips", g.two_speakers, "speakers", True, "pitch_groups_hz"),
    ("speakers_one_high_voice_passes", lambda: g.speech(12.0, voice="en-us+f2", pitch=90),
     "speakers", False, "pitch_groups_hz"),
]  # fmt: skip


@pytest.mark.parametrize(("builder", "rule", "trips", "measure"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])  # fmt: skip
def test_each_check_trips_on_its_fault_and_not_on_a_good_file(
    builder: Callable[[], PCM16], rule: str, trips: bool, measure: str
) -> None:
    report = inspect_sample(g.wav_bytes(builder(), RATE))
    assert report.quality is not None
    value = getattr(report.quality, measure)
    rules = {w.rule for w in report.warnings}
    assert (rule in rules) == trips, f"{measure} = {value}; warnings: {report.warnings}"
    assert report.ok, report.problems  # warnings never make a sample fail
    for w in report.warnings:
        if w.rule == rule:
            assert w.measured is not None and w.limit is not None
            assert ADVICE[rule] in w.message, w.message  # the recording guide's advice


def test_the_clean_reference_trips_no_quality_check() -> None:
    report = inspect_sample(g.good_sample_wav())
    q = report.quality
    assert q is not None
    assert report.warnings == (), f"{q}"
    assert q.snr_db is not None and q.snr_db > 35, q
    assert q.speech_level_dbfs is not None and -25 < q.speech_level_dbfs < -15, q
    assert q.clipped_share == 0.0 and abs(q.dc_offset) < 0.005, q


@pytest.mark.parametrize("snr", [10.0, 15.0, 20.0, 25.0, 30.0])
def test_snr_is_measured_within_3_db_of_the_generated_value(snr: float) -> None:
    q = measure_quality(g.noisy_speech(snr), RATE)
    assert q.snr_db is not None and abs(q.snr_db - snr) <= 3.0, f"generated {snr} dB: {q.snr_db}"


def test_clipping_share_grows_with_the_gain() -> None:
    shares = [measure_quality(g.clipped_speech(k), RATE).clipped_share for k in (1.0, 2.0, 4.0)]
    assert shares[0] == 0.0 and shares[0] < shares[1] < shares[2], shares
    assert shares[1] > CLIPPED_MAX_SHARE, shares


def test_level_follows_the_gain_in_db() -> None:
    base = measure_quality(g.scaled_speech(0), RATE).speech_level_dbfs
    low = measure_quality(g.scaled_speech(-20), RATE).speech_level_dbfs
    assert base is not None and low is not None
    assert abs((base - low) - 20.0) < 1.0, (base, low)
    assert low < LEVEL_MIN_DBFS < base


def test_decay_estimate_rises_with_the_room_reverberation_time() -> None:
    decays = [measure_quality(g.reverberant_speech(t), RATE).decay_s for t in (0.2, 0.4, 0.9)]
    dry = measure_quality(g.speech(12.0), RATE).decay_s
    assert dry is not None and all(d is not None for d in decays), (dry, decays)
    assert dry < DECAY_MAX_S and decays == sorted(decays), (dry, decays)  # type: ignore[type-var]


def test_decay_is_not_measured_when_noise_leaves_no_range() -> None:
    q = measure_quality(g.noisy_speech(15), RATE)
    assert q.decay_s is None, q  # a 15 dB floor leaves no 30 dB of decay to observe


def test_dc_offset_is_the_signed_mean() -> None:
    q = measure_quality(g.scaled_speech(0, offset=-0.03), RATE)
    assert abs(q.dc_offset + 0.03) < 0.003 and abs(q.dc_offset) > DC_MAX, q.dc_offset
    shown = f"{100 * q.dc_offset:+.1f} %"
    assert any(w.rule == "dc_offset" and shown in w.message for w in quality_warnings(q))


def test_music_share_separates_a_melody_from_reading() -> None:
    melody = measure_quality(g.music_like(), RATE).steady_pitch_share
    reading = [measure_quality(g.speech(12.0, voice=v), RATE).steady_pitch_share
               for v in ("en-us", "en-us+f2", "cmn")]  # fmt: skip
    assert melody is not None and melody > 0.9, melody
    assert all(r is not None and r < STEADY_MAX_SHARE / 2 for r in reading), reading


def test_silence_measures_nothing_it_cannot() -> None:
    q = measure_quality(np.zeros(RATE * 2, np.int16), RATE)
    assert q.snr_db is None and q.decay_s is None and q.steady_pitch_share is None
    assert quality_warnings(q) == []
    assert SNR_MIN_DB > 0  # the limits are the documented ones
