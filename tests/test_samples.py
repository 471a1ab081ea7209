"""Clone-sample checks (tts_stream.samples): every rule of protocol.md §4.7 with a real file.

All inputs are real audio from tts_stream.testing.samplegen (espeak speech, PyAV-encoded MP3/M4A);
no check is faked. Pure tier: no event loop, no network.
"""

from __future__ import annotations

import base64
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tts_stream.errors import UsageError
from tts_stream.samples import (
    ERROR_CODES,
    MAX_BYTES,
    Problem,
    data_uri,
    data_uri_size,
    decode_mono,
    error_code,
    inspect_sample,
    measure_pitch,
    sniff_container,
)
from tts_stream.testing import samplegen as gen

RULES = {
    "format", "decode", "size", "data_uri_size", "duration", "sample_rate", "channels",
    "bit_depth", "speech", "pauses",
}  # fmt: skip


# --------------------------------------------------------------------------- good samples


@pytest.mark.parametrize(
    ("builder", "container", "mime"),
    [
        (gen.good_sample_wav, "wav", "audio/wav"),
        (gen.good_sample_mp3, "mp3", "audio/mpeg"),
        (gen.good_sample_m4a, "mp4", "audio/mp4"),
    ],
)
def test_good_samples_pass_every_rule(builder: object, container: str, mime: str) -> None:
    assert callable(builder)
    report = inspect_sample(builder())
    assert report.ok, report.problems
    assert report.problems == () and report.warnings == ()
    assert (report.container, report.mime) == (container, mime)
    assert report.sample_rate == 24000 and report.channels == 1
    assert report.duration_s == pytest.approx(12.0, abs=0.1)
    assert report.longest_speech_s is not None and report.longest_speech_s >= 3.0
    assert report.longest_pause_s is not None and report.longest_pause_s <= 2.0
    assert report.speech_s is not None and 6.0 < report.speech_s <= 12.0
    assert report.pitch_hz is not None and 80 < report.pitch_hz < 130  # espeak en-us ~100 Hz
    assert error_code(report) is None


def test_good_wav_reports_its_properties() -> None:
    data = gen.good_sample_wav()
    report = inspect_sample(data)
    assert report.codec == "pcm_s16" and report.bit_depth == 16
    assert report.size_bytes == len(data)
    assert report.data_uri_bytes == len(data_uri(data, "audio/wav"))


def test_female_voice_measures_higher_pitch() -> None:
    low = inspect_sample(gen.good_sample_wav(pitch=30))
    high = inspect_sample(gen.good_sample_wav(voice="en-us+f2", pitch=70))
    assert low.ok and high.ok
    assert low.pitch_hz is not None and high.pitch_hz is not None
    assert high.pitch_hz > 1.6 * low.pitch_hz


def test_chinese_reading_passes() -> None:
    report = inspect_sample(gen.wav_bytes(gen.speech(14.0, voice="cmn"), 24000))
    assert report.ok, report.problems


def test_container_recognised_by_content_not_file_name(tmp_path: Path) -> None:
    mp3_named_wav = tmp_path / "voice.wav"
    mp3_named_wav.write_bytes(gen.good_sample_mp3())
    m4a_named_mp3 = tmp_path / "voice.mp3"
    m4a_named_mp3.write_bytes(gen.good_sample_m4a())
    wav_no_suffix = tmp_path / "voice"
    wav_no_suffix.write_bytes(gen.good_sample_wav())
    for path, container in [(mp3_named_wav, "mp3"), (m4a_named_mp3, "mp4"), (wav_no_suffix, "wav")]:
        report = inspect_sample(path)
        assert report.ok, (path, report.problems)
        assert report.container == container
    assert inspect_sample(str(wav_no_suffix)).ok  # str paths too


def test_warning_outside_recommended_duration() -> None:
    report = inspect_sample(gen.good_sample_wav(6.0))
    assert report.ok
    assert [w.rule for w in report.warnings] == ["duration"]
    assert report.warnings[0].measured == pytest.approx(6.0)
    long_ok = inspect_sample(gen.good_sample_wav(30.0))
    assert long_ok.ok and [w.rule for w in long_ok.warnings] == ["duration"]


# --------------------------------------------------------------------------- bad samples


@pytest.mark.parametrize("case", sorted(gen.BAD_SAMPLES))
def test_each_bad_sample_breaks_exactly_its_rules(case: str) -> None:
    builder, rules = gen.BAD_SAMPLES[case]
    report = inspect_sample(builder())
    assert not report.ok
    assert report.rules() == rules
    for problem in report.problems:
        assert problem.message and str(problem) == problem.message
        assert problem.measured is not None, problem
        if problem.rule != "format":
            assert problem.limit is not None, problem


def test_measured_values_and_limits() -> None:
    by_rule = {p.rule: p for p in inspect_sample(gen.stereo_wav()).problems}
    assert (by_rule["channels"].measured, by_rule["channels"].limit) == (2, 1)
    by_rule = {p.rule: p for p in inspect_sample(gen.low_rate_wav()).problems}
    assert (by_rule["sample_rate"].measured, by_rule["sample_rate"].limit) == (16000, 24000)
    by_rule = {p.rule: p for p in inspect_sample(gen.long_wav()).problems}
    assert by_rule["duration"].measured == pytest.approx(70.0)
    assert by_rule["duration"].limit == 60.0
    by_rule = {p.rule: p for p in inspect_sample(gen.eight_bit_wav()).problems}
    assert (by_rule["bit_depth"].measured, by_rule["bit_depth"].limit) == (8, 16)
    report = inspect_sample(gen.long_pauses_wav())
    by_rule = {p.rule: p for p in report.problems}
    assert isinstance(by_rule["pauses"].measured, float)
    assert 2.0 < by_rule["pauses"].measured < 3.2  # the gaps are 2.6 s
    assert by_rule["pauses"].limit == 2.0
    assert by_rule["speech"].measured == report.longest_speech_s
    assert report.longest_speech_s is not None and report.longest_speech_s < 3.0
    by_rule = {p.rule: p for p in inspect_sample(gen.oversize_wav()).problems}
    assert isinstance(by_rule["size"].measured, int) and by_rule["size"].measured > MAX_BYTES
    assert by_rule["size"].limit == MAX_BYTES


def test_noise_and_silence_have_no_speech() -> None:
    for data in (gen.noise_wav(), gen.silence_wav()):
        report = inspect_sample(data)
        assert report.rules() == {"speech"}
        assert report.longest_speech_s == 0.0 and report.pitch_hz is None


def test_noisy_speech_still_passes() -> None:
    clean = gen.speech(12.0).astype(np.float64)
    noise = np.random.default_rng(1).normal(0.0, 1.0, clean.size)
    noise *= np.sqrt(np.mean(clean**2)) / 10 ** (20 / 20)  # 20 dB SNR
    noisy = np.clip(clean + noise, -32768, 32767).astype(np.int16)
    assert inspect_sample(gen.wav_bytes(noisy, 24000)).ok


def test_every_violation_is_reported_at_once() -> None:
    # 50 s of white noise, 16 kHz, stereo, 8-bit: four rules broken in one file.
    noise = np.random.default_rng(5).normal(0.0, 6000.0, 50 * 16000)
    data = gen.wav_bytes(noise.astype(np.int16), 16000, channels=2, sampwidth=1)
    report = inspect_sample(data)
    # Ordered the way the service meets them, so problems[0] is what a server answers.
    assert [p.rule for p in report.problems] == ["bit_depth", "sample_rate", "channels", "speech"]
    assert error_code(report) == ERROR_CODES["bit_depth"]
    # 70 s: refused on its header, not decoded, so every rule the header shows but no speech.
    noise = np.random.default_rng(5).normal(0.0, 6000.0, 70 * 16000)
    data = gen.wav_bytes(noise.astype(np.int16), 16000, channels=2, sampwidth=1)
    report = inspect_sample(data)
    assert [p.rule for p in report.problems] == [
        "bit_depth", "sample_rate", "duration", "channels",
    ]  # fmt: skip
    assert report.speech_s is None and report.duration_s == pytest.approx(70.0)


def test_garbage_and_truncated_files_never_crash() -> None:
    wav = gen.good_sample_wav()
    cases = {
        "empty": (b"", "format"),
        "garbage": (gen.garbage_bytes(), "format"),
        "riff header only": (wav[:12], "decode"),
        "wav without data": (wav[:36], "decode"),
        "id3 then garbage": (b"ID3\x04\x00\x00\x00\x00\x00\x00" + gen.garbage_bytes(), "decode"),
        "ftyp then garbage": (b"\x00\x00\x00\x18ftypM4A " + gen.garbage_bytes(), "decode"),
        "mp3 cut to 300 bytes": (gen.good_sample_mp3()[:300], "decode"),
    }
    for name, (data, rule) in cases.items():
        report = inspect_sample(data)
        assert not report.ok, name
        assert rule in report.rules(), (name, report.problems)
        assert error_code(report) == ("Audio.DecoderError", "Decoder audio file failed.")


_PREFIXES = [b"", b"RIFF\x00\x00\x00\x00WAVE", b"ID3\x04\x00", b"\xff\xfb\x90\x64",
             b"\x00\x00\x00\x20ftypisom"]  # fmt: skip


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from(_PREFIXES), tail=st.binary(max_size=4096))
def test_arbitrary_bytes_never_crash(prefix: bytes, tail: bytes) -> None:
    report = inspect_sample(prefix + tail)
    assert not report.ok
    assert report.rules() & {"format", "decode", "speech", "bit_depth", "sample_rate"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.sampled_from(["wav", "mp3", "m4a"]),
    cut=st.integers(min_value=0, max_value=20_000),
    flips=st.lists(st.tuples(st.integers(0, 511), st.integers(1, 255)), max_size=8),
)
def test_damaged_files_never_crash(which: str, cut: int, flips: list[tuple[int, int]]) -> None:
    good = {"wav": gen.good_sample_wav, "mp3": gen.good_sample_mp3, "m4a": gen.good_sample_m4a}
    data = bytearray(good[which]()[:cut] if cut else good[which]())
    for pos, xor in flips:  # damage the header, where parsers are most fragile
        if pos < len(data):
            data[pos] ^= xor
    report = inspect_sample(bytes(data))
    assert set(report.rules()) <= RULES


def test_float_and_24_bit_wav_are_rejected_by_bit_depth() -> None:
    pcm = gen.speech(12.0)
    report = inspect_sample(gen.wav_bytes(pcm, 24000, sampwidth=3))
    assert report.rules() == {"bit_depth"} and report.problems[0].measured == 24
    floats = (pcm.astype(np.float32) / 32768.0).tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 24000, 24000 * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
    body += b"data" + struct.pack("<I", len(floats)) + floats
    report = inspect_sample(b"RIFF" + struct.pack("<I", len(body)) + body)
    assert report.rules() == {"bit_depth"} and report.problems[0].measured == 32
    assert report.longest_speech_s is not None and report.longest_speech_s >= 3.0


def test_huge_file_is_measured_from_its_beginning(tmp_path: Path) -> None:
    # 250 s at 24 kHz is 12 MB: the path is read only a little past the limit, yet the
    # duration comes from the header, which refuses it before any decoding.
    path = tmp_path / "long.wav"
    path.write_bytes(gen.wav_bytes(gen.speech(250.0), 24000))
    report = inspect_sample(path)
    assert report.rules() == {"size", "data_uri_size", "duration"}
    assert report.size_bytes == path.stat().st_size > MAX_BYTES
    assert report.duration_s == pytest.approx(250.0)
    assert report.longest_speech_s is None  # not decoded: too long already


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read"):
        inspect_sample(tmp_path / "absent.wav")


# --------------------------------------------------------------------------- helpers


def test_error_codes_cover_every_rule() -> None:
    assert set(ERROR_CODES) == RULES
    codes = {code for code, _ in ERROR_CODES.values()}
    assert codes == {
        "Audio.DecoderError", "Audio.AudioRateError", "Audio.DurationLimitError",
        "Audio.PreprocessError", "BadRequest.InputDownloadFailed",
    }  # fmt: skip
    assert ERROR_CODES["sample_rate"] == ("Audio.AudioRateError", "File sample rate unsupported.")
    assert error_code(inspect_sample(gen.long_wav()))[0] == "Audio.DurationLimitError"  # type: ignore[index]
    assert error_code(inspect_sample(gen.noise_wav()))[0] == "Audio.PreprocessError"  # type: ignore[index]


def test_data_uri_round_trips_and_size_is_predicted() -> None:
    for n in (0, 1, 2, 3, 1000, 1001):
        data = bytes(range(256)) * 4
        data = data[:n]
        uri = data_uri(data, "audio/mpeg")
        head, b64 = uri.split(",", 1)
        assert head == "data:audio/mpeg;base64"
        assert base64.b64decode(b64) == data
        assert data_uri_size(n, "audio/mpeg") == len(uri)


def test_data_uri_limit_applies_to_the_base64_text() -> None:
    # 8 MB of file is under 10 MB, but its base64 text (4/3 larger) is not.
    pcm = np.zeros(4 * 1024 * 1024, np.int16)
    report = inspect_sample(gen.wav_bytes(pcm, 24000))
    assert "size" not in report.rules()
    assert "data_uri_size" in report.rules()
    assert report.data_uri_bytes > MAX_BYTES > report.size_bytes


def test_sniff_container() -> None:
    assert sniff_container(gen.good_sample_wav()) == "wav"
    assert sniff_container(gen.good_sample_mp3()) == "mp3"
    assert sniff_container(gen.good_sample_m4a()) == "mp4"
    assert sniff_container(b"\xff\xf3\x64\xc4" + bytes(100)) == "mp3"  # bare frame sync
    assert sniff_container(b"\xff\xe9" + bytes(100)) is None  # reserved MPEG version
    assert sniff_container(b"OggS" + bytes(100)) is None
    assert sniff_container(b"") is None


@pytest.mark.parametrize("builder", [gen.good_sample_wav, gen.good_sample_mp3, gen.good_sample_m4a])
def test_decode_mono(builder: object) -> None:
    assert callable(builder)
    pcm = decode_mono(builder(), 16000)
    assert pcm.dtype == np.int16 and pcm.ndim == 1
    assert pcm.size / 16000 == pytest.approx(12.0, abs=0.1)
    assert np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 500


def test_decode_mono_refuses_garbage() -> None:
    with pytest.raises(UsageError):
        decode_mono(gen.garbage_bytes(), 16000)
    with pytest.raises(UsageError):
        decode_mono(gen.good_sample_wav()[:40], 16000)


def test_measure_pitch_on_harmonic_signal() -> None:
    rate = 24000
    t = np.arange(2 * rate) / rate
    for f0 in (80.0, 150.0, 300.0):
        x = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6))
        pcm = (np.asarray(x) * 8000).astype(np.int16)
        measured = measure_pitch(pcm, rate)
        assert measured is not None and measured == pytest.approx(f0, rel=0.03)
    assert measure_pitch(np.zeros(rate, np.int16), rate) is None
    assert measure_pitch(np.zeros(10, np.int16), rate) is None


def test_problem_is_a_frozen_value() -> None:
    p = Problem("channels", "audio has 2 channels; it must be mono", 2, 1)
    assert p == Problem("channels", "audio has 2 channels; it must be mono", 2, 1)
    with pytest.raises(AttributeError):
        p.rule = "x"  # type: ignore[misc]


def test_inspection_is_fast() -> None:
    data = gen.good_sample_wav(15.0)
    inspect_sample(data)  # warm-up (imports, FFT plans)
    start = time.perf_counter()
    report = inspect_sample(data)
    assert report.ok
    assert time.perf_counter() - start < 1.0  # typically ~40 ms; generous for noisy CI
