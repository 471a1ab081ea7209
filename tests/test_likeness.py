"""Voices that resemble their speakers: the torch-free encoder, the features, the goal.

* tts_stream.testing.voice_encoder loads resemblyzer's bundled weights without torch (its one-time
  check against the torch reference is in bench/README.md) and separates voices.
* server/likeness.py: features survive JSON, the formant ratio recovers a known vocal-tract
  scale, the transform moves pitch where it is told.
* The base voice is chosen by timbre: every espeak speaker gets its own variant, every
  piper-family speaker piper; the tilt correction recovers a known tilt; a transform with
  nothing to change is skipped.
* The goal, end to end (tts_stream/testing/speakers.py): on the 12 mixed speakers with the piper
  backend each synthesized voice is closer to its own sample than to any other, and the
  transform raises similarity to the own sample by at least 0.1 over the untransformed
  backend; on the 6 espeak speakers with the espeak backend each is closest to its own
  sample (the gain there is not met for the two male speakers, whose untransformed
  similarity already exceeds 0.9: bench/README.md). Margins, not retries, absorb the
  few-sample differences soxr's dither makes between runs.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tts_stream.server import LocalServer
from tts_stream.server.likeness import (
    ENVELOPE_HZ,
    BackendVoice,
    Likeness,
    SpeakerFeatures,
    equalize,
    extract_features,
    formant_ratio,
    measure_backend,
    sample_features,
    timbre_correction,
)
from tts_stream.server.piper import PIPER_SAMPLE_RATE, base_voice, synthesize_piper
from tts_stream.server.synth import VoiceProfile, espeak_variant
from tts_stream.server.voices import VoiceStore
from tts_stream.testing.samplegen import good_sample_wav, speech, wav_bytes
from tts_stream.testing.speakers import (
    ESPEAK_SPEAKERS,
    PIPER_SPEAKERS,
    RATE,
    Result,
    measure,
    sample,
)
from tts_stream.testing.voice_encoder import VoiceEncoder, cosine, load_weights


@pytest.fixture(scope="module")
def encoder() -> VoiceEncoder:
    return VoiceEncoder()


def test_weights_load_without_torch() -> None:
    import sys

    w = load_weights()
    assert w["lstm.weight_ih_l0"].shape == (1024, 40)
    assert w["lstm.weight_hh_l2"].shape == (1024, 256)
    assert w["linear.weight"].shape == (256, 256)
    assert "torch" not in sys.modules


def test_encoder_separates_voices(encoder: VoiceEncoder) -> None:
    a1 = speech(8.0, voice="en-us+m3", pitch=30)
    female = speech(8.0, voice="en-us+f2", pitch=60)
    e1 = encoder.embed(a1[: RATE * 4], RATE)
    e2 = encoder.embed(a1[RATE * 4 :], RATE)  # same voice, other words
    ef = encoder.embed(female, RATE)
    assert abs(float(np.linalg.norm(e1)) - 1.0) < 1e-5
    assert np.array_equal(e1, encoder.embed(a1[: RATE * 4], RATE))  # deterministic
    assert cosine(e1, e2) > cosine(e1, ef) + 0.1


def test_features_round_trip_and_pitch_order() -> None:
    low = extract_features(speech(8.0, voice="en-us+m3", pitch=25), RATE)
    high = extract_features(speech(8.0, voice="en-us+f2", pitch=70), RATE)
    assert low is not None and high is not None
    assert 60 < low.f0_median_hz < 130 < 170 < high.f0_median_hz < 320
    assert low.f0_p10_hz < low.f0_median_hz < low.f0_p90_hz
    assert SpeakerFeatures.from_json(low.to_json()) == low
    assert extract_features(np.zeros(RATE * 2, np.int16), RATE) is None


def test_formant_ratio_recovers_a_vocal_tract_scale() -> None:
    base = extract_features(sample("piper_x1.12"), RATE)
    assert base is not None
    for name, r in (("piper_x0.8", 0.8), ("piper_x1.4", 1.4)):
        other = extract_features(sample(name), RATE)
        assert other is not None
        # The estimate is within 10 % of the truth (the estimator is biased low a little;
        # the backend calibration compensates for the transform's own shortfall).
        assert formant_ratio(other, base) == pytest.approx(r / 1.12, rel=0.1)
    assert formant_ratio(base, base) == pytest.approx(1.0, abs=0.011)


def test_transform_moves_pitch_and_keeps_length() -> None:
    pcm = synthesize_piper("The transform should move the pitch of this sentence up.")
    backend = measure_backend("piper", pcm, PIPER_SAMPLE_RATE)
    target = SpeakerFeatures(180.0, 150.0, 220.0, backend.features.envelope_db)
    out = Likeness.toward(target, backend).apply(pcm, PIPER_SAMPLE_RATE)
    measured = extract_features(out, PIPER_SAMPLE_RATE)
    assert measured is not None and measured.f0_median_hz == pytest.approx(180, rel=0.1)
    assert abs(out.size - pcm.size) < PIPER_SAMPLE_RATE * 0.05
    assert backend.ratio_for(1.0) == pytest.approx(1.0, abs=0.05)


def test_enrollment_stores_features(tmp_path: object) -> None:
    text = sample_features(good_sample_wav())
    assert text is not None
    features = SpeakerFeatures.from_json(text)
    store = VoiceStore(":memory:", retention_s=1e9)
    voice = store.create("owner", preferred_name="v", target_model="m", language=None,
                         pitch_hz=features.f0_median_hz, now=0.0, features=text)  # fmt: skip
    assert store.get("owner", voice.name, now=1.0) == voice
    assert voice.features == text
    assert sample_features(wav_bytes(np.zeros(RATE * 12, np.int16), RATE)) is None


def _profile(name: str) -> VoiceProfile:
    features = extract_features(sample(name), RATE)
    assert features is not None
    return VoiceProfile(pitch_hz=features.f0_median_hz, features=features)


def test_base_voice_is_chosen_by_timbre() -> None:
    for name, (voice, _) in ESPEAK_SPEAKERS.items():
        profile = _profile(name)
        assert espeak_variant(profile) == voice[len("en-us") :], name
        assert base_voice(profile) == "espeak", name
    for name in PIPER_SPEAKERS:
        assert base_voice(_profile(name)) == "piper", name
    no_timbre = VoiceProfile(pitch_hz=200.0, features=SpeakerFeatures(200.0, 180.0, 240.0, ()))
    assert espeak_variant(no_timbre) == "+f2" and base_voice(no_timbre) == "piper"


def test_tilt_correction_recovers_a_tilt_and_identity_is_skipped() -> None:
    pcm = sample("piper_x1.25")
    base = extract_features(pcm, RATE)
    assert base is not None
    octaves = np.log2(ENVELOPE_HZ)
    tilt = 4.0 * (octaves - octaves.mean())  # +4 dB per octave
    tilted = extract_features(equalize(pcm, RATE, tuple(tilt)), RATE)
    assert tilted is not None
    slope = np.polyfit(octaves, timbre_correction(tilted, base, 1.0), 1)[0]
    assert slope == pytest.approx(4.0, abs=0.5)
    assert np.abs(timbre_correction(base, base, 1.0)).max() < 1e-6
    same = Likeness.toward(base, BackendVoice("self", base))
    assert same.is_identity and same.apply(pcm, RATE) is pcm


def _assert_closest(results: list[Result]) -> None:
    for r in results:
        # Margin: the runs differ by soxr's dither and piper's voice noise (≈0.005 here).
        assert r.own > r.best_other + 0.005, r


async def test_each_voice_is_closest_to_its_own_speaker_and_the_transform_helps() -> None:
    """The likeness goal (README, bench/likeness.py) on the 12 mixed speakers, piper backend."""
    speakers = [*PIPER_SPEAKERS, *ESPEAK_SPEAKERS]
    async with asyncio.timeout(1500), LocalServer(backend="piper") as srv:
        results = await measure(srv, "piper", speakers)
    assert [r.speaker for r in results] == speakers
    _assert_closest(results)
    for r in results:
        assert r.gain >= 0.1, r


async def test_each_espeak_voice_is_closest_to_its_own_speaker() -> None:
    """The first half of the goal on the 6 espeak speakers with the espeak backend."""
    async with asyncio.timeout(900), LocalServer(backend="espeak") as srv:
        results = await measure(srv, "espeak", list(ESPEAK_SPEAKERS))
    assert len(results) == 6
    _assert_closest(results)
