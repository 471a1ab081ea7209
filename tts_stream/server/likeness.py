"""Voices that resemble their speakers: speaker features at enrollment, a transform at synthesis.

Role: at enrollment :func:`extract_features` measures the sample's pitch (median, 10th and
90th percentile of F0) and formants (median F1–F3 of voiced frames), with Praat through
``praat-parselmouth``. At synthesis :class:`Likeness` moves a backend's output toward them
with Praat's "Change gender" (PSOLA): the pitch median becomes the speaker's, the pitch range
is scaled by the ratio of the speaker's to the backend's (in octaves), and the formants are
shifted by the frequency ratio that best maps the backend's envelope onto the speaker's
(:func:`formant_ratio`). The backend's own
figures are measured once, on its output for a calibration text (:func:`measure_backend`).

What it is not: the cloud's voice cloning. It keeps the backend's timbre, accent, rhythm and
voice quality and only matches three coarse cues (pitch level, pitch range, vocal-tract
length); two speakers alike in those sound alike here. Cost: ≈0.06 s of CPU per second of
audio, paid per piece, so a short first piece keeps first audio low.

Boundary: pure numpy in, numpy out (no asyncio, no clock); parselmouth (GPL-3, like the rest
of the server extra) is imported lazily.
"""

from __future__ import annotations

import json
import logging
import math
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
    "formant_ratio",
    "sample_features",
    "measure_backend",
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

    @property
    def f0_range_octaves(self) -> float:
        return math.log2(self.f0_p90_hz / self.f0_p10_hz)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SpeakerFeatures:
        d = json.loads(text)
        return cls(float(d["f0_median_hz"]), float(d["f0_p10_hz"]), float(d["f0_p90_hz"]),
                   tuple(float(f) for f in d["envelope_db"]))  # fmt: skip


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
    return SpeakerFeatures(float(median), float(p10), float(max(p90, p10 * 1.01)), envelope)


def sample_features(data: bytes) -> str | None:
    """Enrollment: the JSON of a sample file's :class:`SpeakerFeatures` (None: no voice)."""
    from tts_stream.samples import decode_mono  # server -> samples is an allowed direction

    try:
        features = extract_features(decode_mono(data, ANALYSIS_RATE), ANALYSIS_RATE)
    except MissingDependency as exc:  # a tone-only server without the extra: no likeness
        logger.debug("no speaker features: %s", exc)
        return None
    return None if features is None else features.to_json()


def formant_ratio(speaker: SpeakerFeatures, backend: SpeakerFeatures) -> float:
    """The frequency scale that best maps the backend's envelope onto the speaker's: the
    shift on the log-frequency grid minimising the mean-removed squared difference."""
    s = np.asarray(speaker.envelope_db)
    b = np.asarray(backend.envelope_db)
    best, best_err = 1.0, math.inf
    step = math.log(ENVELOPE_HZ[1] / ENVELOPE_HZ[0])
    for ratio in np.arange(_FORMANT_RATIO[0], _FORMANT_RATIO[1] + 1e-9, 0.01):
        # backend warped by `ratio`: its value at f is b(f / ratio)
        warped = np.interp(np.arange(s.size) - math.log(ratio) / step, np.arange(b.size), b)
        diff = s[_FIT] - warped[_FIT]
        err = float(np.mean((diff - diff.mean()) ** 2))
        if err < best_err:
            best, best_err = float(ratio), err
    return best


@dataclass(frozen=True)
class BackendVoice:
    """A backend voice's own figures, measured on its output (see :func:`measure_backend`).

    ``calibration`` pairs each formant ratio given to Change gender with the ratio measured
    on its output (Praat's shift falls short at large ratios: 1.6 asked gives about 1.4).
    """

    name: str
    features: SpeakerFeatures
    calibration: tuple[tuple[float, float], ...] = ()

    def ratio_for(self, wanted: float) -> float:
        """The ratio to ask Change gender for so that the output shifts by ``wanted``."""
        if not self.calibration:
            return wanted
        asked = np.array([a for a, _ in self.calibration])
        got = np.maximum.accumulate(np.array([g for _, g in self.calibration]))
        return float(np.interp(wanted, got, asked))


_CALIBRATION_RATIOS: Final = (0.75, 0.9, 1.0, 1.15, 1.3, 1.45, 1.6, 1.7)


def measure_backend(name: str, pcm: PCM16, sample_rate: int) -> BackendVoice:
    """Measure a backend voice on its speech of a calibration text (a few seconds), and how
    far Change gender really moves its formants (≈1 s of CPU, once per process)."""
    features = extract_features(pcm, sample_rate)
    if features is None:
        raise ValueError(f"no voiced speech in the calibration output of {name}")
    pairs = []
    for asked in _CALIBRATION_RATIOS:
        shifted = Likeness(asked, features.f0_median_hz, 1.0).apply(pcm, sample_rate)
        measured = extract_features(shifted, sample_rate)
        if measured is not None:
            pairs.append((asked, formant_ratio(measured, features)))
    return BackendVoice(name, features, tuple(pairs))


def _clip(x: float, bounds: tuple[float, float]) -> float:
    return min(max(x, bounds[0]), bounds[1])


@dataclass(frozen=True)
class Likeness:
    """The transform from one backend voice toward one speaker (cheap to build, reusable)."""

    formant_ratio: float
    pitch_median_hz: float
    range_ratio: float

    @classmethod
    def toward(
        cls, speaker: SpeakerFeatures, backend: BackendVoice, *, pitch_hz: float | None = None
    ) -> Likeness:
        """Parameters moving ``backend`` toward ``speaker`` (``pitch_hz`` overrides the
        target pitch median, e.g. scaled by the session's ``pitch_rate``)."""
        ours, theirs = backend.features, speaker
        ratio = backend.ratio_for(formant_ratio(theirs, ours))
        range_ratio = theirs.f0_range_octaves / max(ours.f0_range_octaves, 1e-3)
        return cls(
            formant_ratio=_clip(float(ratio), _FORMANT_RATIO),
            pitch_median_hz=theirs.f0_median_hz if pitch_hz is None else pitch_hz,
            range_ratio=_clip(range_ratio, _RANGE_RATIO),
        )

    def apply(self, pcm: PCM16, sample_rate: int) -> PCM16:
        """Praat's Change gender on one piece of speech; same rate, about the same length."""
        if pcm.size < sample_rate // 20:
            return pcm  # too short for a pitch analysis
        pm = _praat()
        sound = pm.Sound(pcm.astype(np.float64) / 32768.0, sampling_frequency=sample_rate)
        changed = pm.praat.call(
            sound, "Change gender", _PITCH_FLOOR, _PITCH_CEILING, self.formant_ratio,
            self.pitch_median_hz, self.range_ratio, 1.0,
        )  # fmt: skip
        y = np.asarray(changed.values[0], dtype=np.float64)
        out: PCM16 = np.clip(np.rint(y * 32768.0), -32768, 32767).astype(np.int16)
        return out
