"""Voices that resemble their speakers: speaker features at enrollment, a transform at synthesis.

Role: at enrollment :func:`extract_features` measures the sample's pitch (median, 10th and
90th percentile of F0, with Praat through ``praat-parselmouth``), its long-term spectral
envelope and a timbre descriptor (:func:`timbre_descriptor`: mel-cepstral statistics). At
synthesis a backend first picks the base voice nearest the descriptor
(:func:`nearest_voice`: an espeak variant, or piper), then :class:`Likeness` moves its
output toward the speaker with Praat's "Change gender" (PSOLA): the pitch median becomes the
speaker's, the pitch range is scaled by the ratio of the speaker's to the backend's (in
octaves), and the formants are shifted by the frequency ratio that best maps the backend's
envelope onto the speaker's (:func:`formant_ratio`); then the remaining spectral tilt is
corrected (:func:`timbre_correction`, :func:`equalize`). The backend's own figures are
measured once, on its output for a calibration text (:func:`measure_backend`).

What it is not: the cloud's voice cloning. It keeps the base voice's accent, rhythm and
voice quality and matches only coarse cues (which of a few base voices, pitch level, pitch
range, vocal-tract length, spectral tilt). Cost: ≈18 ms of CPU per second of audio for
Change gender, 2–4 ms for the tilt, paid per piece, so a short first piece keeps first
audio low; a transform with nothing audible to change is skipped.

Boundary: pure numpy in, numpy out (no asyncio, no clock); parselmouth (GPL-3, like the rest
of the server extra) is imported lazily.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from tts_stream.audio import PCM16
from tts_stream.errors import MissingDependency

__all__ = [
    "BackendVoice",
    "Likeness",
    "SpeakerFeatures",
    "extract_features",
    "CALIBRATION_RATIOS",
    "EQ_MAX_DB",
    "equalize",
    "formant_ratio",
    "measure_backend",
    "nearest_voice",
    "sample_features",
    "timbre_correction",
    "timbre_descriptor",
]

logger = logging.getLogger(__name__)

_PITCH_FLOOR: Final = 60.0
_PITCH_CEILING: Final = 500.0
_FORMANT_RATIO: Final = (0.7, 1.7)
_RANGE_RATIO: Final = (0.4, 2.5)
_LIFTER_S: Final = 0.0025  # keep quefrencies below 2.5 ms: the envelope, not the harmonics
ENVELOPE_HZ: Final = np.geomspace(150.0, 6000.0, 80)
"""The log-frequency grid of :attr:`SpeakerFeatures.envelope_db`."""
ANALYSIS_RATE: Final = 16000
"""Rate enrollment samples are analysed at (every accepted sample has at least this)."""
_FIT: Final = slice(10, 70)  # ~300-4000 Hz: where formants live, with room to shift


def _praat() -> Any:
    try:
        import parselmouth
    except ImportError as exc:
        raise MissingDependency(
            "voice likeness needs praat-parselmouth: install tts-stream[server]"
        ) from exc
    return parselmouth


@dataclass(frozen=True)
class SpeakerFeatures:
    """Pitch and formant figures of a voice (a speaker's sample or a backend's output)."""

    f0_median_hz: float
    f0_p10_hz: float
    f0_p90_hz: float
    envelope_db: tuple[float, ...]
    """Long-term spectral envelope of the voiced frames (dB) on :data:`ENVELOPE_HZ`."""
    timbre: tuple[float, ...] = ()
    """Cepstral statistics of the speech frames (:func:`timbre_descriptor`; empty in
    features stored before it existed)."""

    @property
    def f0_range_octaves(self) -> float:
        return math.log2(self.f0_p90_hz / self.f0_p10_hz)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SpeakerFeatures:
        d = json.loads(text)
        return cls(float(d["f0_median_hz"]), float(d["f0_p10_hz"]), float(d["f0_p90_hz"]),
                   tuple(float(f) for f in d["envelope_db"]),
                   tuple(float(f) for f in d.get("timbre", ())))  # fmt: skip


def _envelope(x: npt.NDArray[np.float64], sample_rate: int, times: npt.NDArray[np.float64]
              ) -> tuple[float, ...]:  # fmt: skip
    """Long-term average spectrum of the frames at ``times``, cepstrally smoothed, in dB on
    the log-frequency grid :data:`ENVELOPE_HZ` (a vocal-tract length change is a shift)."""
    n = int(0.04 * sample_rate)
    starts = np.clip((times * sample_rate).astype(int) - n // 2, 0, max(0, x.size - n))
    frames = np.stack([x[i : i + n] for i in starts]) * np.hanning(n)
    nfft = 1 << (n - 1).bit_length()
    power = np.mean(np.abs(np.fft.rfft(frames, nfft, axis=1)) ** 2, axis=0) + 1e-12
    cep = np.fft.irfft(np.log(power))
    lifter = int(_LIFTER_S * sample_rate)
    cep[lifter:-lifter] = 0.0
    smooth = np.fft.rfft(cep).real[: power.size]
    freqs = np.fft.rfftfreq(nfft, 1.0 / sample_rate)
    env = np.interp(ENVELOPE_HZ, freqs, smooth) * (10 / np.log(10))
    return tuple(float(v) for v in env)


_MEL_BANDS: Final = 30
_CEPSTRA: Final = 13
_SPEECH_DB: Final = 30.0  # frames within this of the loudest count as speech


def _mel_filterbank(n_fft: int) -> npt.NDArray[np.float64]:
    """Triangular mel filters, 100–7000 Hz, at :data:`ANALYSIS_RATE`."""
    mel = np.linspace(2595 * np.log10(1 + 100 / 700), 2595 * np.log10(1 + 7000 / 700),
                      _MEL_BANDS + 2)  # fmt: skip
    edges = 700 * (10 ** (mel / 2595) - 1)
    bins = np.fft.rfftfreq(n_fft, 1.0 / ANALYSIS_RATE)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising, falling = (bins - lo) / (mid - lo), (hi - bins) / (hi - mid)
    fb: npt.NDArray[np.float64] = np.clip(np.minimum(rising, falling), 0.0, None)
    return fb


def timbre_descriptor(pcm: PCM16, sample_rate: int) -> tuple[float, ...]:
    """Mean and spread of mel cepstra c1–c13 and the spread of their frame-to-frame change
    (39 numbers) over the speech frames: what a voice's timbre and voice quality do to the
    spectrum, largely apart from pitch. Cheap (numpy, ≈10 ms per second of audio)."""
    import soxr

    x = soxr.resample(pcm.astype(np.float32) / 32768.0, sample_rate, ANALYSIS_RATE)
    n, hop, n_fft = 400, 160, 512  # 25 ms frames, 10 ms hop
    if x.size < n + hop:
        return ()
    frames = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), n)[::hop]
    power = np.abs(np.fft.rfft(frames * np.hanning(n), n_fft, axis=1)) ** 2
    level = 10 * np.log10(power.sum(axis=1) + 1e-12)
    mel = np.log(power[level > level.max() - _SPEECH_DB] @ _mel_filterbank(n_fft).T + 1e-10)
    k = np.arange(_MEL_BANDS) + 0.5
    dct = np.cos(np.pi / _MEL_BANDS * np.outer(np.arange(1, _CEPSTRA + 1), k))
    cep = mel @ dct.T
    if cep.shape[0] < 3:
        return ()
    stats = np.concatenate([cep.mean(axis=0), cep.std(axis=0), np.diff(cep, axis=0).std(axis=0)])
    return tuple(float(v) for v in stats)


def nearest_voice(speaker: SpeakerFeatures, voices: Mapping[str, Sequence[tuple[float, ...]]]
                  ) -> str | None:  # fmt: skip
    """The base voice whose output is nearest the speaker's timbre: ``voices`` maps each
    candidate to descriptors of its output (at several pitches or formant scales); None when
    the speaker has no descriptor (features stored before it existed)."""
    if not speaker.timbre:
        return None
    target = np.asarray(speaker.timbre)
    best, best_d = None, math.inf
    for name, descriptors in voices.items():
        for d in descriptors:
            if len(d) != target.size:
                continue
            dist = float(np.linalg.norm(target - np.asarray(d)))
            if dist < best_d:
                best, best_d = name, dist
    return best


def extract_features(pcm: PCM16, sample_rate: int) -> SpeakerFeatures | None:
    """Pitch statistics and spectral envelope of the voiced frames; None without enough."""
    pm = _praat()
    x = pcm.astype(np.float64) / 32768.0
    sound = pm.Sound(x, sampling_frequency=sample_rate)
    pitch = sound.to_pitch(pitch_floor=_PITCH_FLOOR, pitch_ceiling=_PITCH_CEILING)
    f0 = pitch.selected_array["frequency"]
    voiced = f0 > 0
    if voiced.sum() < 10:
        return None
    p10, median, p90 = np.percentile(f0[voiced], [10, 50, 90])
    envelope = _envelope(x, sample_rate, np.asarray(pitch.xs())[voiced])
    return SpeakerFeatures(float(median), float(p10), float(max(p90, p10 * 1.01)), envelope,
                           timbre_descriptor(pcm, sample_rate))  # fmt: skip


def sample_features(data: bytes) -> str | None:
    """Enrollment: the JSON of a sample file's :class:`SpeakerFeatures` (None: no voice)."""
    from tts_stream.samples import decode_mono  # server -> samples is an allowed direction

    try:
        features = extract_features(decode_mono(data, ANALYSIS_RATE), ANALYSIS_RATE)
    except MissingDependency as exc:  # a tone-only server without the extra: no likeness
        logger.debug("no speaker features: %s", exc)
        return None
    return None if features is None else features.to_json()


def _warped(speaker: SpeakerFeatures, backend: SpeakerFeatures, ratio: float
            ) -> npt.NDArray[np.float64]:  # fmt: skip
    """The speaker's envelope minus the backend's warped by ``ratio`` (its value at f is
    b(f / ratio)), in dB on :data:`ENVELOPE_HZ`."""
    s = np.asarray(speaker.envelope_db)
    b = np.asarray(backend.envelope_db)
    step = math.log(ENVELOPE_HZ[1] / ENVELOPE_HZ[0])
    warped = np.interp(np.arange(s.size) - math.log(ratio) / step, np.arange(b.size), b)
    diff: npt.NDArray[np.float64] = s - warped
    return diff


def formant_ratio(speaker: SpeakerFeatures, backend: SpeakerFeatures) -> float:
    """The frequency scale that best maps the backend's envelope onto the speaker's: the
    shift on the log-frequency grid minimising the mean-removed squared difference."""
    best, best_err = 1.0, math.inf
    for ratio in np.arange(_FORMANT_RATIO[0], _FORMANT_RATIO[1] + 1e-9, 0.01):
        diff = _warped(speaker, backend, float(ratio))[_FIT]
        err = float(np.mean((diff - diff.mean()) ** 2))
        if err < best_err:
            best, best_err = float(ratio), err
    return best


def timbre_correction(speaker: SpeakerFeatures, backend: SpeakerFeatures, ratio: float
                      ) -> tuple[float, ...]:  # fmt: skip
    """The spectral tilt left after the formant shift: a straight line in dB per octave
    fitted, over 300–4000 Hz, to the speaker's long-term envelope minus the shifted
    backend's; level-free, within ±:data:`EQ_MAX_DB`, on :data:`ENVELOPE_HZ`. Only the tilt:
    correcting the whole envelope difference was measured to lower the likeness (it copies
    the sample's text and pitch into the colour, bench/README.md)."""
    octaves = np.log2(ENVELOPE_HZ)
    slope = float(np.polyfit(octaves[_FIT], _warped(speaker, backend, ratio)[_FIT], 1)[0])
    eq = np.clip(slope * (octaves - octaves[_FIT].mean()), -EQ_MAX_DB, EQ_MAX_DB)
    return tuple(float(v) for v in eq)


EQ_MAX_DB: Final = 12.0


def equalize(pcm: PCM16, sample_rate: int, eq_db: Sequence[float]) -> PCM16:
    """Zero-phase filter ``pcm`` by the gain curve ``eq_db`` (dB on :data:`ENVELOPE_HZ`,
    held flat beyond its ends): one FFT pair per piece. The curve is smooth (a cepstral
    envelope), so its impulse response is a few ms; the zero padding absorbs it."""
    n = pcm.size + 2048
    nfft = 1 << (n - 1).bit_length()
    freqs = np.fft.rfftfreq(nfft, 1.0 / sample_rate)
    gain = 10 ** (np.interp(np.log(np.maximum(freqs, 1.0)), np.log(ENVELOPE_HZ),
                            np.asarray(eq_db)) / 20)  # fmt: skip
    y = np.fft.irfft(np.fft.rfft(pcm.astype(np.float64), nfft) * gain, nfft)[: pcm.size]
    out: PCM16 = np.clip(np.rint(y), -32768, 32767).astype(np.int16)
    return out


@dataclass(frozen=True)
class BackendVoice:
    """A backend voice's own figures, measured on its output (see :func:`measure_backend`).

    ``calibration`` pairs each formant ratio given to Change gender with the ratio measured
    on its output (Praat's shift falls short at large ratios: 1.6 asked gives about 1.4);
    ``timbres`` holds the :func:`timbre_descriptor` of the output at each of those ratios
    (what this voice can sound like after the transform, for :func:`nearest_voice`).
    """

    name: str
    features: SpeakerFeatures
    calibration: tuple[tuple[float, float], ...] = ()
    timbres: tuple[tuple[float, ...], ...] = ()

    def ratio_for(self, wanted: float) -> float:
        """The ratio to ask Change gender for so that the output shifts by ``wanted``."""
        if not self.calibration:
            return wanted
        asked = np.array([a for a, _ in self.calibration])
        got = np.maximum.accumulate(np.array([g for _, g in self.calibration]))
        return float(np.interp(wanted, got, asked))


CALIBRATION_RATIOS: Final = (0.75, 0.9, 1.0, 1.15, 1.3, 1.45, 1.6, 1.7)


def measure_backend(name: str, pcm: PCM16, sample_rate: int, *,
                    ratios: Sequence[float] = CALIBRATION_RATIOS) -> BackendVoice:  # fmt: skip
    """Measure a backend voice on its speech of a calibration text (a few seconds), and how
    far Change gender really moves its formants at each of ``ratios`` (≈0.15 s of CPU per
    ratio, once per process; ``()``: no calibration)."""
    features = extract_features(pcm, sample_rate)
    if features is None:
        raise ValueError(f"no voiced speech in the calibration output of {name}")
    pairs, timbres = [], [features.timbre]
    for asked in ratios:
        shifted = Likeness(asked, features.f0_median_hz, 1.0).apply(pcm, sample_rate)
        measured = extract_features(shifted, sample_rate)
        if measured is not None:
            pairs.append((asked, formant_ratio(measured, features)))
            timbres.append(measured.timbre)
    return BackendVoice(name, features, tuple(pairs), tuple(timbres))


def _clip(x: float, bounds: tuple[float, float]) -> float:
    return min(max(x, bounds[0]), bounds[1])


# Below these the transform is skipped (a base voice chosen to match needs no change).
_IDENTITY_LOG_RATIO: Final = 0.025
_IDENTITY_LOG_RANGE: Final = 0.2
_IDENTITY_EQ_DB: Final = 1.5


@dataclass(frozen=True)
class Likeness:
    """The transform from one backend voice toward one speaker (cheap to build, reusable):
    Change gender (formant ratio, pitch median, pitch range), then the timbre correction
    ``eq_db`` (empty: none)."""

    formant_ratio: float
    pitch_median_hz: float
    range_ratio: float
    eq_db: tuple[float, ...] = ()
    change_gender: bool = True

    @classmethod
    def toward(
        cls, speaker: SpeakerFeatures, backend: BackendVoice, *, pitch_hz: float | None = None,
        timbre: bool = True,
    ) -> Likeness:  # fmt: skip
        """Parameters moving ``backend`` toward ``speaker`` (``pitch_hz`` overrides the
        target pitch median, e.g. scaled by the session's ``pitch_rate``; ``timbre=False``
        leaves the spectral colour alone). Parts too small to hear are left out."""
        ours, theirs = backend.features, speaker
        wanted = formant_ratio(theirs, ours)
        ratio = _clip(backend.ratio_for(wanted), _FORMANT_RATIO)
        range_ratio = _clip(theirs.f0_range_octaves / max(ours.f0_range_octaves, 1e-3),
                            _RANGE_RATIO)  # fmt: skip
        median = theirs.f0_median_hz if pitch_hz is None else pitch_hz
        eq = timbre_correction(theirs, ours, wanted) if timbre else ()
        change = (abs(math.log(ratio)) > _IDENTITY_LOG_RATIO
                  or abs(math.log(range_ratio)) > _IDENTITY_LOG_RANGE
                  or abs(math.log(median / ours.f0_median_hz)) > _IDENTITY_LOG_RATIO)  # fmt: skip
        if eq and max(abs(v) for v in eq[_FIT]) < _IDENTITY_EQ_DB:
            eq = ()
        return cls(ratio, median, range_ratio, eq, change)

    @property
    def is_identity(self) -> bool:
        return not self.change_gender and not self.eq_db

    def apply(self, pcm: PCM16, sample_rate: int) -> PCM16:
        """Change gender, then the timbre correction, on one piece of speech; same rate,
        about the same length."""
        if pcm.size < sample_rate // 20:
            return pcm  # too short for a pitch analysis
        out = self._change_gender(pcm, sample_rate) if self.change_gender else pcm
        return equalize(out, sample_rate, self.eq_db) if self.eq_db else out

    def _change_gender(self, pcm: PCM16, sample_rate: int) -> PCM16:
        """Praat's Change gender (PSOLA)."""
        pm = _praat()
        sound = pm.Sound(pcm.astype(np.float64) / 32768.0, sampling_frequency=sample_rate)
        changed = pm.praat.call(
            sound, "Change gender", _PITCH_FLOOR, _PITCH_CEILING, self.formant_ratio,
            self.pitch_median_hz, self.range_ratio, 1.0,
        )  # fmt: skip
        y = np.asarray(changed.values[0], dtype=np.float64)
        out: PCM16 = np.clip(np.rint(y * 32768.0), -32768, 32767).astype(np.int16)
        return out
